"""A guest's serial console: watched while it boots, read for fatal lines after.

The console is a file QEMU writes (``-chardev file``); it is the one channel
that still speaks when SSH no longer does (a stalled or panicked kernel).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from apflab.errors import GuestBootFailed, GuestPanic

# Console lines that end a boot at once: the kernel will not recover from these.
PANIC_PATTERNS = (
    re.compile(r"Kernel panic - not syncing.*"),
    re.compile(r"BUG: .*"),
    re.compile(r"general protection fault.*"),
)
# Lines after which no login can ever succeed (systemd's status lines, colours removed)
BOOT_FATAL = (
    (re.compile(r"Freezing execution\.?"), "systemd cannot run on this kernel and froze"),
    (
        re.compile(r"Failed to start (?:\S+ )?(apflab-ssh-keys|ssh)\.service.*"),
        "a unit SSH login needs failed: no login can succeed",
    ),
    (
        # guest_images/common/overlay/usr/local/sbin/apflab-ssh-keys
        re.compile(r"apflab: no run key in fw_cfg.*"),
        "the run's SSH key did not reach the guest (no qemu_fw_cfg?): no login can succeed",
    ),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ConsoleWatch:
    """Reads a growing console log incrementally and spots fatal lines."""

    def __init__(self, path: Path, layer: str) -> None:
        self.path = path
        self.layer = layer
        self._offset = 0
        self._partial = ""
        self.last_growth = time.monotonic()
        self.last_line = ""

    def _new_lines(self) -> list[str]:
        """The complete lines written since the last read (a partial one waits)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        if data:
            self.last_growth = time.monotonic()
        text = self._partial + data.decode(errors="replace").replace("\r", "")
        lines = text.split("\n")
        self._partial = lines.pop()
        return lines

    def poll(self) -> list[str]:
        """Return complete new lines; raise :class:`GuestPanic` on a fatal one."""
        lines = self._new_lines()
        for line in reversed(lines):
            if line.strip():
                self.last_line = line.strip()
                break
        for line in lines:
            self._check(_ANSI.sub("", line))
        return lines

    def poll_panic(self) -> str | None:
        """After boot: read the new lines and return the first kernel panic among them
        (a BUG or GP fault may be survived: a finding for the verdict, not the end)."""
        for line in self._new_lines():
            if m := PANIC_PATTERNS[0].search(_ANSI.sub("", line)):
                return m.group(0).strip()
        return None

    def _check(self, line: str) -> None:
        for pat in PANIC_PATTERNS:
            if m := pat.search(line):
                raise GuestPanic(
                    f"{self.layer}: kernel reported a fatal error on its console: "
                    f"{m.group(0).strip()} (see {self.path})",
                    self.layer,
                    m.group(0).strip(),
                )
        for pat, why in BOOT_FATAL:
            if m := pat.search(line):
                raise GuestBootFailed(
                    f"{self.layer}: {why}: {m.group(0).strip()!r} on its console (see {self.path})",
                    self.layer,
                    m.group(0).strip(),
                    why,
                )


def console_faults(path: Path) -> list[str]:
    """Fatal kernel lines (panic, BUG, GP fault) in a console log, one each."""
    try:
        text = path.read_text(errors="replace").replace("\r", "")
    except OSError:
        return []
    return [
        m.group(0).strip()
        for line in text.splitlines()
        for pat in PANIC_PATTERNS
        if (m := pat.search(line))
    ]


def tail(path: Path, lines: int = 20) -> str:
    try:
        data = path.read_bytes()[-16384:].decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
