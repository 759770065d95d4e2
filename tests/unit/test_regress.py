"""Comparison, store and change detection on recorded runs (real lab runs of
make calibrate, captured with tests/unit/fixtures/capture.py verdict; INDEX.json
says which kernel each run was)."""

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

import pytest
import sqlalchemy as sa

from apflab.regress import changes, compare
from apflab.regress.store import MIGRATIONS, Store, migrate
from apflab.report import trend

F = Path(__file__).parent / "fixtures" / "verdicts"
INDEX: dict[str, str] = json.loads((F / "INDEX.json").read_text())


def runs_of(cell: str) -> list[Path]:
    return sorted(F / run_id for run_id, c in INDEX.items() if c == cell)


def loaded(cell: str) -> list[compare.Run]:
    return [compare.Run.load(d) for d in runs_of(cell)]


def test_the_fixture_cells() -> None:
    for cell in ("unpatched", "delay-100us", "delay-500us", "delay-5000us"):
        assert len(runs_of(cell)) >= 4, cell


def test_min_runs_for_an_exact_two_sided_test() -> None:
    assert compare.min_runs(0.05) == 4  # 3 v 3 cannot go below p = 0.1
    assert compare.min_runs(0.01) == 5


def test_a_500us_late_ack_is_slower_than_the_unpatched_build() -> None:
    doc = compare.compare(loaded("delay-500us"), loaded("unpatched"), compare.Rules())
    # its own verdict already FAILs (the p10 floor); the comparison says so first
    assert doc["verdict"] == "FAIL"
    slower = [c for c in doc["changes"] if c["verdict"] == "FAIL"]
    assert {(c["metric"], c["statistic"]) for c in slower} >= {("ready_to_ack", "p50")}


