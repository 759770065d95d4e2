"""Parsers of host and guest kernel texts, on text captured from real machines
(see fixtures/host/README.md)."""

from pathlib import Path

import pytest

from apflab.host import cgroup, leftovers, procfs, swap, tracefs
from apflab.vm import guestinfo
from apflab.vm.console import ConsoleWatch

F = Path(__file__).parent / "fixtures" / "host"


def read(name: str) -> str:
    return (F / name).read_text()


def test_memory_stat_v1() -> None:
    stat = procfs.parse_flat_keyed(read("v1-memory.stat"))
    # values read off the file by hand
    assert stat["rss"] == 259723264
    assert stat["rss_huge"] == 167772160
    assert stat["cache"] == 0
    assert len(stat) == 42


def test_proc_vmstat_counters() -> None:
    vm = procfs.parse_flat_keyed(read("proc-vmstat"))
    for key in ("pswpin", "pswpout", "pgmajfault", "pgfault"):
        assert key in vm
    assert all(isinstance(v, int) for v in vm.values())


def test_mountinfo_finds_the_v1_memory_hierarchy() -> None:
    mounts = cgroup.parse_mountinfo(read("mountinfo-v1-hybrid"))
    memory = [m for m in mounts if m.fstype == "cgroup" and "memory" in m.super_options]
    assert [m.mountpoint for m in memory] == ["/sys/fs/cgroup/memory"]
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    assert [m.mountpoint for m in v2] == ["/sys/fs/cgroup/unified"]


def test_proc_cgroup_v1_memory_path() -> None:
    own = cgroup.parse_proc_cgroup(read("proc-self-cgroup-v1"))
    assert own["memory"] == "/process_api/1ed39f1b8c689573d90e86cda7e437a6"
    assert own[""] == "/"  # the v2 (unified) line "0::/"
    assert own["cpu"] == "/"


def test_proc_swaps_with_our_swap_file() -> None:
    entries = swap.parse_proc_swaps(read("proc-swaps"))
    assert len(entries) == 1
    e = entries[0]
    assert e.path == "/var/tmp/apflab/20261128-132508-e657-swap/swapfile"
    assert (e.kind, e.size_kb, e.used_kb, e.priority) == ("file", 2097148, 0, 100)


def test_proc_swaps_empty() -> None:
    assert swap.parse_proc_swaps("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n") == []


def test_tracefs_cpu_stats() -> None:
    stats = tracefs.parse_cpu_stats(read("tracefs-cpu0-stats"))
    assert stats["entries"] == 51814
    assert stats["overrun"] == 0
    assert stats["commit_overrun"] == 0
    assert stats["dropped_events"] == 0
    assert "oldest_event_ts" not in stats  # timestamps are not integers: skipped


def test_capture_loss_sums_overrun_and_dropped() -> None:
    s = tracefs.CaptureStats(per_cpu={0: {"overrun": 3, "dropped_events": 1}, 1: {"overrun": 2}})
    assert (s.overrun, s.dropped, s.lost) == (5, 1, 6)


def test_hyp_line_of_a_kvm_guest() -> None:
    assert guestinfo.parse_interrupts(read("guest-interrupts-kvm-after")) == [7961, 8026]


def test_no_hyp_line_under_tcg() -> None:
    text = read("guest-interrupts-tcg")
    assert "HYP" not in text
    assert guestinfo.parse_interrupts(text) == []
    assert guestinfo.parse_interrupts(text, "LOC") != []


def test_hung_tasks_from_a_stalled_guest_console() -> None:
    hung = guestinfo.parse_hung_tasks(read("guest-console-hung-tasks"))
    assert hung == [
        "task memtouch:44 blocked for more than 30 seconds",
        "task memtouch:45 blocked for more than 30 seconds",
    ]
    assert guestinfo.parse_hung_tasks(read("guest-interrupts-tcg")) == []


def test_od_u64() -> None:
    # `od -An -tx8` of MSR_KVM_ASYNC_PF_EN read in an L2 guest (apflab boot --json, 2026-11-28)
    assert guestinfo.parse_od_u64(" 000000003e8330c9\n") == 0x3E8330C9
    with pytest.raises(ValueError):
        guestinfo.parse_od_u64("")


def test_apf_state_bits() -> None:
    st = guestinfo.ApfState(0x3E8330C9, 0xF3)
    assert st.enabled and st.interrupt_delivery
    assert not guestinfo.ApfState(0x3E8330C0, 0xF3).enabled
    assert not guestinfo.ApfState(0x3E8330C1, 0xF3).interrupt_delivery


def test_a_panic_after_boot_is_found_and_only_once(tmp_path: Path) -> None:
    """After boot the console is read for a panic only (it ends the workload at once)."""
    lines = read("guest-console-panic").splitlines(keepends=True)
    console = tmp_path / "console.log"
    console.write_text("".join(lines[:3]))  # before the crash
    watch = ConsoleWatch(console, "guest")
    assert watch.poll_panic() is None
    console.write_text("".join(lines))
    assert watch.poll_panic() == "Kernel panic - not syncing: sysrq triggered crash"
    assert watch.poll_panic() is None  # nothing new since


def test_leftover_mounts_are_read_from_this_hosts_mountinfo() -> None:
    """This process's real mount table: /proc is found by name, nothing of ours is."""
    assert "mount /proc" in leftovers._mounts("proc")
    assert leftovers._mounts(None) == []


def test_page_cache_of_both_versions() -> None:
    v2 = procfs.parse_flat_keyed(read("v2-lab-cold-before.memory.stat"))
    assert cgroup.page_cache_of(v2, 2) == 54464512  # its "file" line, read by hand
    assert cgroup.page_cache_of(procfs.parse_flat_keyed(read("v1-memory.stat")), 1) == 0
