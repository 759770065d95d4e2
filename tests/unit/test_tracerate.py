"""The trace reader's knee, summarised from a real flood in L1 (fixtures/bench)."""

import json
from pathlib import Path

from apflab.suite.tracerate import knee

FLOOD = Path(__file__).parent / "fixtures" / "bench" / "flood-l1-20261203.json"


def test_the_knee_is_the_last_lossless_and_first_lossy_rate_per_buffer() -> None:
    doc = json.loads(FLOOD.read_text())
    got = knee(doc["floods"])
    assert got == {
        8192: {"top_lossless_events_per_s": 49_933, "first_lossy_events_per_s": 99_576},
        4: {"top_lossless_events_per_s": 1_998, "first_lossy_events_per_s": 4_995},
    }
    # what the CLI printed is what knee() says (JSON keys are strings)
    assert {int(k): v for k, v in doc["knee"].items()} == got


def test_every_lost_event_is_missing_from_the_file() -> None:
    """The loss counters and the line count agree: written = seen + lost."""
    for row in json.loads(FLOOD.read_text())["floods"]:
        assert row["written"] == row["seen"] + row["lost"], row
