from pathlib import Path

import pytest

from apflab.errors import UsageError
from apflab.run.scenario import Scenario
from apflab.run.workload import WorkloadSpec, parse_rounds

F = Path(__file__).parent / "fixtures" / "workload"


def test_parse_rounds_from_a_real_run() -> None:
    rounds = parse_rounds((F / "tcg-run.jsonl").read_text())
    assert len(rounds) == 9  # 3 procs x (fill + 2 rounds)
    assert {r["proc"] for r in rounds} == {0, 1, 2}
    assert {r["round"] for r in rounds} == {0, 1, 2}
    assert all(r["pages"] == 25600 for r in rounds)  # 100 MiB / 4 KiB


def test_parse_rounds_ignores_noise() -> None:
    text = 'garbage\n{"proc":0,"round":1}\n{broken\n'
    assert parse_rounds(text) == [{"proc": 0, "round": 1}]


def test_spec_argv_and_validation() -> None:
    spec = WorkloadSpec(mb=64, procs=2, rounds=3, pattern="bursty", pause_ms=10, seed=7)
    assert spec.argv()[1:] == [
        "--mb",
        "64",
        "--procs",
        "2",
        "--rounds",
        "3",
        "--pattern",
        "bursty",
        "--pause-ms",
        "10",
        "--seed",
        "7",
    ]
    assert spec.total_mb == 128
    with pytest.raises(UsageError, match="pattern"):
        Scenario(pattern="zigzag").validate()
    with pytest.raises(UsageError, match="working-set"):
        Scenario(working_set=0).validate()
