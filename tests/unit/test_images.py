"""Image cache housekeeping: a stale build directory may still hold mounts
(an older build killed mid-way left mmdebstrap's /proc and /sys mounted in its
rootfs); removing it must detach them first and never walk into them.

Uses a real tmpfs mount, so it needs root (as ``make check`` runs).
"""

import os
import subprocess
from pathlib import Path

import pytest

from apflab.images import ext4

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_remove_build_dir_detaches_mounts_first(tmp_path: Path) -> None:
    work = tmp_path / "guest-0123.building"
    inner = work / "rootfs" / "proc dir"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "apflab-test", inner], check=True)
    try:
        (inner / "file").write_text("inside the mount")
        assert ext4.mounts_under(work) == [inner]
        ext4.remove_build_dir(work)
        assert not work.exists()
        assert ext4.mounts_under(tmp_path) == []
    finally:
        if ext4.mounts_under(tmp_path):
            subprocess.run(["umount", "--lazy", inner], check=False)


def test_mounts_under_ignores_siblings(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "ab").mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "apflab-test", tmp_path / "ab"], check=True
    )
    try:
        assert ext4.mounts_under(tmp_path / "a") == []
        assert ext4.mounts_under(tmp_path) == [tmp_path / "ab"]
    finally:
        subprocess.run(["umount", "--lazy", tmp_path / "ab"], check=True)
