"""The machine-wide kernel cache: where it is, its keys, its locks, and tree copies.

Layout under :func:`cache_dir`::

    <key16>/{bzImage,config,build.log,meta.json}   one built kernel (published atomically)
    <key16>.lock                                   flock held while that key is built
    base/<key16>/                                  the built tree of an unpatched key,
                                                   kept for incremental patched builds
    src/<source>/                                  each source, extracted once (read only)
    ccache/                                        the compiler cache of all builds
    tmp/                                           work dirs of builds in progress

The cache lives outside any clone (default ``/var/cache/apflab/kernels``), so CI jobs and
later runs on the same machine share it; ``APFLAB_KERNEL_CACHE`` or a ``cache=`` argument
moves it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from apflab.errors import ApflabError

DEFAULT_CACHE = Path("/var/cache/apflab/kernels")
#: bumped whenever the builder changes what a key builds (config recipe, make flags...)
FORMAT_VERSION = "apflab-kernel-1"


class KernelBuildError(ApflabError):
    """A kernel could not be fetched, configured or built (the log says why)."""


def cache_dir(override: Path | None = None) -> Path:
    """The kernel cache: ``override``, else ``$APFLAB_KERNEL_CACHE``, else the default."""
    if override is not None:
        return override
    env = os.environ.get("APFLAB_KERNEL_CACHE")
    return Path(env) if env else DEFAULT_CACHE


def compute_key(
    source_identity: str,
    patches: Sequence[bytes],
    configs: Sequence[bytes],
    toolchain: str,
    format_version: str = FORMAT_VERSION,
) -> str:
    """The sha256 (hex) naming one kernel build.

    Over the source identity, each patch's content in order, each config layer's content in
    order (the project's base config first), the compiler's version line and the builder's
    format version.  File names do not count: a renamed patch is the same kernel.
    Every part is length-prefixed, so no two different inputs share a byte stream.
    """
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(f"{label} {len(data)}\n".encode())
        h.update(data)

    part("format", format_version.encode())
    part("source", source_identity.encode())
    part("toolchain", toolchain.encode())
    for data in patches:
        part("patch", data)
    for data in configs:
        part("config", data)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path, progress: Callable[[str], None], what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block; say so when we must wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting: another process is building {what} (lock {path})")
            start = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            progress(f"waiting: lock on {what} acquired after {time.monotonic() - start:.0f}s")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a tree of hard links to ``src``'s files (``cp -al``): instant, no space.

    Safe for a build tree: ``patch`` replaces the files it changes (a new inode), and make
    only creates files the pristine source does not have.
    """
    _clone(src, dst, link=lambda st: True)


def clone_build_tree(src: Path, dst: Path) -> None:
    """Copy a built tree for an incremental build: build outputs are copied, sources linked.

    A file linked more than once (shared with the pristine source) is a source, never
    written by make: it is linked.  Every other file (an object, a generated header, a
    .cmd file) is copied with its mtime, so make in ``dst`` rebuilds only what changes
    and can never write into ``src``.
    """
    _clone(src, dst, link=lambda st: st.st_nlink > 1)


def _clone(src: Path, dst: Path, link: Callable[[os.stat_result], bool]) -> None:
    dst.mkdir(parents=True)
    dirs: list[tuple[Path, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target = dst / rel
        for name in dirnames:
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(Path(dirpath) / name), target / name)
            else:
                (target / name).mkdir()
                dirs.append((target / name, st))
        for name in filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), target / name)
            elif link(st):
                try:
                    os.link(path, target / name)
                except OSError:  # another filesystem, or links not allowed: copy
                    shutil.copy2(path, target / name)
            else:
                shutil.copy2(path, target / name)
    for path, st in reversed(dirs):  # directory mtimes, after their contents are written
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def dir_bytes(path: Path, count_links_once: bool = True) -> int:
    """Disk bytes of a tree; a hard-linked file counts only where it is not shared."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISREG(st.st_mode) and (not count_links_once or st.st_nlink == 1):
                total += st.st_blocks * 512
    return total


def remove_tree(path: Path) -> None:
    """Remove a work tree (ours), tolerating it being gone already."""
    shutil.rmtree(path, ignore_errors=True)
