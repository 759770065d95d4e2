"""Avocado plugins: ``apflab cleanup`` after every test and after every job.

A test that Avocado kills at its timeout (SIGTERM, then SIGKILL once
``runner.task.interval.from_soft_to_hard_termination`` has passed: 1 s by default)
may die before its undo stack ran.  Its QEMU dies with it (``PR_SET_PDEATHSIG``);
the rest — swap, cgroup, run dirs, tracefs instance — is in its run-state record.
These plugins replay such records, whatever ``avocado run`` ran the test:

* :class:`CleanupAfterTest` adds an ``exec-test`` task after each test that runs
  ``apflab cleanup`` (only records whose owner process is gone: another apflab run
  on the machine is left alone), whatever the test's outcome;
* :class:`CleanupAfterJob` does the same once more in the job process when the
  job's tests are done.

Registered in setup.cfg (``avocado.plugins.test.post``, ``avocado.plugins.job.prepost``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from avocado.core.nrunner.runnable import Runnable
from avocado.core.plugin_interfaces import JobPost, JobPre, PostTest

from apflab import undo
from apflab.host import leftovers

log = logging.getLogger("avocado.app")

#: every outcome of the test the cleanup task runs after
ANY_OUTCOME = ["pass", "fail", "error", "interrupted", "cancel", "skip", "warn"]


class CleanupAfterTest(PostTest):  # type: ignore[misc]
    name = "apflab-cleanup"
    description = "apflab cleanup after each test (undo what a killed test left behind)"

    def post_test_runnables(
        self, test_runnable: Any, suite_config: dict[str, Any] | None = None
    ) -> list[tuple[Any, list[str]]]:
        runnable = Runnable(
            "exec-test",
            sys.executable,
            "-m",
            "apflab",
            "cleanup",
            config=suite_config or {},
            name="apflab-cleanup",
        )
        return [(runnable, ANY_OUTCOME)]


class CleanupAfterJob(JobPre, JobPost):  # type: ignore[misc]
    name = "apflab-cleanup"
    description = "apflab cleanup when a job's tests are done"

    def pre(self, job: Any) -> None:
        pass

    def post(self, job: Any) -> None:
        assert leftovers  # imported for its side effect: the host undo kinds are known
        for line in undo.cleanup_stale():
            log.info("apflab cleanup: undone %s", line)
