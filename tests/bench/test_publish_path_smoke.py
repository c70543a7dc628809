"""``bench.publish_path`` at a tiny size against the session's Kafka: the harness still works."""

from __future__ import annotations

from bench.publish_path import measure
from shared.settings import Settings


async def test_publish_path_measures_acknowledged_publishes(settings: Settings) -> None:
    result = await measure(settings.kafka_bootstrap, 300, 8)
    assert result["all_accepted"] is True, result
    assert result["outcomes"] == {"accepted": 300}
    assert result["cpu_us_per_publish"] > 0 and result["publishes_per_s"] > 0
    assert 0 < result["produce_requests"] <= 300
