"""Exit codes of every ``apflab`` command (also in README.md).

====  =====================================================================
0     success; for ``run``: verdict PASS
1     ``run``: verdict FAIL (the kernel broke the async-PF protocol or a bound);
      ``cleanup --check``: something was left behind; ``check-functional``: a test failed
2     ``run``: verdict INVALID (the evidence is incomplete: no verdict possible)
3     ERROR: an infrastructure fault (QEMU, lab, SSH, host change failed)
4     bad input or a failed pre-flight check: nothing on the host was changed
130   interrupted (SIGINT); 143: terminated (SIGTERM) — cleanup ran in both
====  =====================================================================
"""

from __future__ import annotations

EXIT_OK, EXIT_FAIL, EXIT_INVALID, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 3, 4
VERDICT_EXIT = {"PASS": EXIT_OK, "FAIL": EXIT_FAIL, "INVALID": EXIT_INVALID, "ERROR": EXIT_ERROR}


def verdict_exit(verdict: str | None) -> int:
    """The exit code of a verdict word (ERROR for anything unknown)."""
    return VERDICT_EXIT.get(verdict or "ERROR", EXIT_ERROR)
