"""The ``blametrail`` command: the top of the tree, wiring the services and the ``shared`` floor together.

Nothing imports ``cli``; ``shared`` never imports it (tests/shared/test_floor.py checks).
"""


class CliError(Exception):
    """A failure the command reports as one ``blametrail: error: ...`` line and exit status 1."""
