"""The saved-boots store (apflab.vm.snapshot): publish, one creator at a time, a failed
save leaves nothing, the least recently used go first.  The QEMU side (save and
restore by migration) is tested on a real guest in tests/functional/test_boot.py."""

import os
import time
from pathlib import Path

import pytest

from apflab.vm import snapshot


def fill(staging: Path) -> None:
    (staging / "memory.bin").write_bytes(b"\0" * 16)
    (staging / "disk.qcow2").write_bytes(b"")
    snapshot.write_meta(staging, {"format": snapshot.FORMAT}, 12.3)


def test_publish_and_lookup(tmp_path: Path) -> None:
    store = snapshot.Store(tmp_path / "saved")
    assert store.lookup("k1") is None
    with store.creating("k1") as staging:
        assert staging is not None
        assert staging.stat().st_mode & 0o777 == 0o700
        fill(staging)
    saved = store.lookup("k1")
    assert saved is not None
    assert saved.meta()["boot_seconds"] == 12.3
    assert saved.meta()["memory_bytes"] == 16
    assert store.root.stat().st_mode & 0o777 == 0o700
    with store.creating("k1") as again:  # published meanwhile: nothing to do
        assert again is None


def test_a_failed_save_leaves_nothing(tmp_path: Path) -> None:
    store = snapshot.Store(tmp_path / "saved")
    with pytest.raises(RuntimeError), store.creating("k1") as staging:
        assert staging is not None
        fill(staging)
        raise RuntimeError("the guest died while it was saved")
    assert store.lookup("k1") is None
    assert [p.name for p in store.root.iterdir() if not p.name.endswith(".lock")] == []


def test_a_killed_creator_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    store = snapshot.Store(tmp_path / "saved")
    store.root.mkdir(mode=0o700)
    stale = store.root / ".k1.staging-999999"
    stale.mkdir()
    (stale / "memory.bin").write_bytes(b"half")
    with store.creating("k1") as staging:
        assert staging is not None
        fill(staging)
    assert not stale.exists()
    assert store.lookup("k1") is not None


def test_least_recently_used_go_first(tmp_path: Path) -> None:
    store = snapshot.Store(tmp_path / "saved")

    def save(key: str, age_s: float) -> None:
        with store.creating(key) as staging:
            assert staging is not None
            fill(staging)
        past = time.time() - age_s
        os.utime(store.root / key, (past, past))

    for i in range(snapshot.KEEP):
        save(f"k{i}", 1000 - i)  # k0 the oldest
    used = store.lookup("k0")
    assert used is not None
    used.used()  # restored just now: kept
    save("new1", 0)
    save("new2", 0)
    kept = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))
    assert len(kept) == snapshot.KEEP
    assert "k0" in kept and "new1" in kept and "new2" in kept
    assert "k1" not in kept and "k2" not in kept


def test_key_follows_every_input() -> None:
    base = {"format": 1, "kernel_sha256": "a", "cmdline": "x", "memory_mb": 1024}
    keys = {snapshot.key_of(base)}
    for change in ({"kernel_sha256": "b"}, {"cmdline": "x y"}, {"memory_mb": 2048}):
        keys.add(snapshot.key_of({**base, **change}))
    assert len(keys) == 4
    assert snapshot.key_of(dict(reversed(list(base.items())))) == snapshot.key_of(base)
