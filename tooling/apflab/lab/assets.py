"""What L1 gets besides its root: the assets disk (current source, the guest
image's small files, kernels under test) and the environment for commands in it.

A code change never needs an image rebuild: every lab start packs the current
checkout into a small ext4 (``mke2fs -d``, about a second).
"""

from __future__ import annotations

import compileall
import logging
import os
import py_compile
import shutil
from collections.abc import Sequence
from pathlib import Path

from apflab import paths
from apflab.errors import LabError
from apflab.images.ext4 import make_ext4
from apflab.images.recipe import BuiltImage
from apflab.process import run

log = logging.getLogger(__name__)

SERIALS = {
    "assets": "apflab-assets",
    "guest_root": "apflab-groot",
    "swap": "apflab-swap",
    "saved_boots": "apflab-saved",
}
#: where L1 keeps its saved boots (apflab.vm.snapshot): the saved-boots disk
SAVED_BOOTS_MOUNT = "/var/lib/apflab/saved-boots"
#: size of that disk (a sparse file in the machine cache)
SAVED_BOOTS_DISK_MB = 16 << 10
ASSETS_MOUNT = "/mnt/apflab"
L1_RESULTS = "/root/results"
#: where the kernels of `apflab lab up --kernel` are inside L1
KERNELS_MOUNT = f"{ASSETS_MOUNT}/kernels"
#: where a run's own files go inside L1 (apflab.lab.l1.ship), one dir per run
SHIP_ROOT = "/root/ship"
#: what ships in the assets disk from the checkout
SOURCE_ITEMS = (
    "tooling",
    "tests",
    "guest_images",
    "requirements.lock",
    "setup.cfg",
    "pyproject.toml",
)

#: the lab image's Python (its venv: apflab's dependencies)
LAB_PYTHON = "/opt/apflab/venv/bin/python"

# Environment for commands run in L1: the current source, the lab's venv, the
# image cache on the assets disk.
L1_ENV = {
    "PATH": f"{ASSETS_MOUNT}/bin:{Path(LAB_PYTHON).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONPATH": f"{ASSETS_MOUNT}/src/tooling",
    "PYTHONDONTWRITEBYTECODE": "1",
    "APFLAB_CACHE": f"{ASSETS_MOUNT}/cache",
    "APFLAB_IMAGES": f"{ASSETS_MOUNT}/src/guest_images",
    "APFLAB_LOCKFILE": f"{ASSETS_MOUNT}/src/requirements.lock",
    "APFLAB_IN_LAB": "1",
    "APFLAB_SAVED_BOOTS": SAVED_BOOTS_MOUNT,
    "APFLAB_LAB_SWAP_DEVICE": f"/dev/disk/by-id/virtio-{SERIALS['swap']}",
    "MPLBACKEND": "Agg",
}

APFLAB_WRAPPER = f"""#!/bin/sh
exec {LAB_PYTHON} -m apflab "$@"
"""


#: the assets disk is a multiple of this size (MiB; sparse, so it costs nothing)
ASSETS_ROUND_MB = 1024


def saved_boots_disk() -> Path | None:
    """The machine's disk of L1 saved boots (made on first use), or None while another
    lab has it open (QEMU's image lock): that lab's L2 boots are saved on L1's own
    disk and lost with it.  The disk is a cache: L1 makes a new file system on it
    when the old one does not mount."""
    path = paths.cache_dir() / "lab-saved-boots.img"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                f.truncate(SAVED_BOOTS_DISK_MB << 20)
            run(["mke2fs", "-q", "-t", "ext4", "-L", "apflab-saved", "-F", tmp], timeout=120)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    # opened read-write, as L1's QEMU will: `qemu-img info` opens it read-only and
    # succeeds while another lab writes it (two labs at once then failed at launch)
    probe = run(["qemu-io", "-f", "raw", "-c", "quit", path], check=False, timeout=60)
    if not probe.ok:
        log.info("lab: the saved-boots disk is in use by another lab: this one keeps its own")
        return None
    return path


def _copy_source(repo: Path, dest: Path) -> None:
    # not the analyzer's compiled modules either (built for this host's Python; L1
    # runs the source, and analyses nothing heavy: judging is done here)
    ignore = shutil.ignore_patterns(
        "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", "*.so", ".native.json"
    )
    for item in SOURCE_ITEMS:
        src = repo / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / item)
    # bytecode made here: L1 only reads it (PYTHONDONTWRITEBYTECODE; a read-only
    # disk), and compiling apflab's modules at every start-up costs ~1.5 s of the
    # emulated L1 per command.  Hash-checked, so a stale file is never used; a Python
    # other than L1's ignores it (its tag differs).
    for item in ("tooling", "tests"):
        if (dest / item).is_dir():
            compileall.compile_dir(
                dest / item,
                quiet=2,
                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            )
    commit = paths.repo_commit()
    if commit is not None:  # a copy without .git still says what it is a copy of
        (dest / paths.COMMIT_FILE).write_text(commit + "\n")


def build_assets(staging: Path, out: Path, guest: BuiltImage, kernels: Sequence[Path]) -> Path:
    """Stage the assets tree and pack it into a small ext4 image (no mounts)."""
    repo = paths.repo_root()
    if repo is None:
        raise LabError("the lab needs an apflab checkout to ship its source into L1")
    _copy_source(repo, staging / "src")
    img_dir = staging / "cache" / "images" / guest.directory.name
    img_dir.mkdir(parents=True)
    for name in ("manifest.json", "vmlinuz", "initrd.img", "ssh_host_ed25519_key.pub"):
        shutil.copy2(guest.directory / name, img_dir / name)
    (img_dir / "root.img").symlink_to(f"/dev/disk/by-id/virtio-{SERIALS['guest_root']}")
    kdir = staging / "kernels"
    kdir.mkdir()
    for k in kernels:
        shutil.copy2(k, kdir / k.name)
    bindir = staging / "bin"
    bindir.mkdir()
    (bindir / "apflab").write_text(APFLAB_WRAPPER)
    (bindir / "apflab").chmod(0o755)
    # a round size: the assets of one checkout and the next fit the same disk, which
    # a saved L1 boot needs (the disk's size is part of its identity)
    make_ext4(staging, out, "apflab-assets", round_mb=ASSETS_ROUND_MB)
    return out
