"""``blametrail replay``: republish a window of a topic (raw, routed, ignored or dlq) with today's mappings.

``window`` reads the window with a group-less consumer, ``select`` filters it, ``run`` republishes
it throttled (``throttle``) with a progress display (``progress``), ``diff`` answers a dry run of
the raw topic with the routing diff, ``offsets`` resets a consumer group's offsets to a time.
"""


class ReplayError(Exception):
    """Bad input or a state the replay refuses (one line for the operator)."""
