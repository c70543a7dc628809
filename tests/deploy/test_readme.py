"""README.md stays true: its settings table names every setting, and only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from shared.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_and_every_documented_one_exists() -> None:
    table = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = {name.lower() for name in re.findall(r"`BLAMETRAIL_([A-Z_]+)`", table)}
    fields = set(Settings.model_fields)
    assert fields - documented == set(), "settings missing from README.md"
    assert documented - fields == set(), "README.md documents settings that do not exist"