def test_runs_of_one_kernel_against_themselves_pass() -> None:
    base = loaded("unpatched")
    doc = compare.compare(base[: len(base) // 2 + 2], base[len(base) // 2 - 2 :], compare.Rules())
    assert doc["verdict"] in ("PASS", "INCONCLUSIVE"), doc["reason"]
    assert not [c for c in doc["changes"] if c["verdict"] == "FAIL"]


def test_too_few_runs_are_inconclusive_never_a_pass() -> None:
    doc = compare.compare(loaded("delay-100us")[:1], loaded("unpatched"), compare.Rules())
    assert doc["verdict"] == "INCONCLUSIVE"
    assert "3 more run(s) needed" in doc["reason"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(str(tmp_path / "apflab.db"))
    yield s  # type: ignore[misc]
    s.close()


def test_import_is_idempotent_and_the_schema_current(store: Store, tmp_path: Path) -> None:
    dirs = runs_of("unpatched")
    assert store.version == len(MIGRATIONS)
    assert store.import_dirs(dirs, "n1") == (len(dirs), 0)
    assert store.import_dirs(dirs, "n1") == (0, len(dirs))
    again = Store.open(str(tmp_path / "apflab.db"))  # reopened: no migration runs twice
    assert again.version == len(MIGRATIONS)
    assert len(again.history()) == len(dirs)
    again.close()


def test_a_version_1_store_is_migrated_and_keeps_its_runs(tmp_path: Path) -> None:
    """A store written before host kernels were recorded (schema 1) opens as the
    current schema: its runs are kept, their host kernel is unknown (None)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        migrate(conn, to=1)
    engine.dispose()
    doc = json.loads((runs_of("unpatched")[0] / "verdict.json").read_text())
    with sa.create_engine(url).begin() as conn:  # a row as schema 1 wrote it
        conn.execute(
            sa.text(
                "INSERT INTO runs (run_key, run_id, kernel, verdict, started_at) "
                "VALUES ('old/r1', 'r1', 'old kernel', 'PASS', '2026-11-01T00:00:00Z')"
            )
        )
    store = Store.open(url)
    try:
        assert store.version == len(MIGRATIONS) == 2
        assert store.add(doc, runs_of("unpatched")[0], "n1")
        rows = store.history()
        assert [r["run_id"] for r in rows] == ["r1", doc["run_id"]]
        assert rows[0]["host_kernel"] is None
        assert rows[1]["host_kernel"] == doc["host_kernel"]  # the lab image's L1 kernel
    finally:
        store.close()


def _night(store: Store, night: str, cell: str, kernel: str, n: int = 2, skip: int = 0) -> None:
    for d in runs_of(cell)[skip : skip + n]:
        doc = json.loads((d / "verdict.json").read_text())
        doc["run_id"] = f"{doc['run_id']}-{night}"  # the same real run, recorded nightly
        store.add(doc, d, night, kernel)


def test_a_step_is_a_regression_from_its_first_night(store: Store) -> None:
    for i in range(1, 6):
        _night(store, f"2026-11-0{i}", "unpatched", "K")
    for i in range(6, 10):
        _night(store, f"2026-11-0{i}", "delay-1000us", "K")
    found = changes.detect(store.history(), changes.Rules(min_magnitude=0.2))
    assert found[0].kind == "new FAIL" and found[0].first_night == "2026-11-06"
    slow = [f for f in found if f.kind == "latency regression" and f.metric == "ready_to_ack"]
    assert slow and slow[0].first_night == "2026-11-06", [f.detail for f in found]


def test_noise_is_not_a_regression(store: Store) -> None:
    for i, cell in enumerate(["unpatched"] * 8, 1):
        _night(store, f"2026-11-{i:02d}", cell, "K", n=1 + i % 2)
    assert changes.detect(store.history()) == []


def test_a_second_night_with_a_longer_delay_is_a_regression_of_that_night(store: Store) -> None:
    """Two nights of three runs each: the late-ACK kernel's delay made longer (500 us,
    then 1 ms) is a regression named by the second night, with its three runs."""
    _night(store, "2026-11-01", "delay-500us", "late_ack", n=3)
    _night(store, "2026-11-02", "delay-1000us", "late_ack", n=3)
    found = changes.detect(store.history())
    slow = [f for f in found if f.kind == "latency regression" and f.metric == "ready_to_ack"]
    assert slow, [f.detail for f in found]
    assert slow[0].first_night == "2026-11-02"
    assert len(slow[0].runs) == 3
    # it failed on both nights: flagged from its first night, not as a new FAIL
    assert [(f.kind, f.first_night) for f in found if "FAIL" in f.kind] == [("FAIL", "2026-11-01")]


def test_a_kernel_that_passes_again_is_not_flagged(store: Store) -> None:
    _night(store, "2026-11-01", "unpatched", "K", n=2)
    _night(store, "2026-11-02", "delay-500us", "K", n=2)
    _night(store, "2026-11-03", "unpatched", "K", n=2, skip=2)
    assert not [f for f in changes.detect(store.history()) if "FAIL" in f.kind]


def test_distinct_runs_of_one_kernel_over_nights_are_not_a_regression(store: Store) -> None:
    """Five different unpatched runs spread over three nights: noise, no finding."""
    _night(store, "2026-11-01", "unpatched", "K", n=2)
    _night(store, "2026-11-02", "unpatched", "K", n=2, skip=2)
    _night(store, "2026-11-03", "unpatched", "K", n=1, skip=4)
    assert changes.detect(store.history()) == []


def test_the_trend_xunit_fails_every_night_a_kernel_fails(store: Store, tmp_path: Path) -> None:
    """Lab CI reads trend.xml: a kernel that still fails is a failure on each night it
    fails, not only on the night it began; a kernel that passes is not."""
    _night(store, "2026-11-01", "delay-500us", "late_ack", n=2)
    _night(store, "2026-11-02", "delay-500us", "late_ack", n=2, skip=2)
    _night(store, "2026-11-01", "unpatched", "unpatched", n=2)
    _night(store, "2026-11-02", "unpatched", "unpatched", n=2, skip=2)
    history = store.history()
    findings = [asdict(f) for f in changes.detect(history)]
    _, xml = trend.write(
        tmp_path, history, store.history(statistic="p99"), findings, ["ready_to_ack"]
    )
    suite = ET.parse(xml).getroot()
    failed = {
        (c.get("classname"), c.get("name")): c.find("failure") is not None
        for c in suite.iter("testcase")
    }
    assert failed == {
        ("late_ack", "2026-11-01"): True,
        ("late_ack", "2026-11-02"): True,
        ("unpatched", "2026-11-01"): False,
        ("unpatched", "2026-11-02"): False,
    }
    assert suite.get("failures") == "2"
