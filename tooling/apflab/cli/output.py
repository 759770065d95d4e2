"""Progress lines for the user, which never stop a run.

A run's progress goes to its terminal or CI log; when that reader goes away (a
pipe closed: ``apflab run | head``, a CI runner or test harness that died), the run
itself must go on, unwind its host changes and write its results: the rest of the
lines go to /dev/null (the run's own logs keep everything that matters), as the
Python docs advise for SIGPIPE.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

log = logging.getLogger(__name__)


def _say(line: str, stream: TextIO) -> None:
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # what is buffered and what follows: dropped
        os.close(devnull)
        log.warning("output closed by its reader: progress lines dropped from here on")


def emit(line: str) -> None:
    """A progress line on stdout."""
    _say(line, sys.stdout)


def emit_err(line: str) -> None:
    """A progress line on stderr (commands whose stdout is their result)."""
    _say(line, sys.stderr)
