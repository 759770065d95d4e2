"""One error tree for the whole library.

Every exception apflab raises derives from :class:`ApflabError` and chains its
cause (``raise X(...) from err``).  The command line maps each family to an
exit code (see :mod:`apflab.cli`):

* :class:`UsageError` — bad input; nothing on the host was changed.
* :class:`PreflightError` — the host cannot run this experiment as asked.
* everything else — an infrastructure fault during the run (verdict ERROR).
"""

from __future__ import annotations

import errno
from typing import TypeGuard


class ApflabError(Exception):
    """Root of every error raised by apflab."""


class UsageError(ApflabError):
    """Bad input from the user: a wrong path, value or option.

    The message is one line that names the thing and the fix.
    """


class PreflightError(ApflabError):
    """The host lacks something the experiment needs (root, a controller, KVM...)."""


class CommandError(ApflabError):
    """A command (local or over SSH) exited non-zero while ``check=True``."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class ImageBuildError(ApflabError):
    """Building a guest or lab image failed."""


class VMError(ApflabError):
    """A virtual machine misbehaved: launch, boot, QMP or shutdown."""


class VMLaunchError(VMError):
    """QEMU failed to start or died during boot.

    Carries the argv, the exit code (None while still running) and the tail of
    the console log, so the first report is the useful one.
    """

    def __init__(
        self, message: str, argv: list[str], exitcode: int | None, console_tail: str
    ) -> None:
        detail = f"{message}\n  argv: {' '.join(argv)}\n  exit code: {exitcode}"
        if console_tail:
            detail += "\n  console tail:\n    " + "\n    ".join(console_tail.splitlines())
        super().__init__(detail)
        self.summary = message
        self.argv = argv
        self.exitcode = exitcode
        self.console_tail = console_tail


class PortInUse(VMLaunchError):
    """QEMU could not bind its SSH forward port: another process took it first."""


class BootTimeout(VMError):
    """A guest did not become ready before its deadline."""


class GuestPanic(VMError):
    """A kernel panic (or equivalent fatal line) appeared on a console."""

    def __init__(self, message: str, layer: str, line: str) -> None:
        super().__init__(message)
        self.layer = layer
        self.line = line


class GuestBootFailed(VMError):
    """A boot that cannot succeed, said on the console (systemd froze, the unit that
    installs the run's SSH key failed): no point waiting for SSH, nor retrying the
    same kernel."""

    def __init__(self, message: str, layer: str, line: str, why: str) -> None:
        super().__init__(message)
        self.layer = layer
        self.line = line
        self.why = why


class SSHError(ApflabError):
    """An SSH connection or transfer failed."""


class LabError(ApflabError):
    """The nested lab (L1) could not be brought up or used."""


class HostError(ApflabError):
    """A host-side change (cgroup, swap, tracefs) failed."""


class AnalysisError(ApflabError):
    """A trace could not be read or analysed."""


def is_disk_full(err: BaseException) -> TypeGuard[OSError]:
    """A write that failed because the disk (or the quota) under it is full: the
    host's condition to name, not a bug of ours."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
