"""Where apflab keeps things on the host.

* cache — built images, the workload binary and the lab's wheels, keyed by input
  hash (``APFLAB_CACHE``, default ``/var/cache/apflab``): machine-wide, outside any
  clone, so a fresh clone and CI on the same machine reuse what is still valid.
* kernel cache — built guest/host kernels (:mod:`apflab.kernel`): machine-wide,
  outside any clone, so later runs and CI on the same machine reuse them.
* runtime root — per-run scratch dirs (QMP sockets, overlays, keys) and the
  run-state records that ``apflab cleanup`` reads (``APFLAB_RUNTIME``, default
  ``/var/tmp/apflab``).  Everything under it belongs to a run and is removed by
  that run's undo; the root itself is removed when it becomes empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from apflab.errors import CommandError


def cache_dir() -> Path:
    env = os.environ.get("APFLAB_CACHE")
    return Path(env) if env else Path("/var/cache/apflab")


def runtime_root() -> Path:
    return Path(os.environ.get("APFLAB_RUNTIME", "/var/tmp/apflab"))


def state_dir() -> Path:
    return runtime_root() / "state"


def new_run_id(prefix: str = "") -> str:
    """A sortable, unique run id: ``[prefix-]YYYYmmdd-HHMMSS-xxxx``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rid = f"{stamp}-{secrets.token_hex(2)}"
    return f"{prefix}-{rid}" if prefix else rid


def repo_root() -> Path | None:
    """The source checkout this package runs from, if any (has guest_images/)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "guest_images").is_dir() and (parent / "setup.cfg").is_file():
            return parent
    return None


#: in a copy of a checkout without its .git (the lab's assets disk): the commit copied
COMMIT_FILE = ".apflab-commit"


def repo_commit() -> str | None:
    """The commit of the checkout apflab runs from (None: not a git checkout, nor a
    copy of one that says which commit it is)."""
    repo = repo_root()
    if repo is not None and (repo / COMMIT_FILE).is_file():
        return (repo / COMMIT_FILE).read_text().strip() or None
    if repo is None or not (repo / ".git").exists():
        return None
    from apflab.process import run  # noqa: PLC0415  (process imports nothing of paths)

    try:
        out = run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=False, timeout=10)
    except CommandError:
        return None
    return out.stdout.strip() or None


def in_lab() -> bool:
    """Are we running inside the nested lab's L1 (set by :mod:`apflab.lab`)?"""
    return os.environ.get("APFLAB_IN_LAB") == "1"


def lab_swap_device() -> str | None:
    """Inside the lab: L1's dedicated swap disk (set by :mod:`apflab.lab`); else None."""
    return os.environ.get("APFLAB_LAB_SWAP_DEVICE") if in_lab() else None


def default_guest_cpus() -> int:
    """vCPUs of a guest under test when the scenario does not say.

    2 on a KVM host; 1 inside the nested lab, where 2-vCPU L2 guests hung in
    early boot (4 of 4 boots with single-threaded TCG) and reset silently under
    async-PF load (3 of 5 default runs), while 1-vCPU guests did neither in 6
    runs (docs/calibration.md).
    """
    return 1 if in_lab() else 2


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) for the block:
    two processes building one cache entry do it one after the other."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content, hex."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
