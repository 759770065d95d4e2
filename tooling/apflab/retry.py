"""One retry policy for every layer: what is retried, how often, and every attempt kept.

apflab retries only faults that say nothing about the kernel under test and
that a fresh try can honestly clear.  Each is one :class:`Policy` in
:data:`POLICIES`; each use goes through a :class:`Retrier`, which logs every
failed attempt with its first line, keeps where its logs went, and is
reported in verdict.json (``retries``), so a retry never hides a first error.

==============  =======  ===============================================================
policy          retries  what fails, and why a retry is honest
==============  =======  ===============================================================
``qemu-port``   2        QEMU could not bind the SSH forward port: another process took
                         it between our choosing it and QEMU binding it (a race)
``guest-boot``  1        a guest boot stuck with its console silent, or a kernel panic
                         during boot: seen with the stock kernel in the nested lab
``lab``         1        L1 itself failed (panic under TCG, died, did not boot): the
                         whole lab attempt runs again on a fresh L1, so one
                         ``apflab run`` boots L1 at most twice
``lab-suite``   2        the functional suite's lab phase: a fresh L1 after an L1
                         failure, the interrupted test file again; 2 failures in all
==============  =======  ===============================================================

Usage::

    retrier = Retrier(POLICIES["lab"], retry_on=(LabError,))
    result = retrier.run(lambda attempt: bring_up_and_run(attempt))
    doc["retries"]["lab"] = retrier.to_dict()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    """What may be retried and how often.

    :ivar name: the policy's key in :data:`POLICIES` and in verdict.json
    :ivar retries: failures one :class:`Retrier` tolerates before it gives up
    :ivar why: why a retry is honest here
    """

    name: str
    retries: int
    why: str


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            "qemu-port",
            2,
            "the SSH forward port was taken between choosing it and QEMU binding it",
        ),
        Policy(
            "guest-boot",
            1,
            "a boot stuck or panicked before SSH: seen with the stock kernel in the nested lab",
        ),
        Policy("lab", 1, "L1 itself failed (TCG panic, death, no boot): says nothing of L2"),
        Policy("lab-suite", 2, "the suite's lab phase: a fresh L1 after an L1 failure"),
    )
}


@dataclass
class Attempt:
    """One try: its number, how long it took, how it failed (None: it succeeded)."""

    number: int
    seconds: float
    error: str | None = None
    logs: str | None = None


@dataclass
class Retrier:
    """Runs operations under one :class:`Policy`, keeping every attempt.

    The budget is per retrier: ``policy.retries`` failures in all, however
    many operations it runs (the suite's lab phase runs one per test file).

    :ivar retry_on: exception types that count as a retryable failure; any
        other exception propagates at once
    """

    policy: Policy
    retry_on: tuple[type[BaseException], ...]
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for a in self.attempts if a.error is not None)

    @property
    def exhausted(self) -> bool:
        return self.failures > self.policy.retries

    def run(
        self,
        fn: Callable[[int], T],
        *,
        logs: Callable[[int], str] | None = None,
        between: Callable[[BaseException], None] | None = None,
    ) -> T:
        """Call ``fn(attempt_number)`` until it returns or the budget is spent.

        :param logs: where attempt N keeps its logs (recorded with the attempt)
        :param between: called after a retryable failure, before the next try
            (e.g. tear the failed VM down, move its console log aside)
        :raises: the last failure when the budget is spent
        """
        while True:
            number = len(self.attempts) + 1
            start = time.monotonic()
            where = logs(number) if logs is not None else None
            try:
                result = fn(number)
            except self.retry_on as err:
                line = str(err).splitlines()[0] if str(err) else type(err).__name__
                self.attempts.append(Attempt(number, time.monotonic() - start, line, where))
                if self.exhausted:
                    log.error("%s: attempt %d failed, no retry left: %s", self.name, number, line)
                    raise
                log.warning("%s: attempt %d failed (%s); retrying", self.name, number, line)
                if between is not None:
                    between(err)
                continue
            self.attempts.append(Attempt(number, time.monotonic() - start, None, where))
            return result

    @property
    def name(self) -> str:
        return self.policy.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": asdict(self.policy),
            "attempts": [asdict(a) | {"seconds": round(a.seconds, 1)} for a in self.attempts],
        }
