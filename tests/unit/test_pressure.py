"""The limit of a restored guest: the page cache its cold boot held is credited
(apflab.run.pressure.page_cache_credit), on the memory.stat of a real cold boot
(fixtures/host/README.md)."""

from pathlib import Path

from apflab.host import cgroup, procfs
from apflab.run.pressure import SAVED_PAGE_CACHE, PressureReport, page_cache_credit

F = Path(__file__).parent / "fixtures" / "host"
MIB = 1 << 20


def cold_page_cache() -> int:
    stat = procfs.parse_flat_keyed((F / "v2-lab-cold-before.memory.stat").read_text())
    return cgroup.page_cache_of(stat, 2)


def test_restored_guest_gets_what_its_cold_boot_held_minus_what_it_holds() -> None:
    saved = {SAVED_PAGE_CACHE: cold_page_cache()}  # 51.9 MiB
    assert page_cache_credit(saved, 1 * MIB) == cold_page_cache() - MIB
    assert page_cache_credit(saved, 1 * MIB) >> 20 == 50


def test_no_credit_without_a_record_or_when_the_cache_is_already_there() -> None:
    assert page_cache_credit(None, MIB) == 0  # a cold boot
    assert page_cache_credit({}, MIB) == 0  # a saved boot that recorded nothing (L1's)
    # the run that made the saved boot: its cold QEMU's page cache is still charged
    assert page_cache_credit({SAVED_PAGE_CACHE: cold_page_cache()}, cold_page_cache()) == 0
    assert page_cache_credit({SAVED_PAGE_CACHE: 10 * MIB}, 60 * MIB) == 0


def test_the_applied_limit_survives_run_json() -> None:
    rep = PressureReport(cgroup_version=2, limit_mb=306, limit_credit_mb=50)
    again = PressureReport.from_dict(rep.to_dict())
    assert (again.limit_mb, again.limit_credit_mb) == (306, 50)
