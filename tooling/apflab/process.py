"""Run local commands: one result type, argv lists only, check by default.

Modelled on :mod:`avocado.utils.process` but framework-free.  SSH commands
(:mod:`apflab.vm.ssh`) return the same :class:`CmdResult`.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from apflab.errors import CommandError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CmdResult:
    """What a finished command did.

    :ivar argv: the command as run
    :ivar exit_status: its exit status (negative: killed by that signal)
    :ivar stdout: standard output, decoded as UTF-8 with replacement
    :ivar stderr: standard error, likewise
    :ivar duration: wall time in seconds
    """

    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def describe(self, limit: int = 2000) -> str:
        """A short, human description for error messages."""
        out = self.stdout[-limit:].strip()
        err = self.stderr[-limit:].strip()
        parts = [f"`{shlex.join(self.argv)}` exited {self.exit_status} after {self.duration:.1f}s"]
        if err:
            parts.append(f"stderr: {err}")
        if out:
            parts.append(f"stdout: {out}")
        return "\n".join(parts)

    def check(self) -> CmdResult:
        """Return self, or raise :class:`CommandError` when the command failed."""
        if not self.ok:
            raise CommandError(self.describe(), self)
        return self


class Runner(Protocol):
    """Anything that runs an argv and returns a :class:`CmdResult`: a guest over
    SSH (:meth:`apflab.vm.qemu.Guest.run`), or L1 (:meth:`apflab.lab.l1.Lab.run`)."""

    def run(self, argv: Sequence[str], **kwargs: Any) -> CmdResult: ...


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input_text: str | None = None,
) -> CmdResult:
    """Run ``argv`` (never through a shell) and capture its output.

    :param check: raise :class:`CommandError` on a non-zero exit status
    :param timeout: seconds; on expiry the command is killed and a
        :class:`CommandError` raised whatever ``check`` says
    :param env: extra environment variables (merged over ``os.environ``)
    """
    args = tuple(os.fspath(a) for a in argv)
    full_env = None if env is None else {**os.environ, **env}
    log.debug("run: %s", shlex.join(args))
    start = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            input=input_text.encode() if input_text is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        result = CmdResult(
            args,
            -9,
            (err.stdout or b"").decode(errors="replace"),
            (err.stderr or b"").decode(errors="replace"),
            time.monotonic() - start,
        )
        raise CommandError(f"timed out after {timeout}s: {result.describe()}", result) from err
    except FileNotFoundError as err:
        result = CmdResult(args, 127, "", str(err), time.monotonic() - start)
        raise CommandError(f"command not found: {args[0]}", result) from err
    result = CmdResult(
        args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
        time.monotonic() - start,
    )
    return result.check() if check else result
