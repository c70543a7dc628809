"""``blametrail replay`` as an operator runs it: output, --json, the log line, Ctrl-C and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid

import pytest

from cli.main import main
from shared import events
from shared.settings import Settings
from shared.topics import Topics
from tests.replay.support import at, cli, own_settings, produce, raw, read
from tests.support import blametrail_command, settings_env, wait_until
from tests.support.kafka import TopicReader
from tests.support.sentry import issue_body

pytestmark = pytest.mark.integration

SUMMARY_KEYS = {"replay_id", "topic", "dry_run", "scanned", "selected", "republished", "diff", "interrupted"}


def window(start: float, end: float) -> list[str]:
    return ["--from", events.rfc3339(at(start)), "--to", events.rfc3339(at(end))]


async def test_json_output_and_the_log_line(topics: Settings) -> None:
    settings = await own_settings(topics, "cli")
    t = Topics.from_settings(settings)
    org = f"org-{uuid.uuid4().hex[:8]}"
    await produce(settings, [raw(t, org, issue_body(str(i), project="web"), minute=i) for i in range(3)])

    done = cli(settings, "replay", "--topic", "raw", *window(0, 10), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one JSON object, nothing else on standard output
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["topic"], summary["dry_run"], summary["scanned"], summary["selected"]) == ("raw", True, 3, 3)
    assert summary["republished"] == 0
    assert summary["diff"] == [
        {"org": org, "project": "web", "would_route": {}, "stays": 0, "will_not_move": 0, "not_recorded": 3}
    ]
    assert "blametrail.replay" in done.stderr  # the logger, whatever the log format
    assert f"replay {summary['replay_id']} topic={t.raw}" in done.stderr
    assert "dry_run=True: scanned=3 selected=3 republished=0" in done.stderr

    done = cli(settings, "replay", "--topic", "raw", *window(0, 10), "--rate", "1000")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    replay_id = first.split()[1].rstrip(":")
    assert "(republished)" in first
    assert second.startswith("scanned 3, selected 3, republished 3")
    assert f"{org}/web" in done.stdout
    assert f"replay {replay_id}: scanned 3/~3, selected 3, republished 3" in done.stderr  # the plain progress line
    assert len(await read(settings, [t.raw], replay_id)) == 3


def start(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*blametrail_command(), *args],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_ctrl_c_stops_and_reports_what_was_republished(topics: Settings) -> None:
    settings = await own_settings(topics, "sigint")
    t = Topics.from_settings(settings)
    await produce(settings, [raw(t, "sigint-org", issue_body(str(i)), minute=i / 10) for i in range(50)])

    async with TopicReader(settings.kafka_bootstrap, [t.raw]) as reader:
        proc = start(settings, "replay", "--topic", "raw", *window(0, 10), "--rate", "5", "--json")
        try:

            async def some_republished() -> bool:
                return sum(1 for r in reader.records if events.H_REPLAY_ID in r.headers) >= 2

            await wait_until(some_republished, within=60, what="the replay republishing")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    assert proc.returncode == 130, err
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert 2 <= summary["republished"] < 50
    assert len(await read(settings, [t.raw], summary["replay_id"])) == summary["republished"]


async def test_bad_input_is_one_line_and_exit_code_1(topics: Settings) -> None:
    settings = await own_settings(topics, "bad")
    t = Topics.from_settings(settings)
    await produce(settings, [raw(t, "bad-org", issue_body("1"), minute=1)])
    cases = {
        ("--topic", "nope", "--from", "1h"): "unknown topic 'nope'",
        ("--topic", "raw", "--from", "1h", "--to", "2h"): "is after --to",
        ("--topic", "raw", "--from", "yesterday"): "bad time 'yesterday'",
        ("--topic", "raw", *window(0, 10), "--org", "no-such-org-here"): "unknown org",
        ("--topic", "routed", *window(0, 10)): "no records in",
        ("--topic", "raw", *window(5, 10)): "no records in",
        ("--topic", "raw", *window(0, 10), "--reason", "unmapped"): "--reason applies to --topic ignored only",
        ("--topic", "ignored", *window(0, 10), "--reason", "bogus"): "unknown reason 'bogus'",
    }
    for args, message in cases.items():
        done = cli(settings, "replay", *args)
        lines = done.stderr.strip().splitlines()
        assert (done.returncode, done.stdout) == (1, ""), (args, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("blametrail: error: ") and message in lines[0], (args, lines)

    elsewhere = settings.model_copy(update={"topic_prefix": f"missing-{uuid.uuid4().hex[:6]}."})
    done = cli(elsewhere, "replay", "--topic", "raw", "--from", "1h")
    assert done.returncode == 1 and "does not exist" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--topic", "raw"],  # no --from
        ["--from", "1h"],  # no --topic
        ["--topic", "raw", "--from", "1h", "--limit", "0"],
        ["--topic", "raw", "--from", "1h", "--rate", "fast"],
        ["reset-offsets", "--group", "ingest", "--to-datetime", "1h"],
        ["reset-offsets", "--group", "router"],  # no --to-datetime
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["replay", *args])
    assert exited.value.code == 2
    assert "usage: blametrail replay" in capsys.readouterr().err


def test_a_usage_error_of_the_installed_command_exits_2(migrated: Settings) -> None:
    done = cli(migrated, "replay", "--topic", "raw")
    assert done.returncode == 2 and "usage: blametrail replay" in done.stderr, done.stderr
