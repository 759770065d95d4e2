"""Named, timed phases of a run, reported as they happen."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Emit = Callable[[str], None]


class Phases:
    """Names each phase with its elapsed time, as it happens; keeps the times."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.t0 = time.monotonic()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        self.emit(f"[{start - self.t0:7.1f}s] {name} ...")
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.times[name] = round(took, 1)
            self.emit(f"[{time.monotonic() - self.t0:7.1f}s] {name} done in {took:.1f}s")
