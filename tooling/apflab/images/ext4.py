"""Raw ext4 images without loop mounts, and build directories removed safely."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from apflab.process import run

log = logging.getLogger(__name__)


def make_ext4(source: Path, image: Path, label: str, free_mb: int = 0, round_mb: int = 1) -> int:
    """Write ``source``'s tree into a new raw ext4 file ``image`` (``mke2fs -d``:
    no loop mount, no root-owned mount point), sized to fit with ``free_mb`` to
    spare, rounded up to a multiple of ``round_mb`` (so that images of similar
    trees have the same size).

    :return: the image size in MiB
    """
    used_mb = int(run(["du", "-sm", "--apparent-size", source]).stdout.split()[0])
    size_mb = -(-(used_mb + free_mb + 64) // round_mb) * round_mb
    run(
        [
            *("mke2fs", "-q", "-t", "ext4", "-L", label, "-E", "root_owner=0:0"),
            *("-d", source, "-F", image, f"{size_mb}M"),
        ],
        timeout=600,
    )
    return size_mb


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    base = path.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # Field 5 is the mount point, with space, tab, newline, backslash octal-escaped.
        point = Path(fields[4].encode().decode("unicode_escape"))
        if point == base or base in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_build_dir(path: Path) -> None:
    """Remove a (possibly stale) build directory without descending into mounts.

    Builds run mmdebstrap in a private mount namespace, so its /proc, /sys and
    /dev/pts mounts die with it; a directory left by an older build killed
    mid-way may still hold such mounts, and ``rm -r`` must never walk into a
    live /proc or /sys.  Detach them first.
    """
    for point in mounts_under(path):
        log.warning("unmounting %s left under a stale build directory", point)
        run(["umount", "--lazy", point])
    shutil.rmtree(path, ignore_errors=True)
