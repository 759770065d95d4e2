"""Many runs in a row through one lab (calibration, nightly matrices).

:class:`Batch` keeps a lab up for all its runs when this host needs one: the lab
``apflab lab up`` left running if there is one (left up afterwards), else one it
brings up on the first run (and stops at the end).  A run whose scenario asks for
another L1 kernel (``host_source``/``host_patch``/``host_config``: host-side KVM under
test) gets a lab booted on that kernel: the batch's own lab is replaced, a lab the
user left up is never touched (the run is refused).  When L1 fails during a run, that
run is an ERROR and a fresh lab serves the next ones.  On a KVM host runs go direct.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from apflab import paths
from apflab.errors import ApflabError, UsageError
from apflab.host import kvm
from apflab.kernel import KernelBuildError
from apflab.lab import session
from apflab.lab.l1 import LabConfig
from apflab.run import dispatch
from apflab.run.guest_kernel import ensure_built
from apflab.run.phases import Emit
from apflab.run.scenario import Scenario


class Batch:
    """``with Batch(emit) as batch: doc = batch.run(scenario, results_root)``."""

    def __init__(self, emit: Emit, lab_config: LabConfig | None = None) -> None:
        self.emit = emit
        self.lab_config = lab_config or LabConfig()
        self.needs_lab = not (kvm.probe().usable or paths.in_lab())
        self.owned = False

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.owned:
            session.tear_down()

    def run(self, scenario: Scenario, results: Path, run_id: str | None = None) -> dict[str, Any]:
        """One run; an L1 failure is this run's ERROR, and the next run gets a fresh lab.

        :raises UsageError: bad input (callers check every scenario first), or a lab the
            user left up runs another L1 kernel than the run needs (left untouched)
        """
        try:
            if self.needs_lab:
                self._ensure_lab(scenario)
            return dispatch.run(scenario, results, self.emit, run_id=run_id)
        except UsageError:
            raise
        except KernelBuildError as err:  # the kernel under test did not build: not the lab
            line = str(err).splitlines()[0]
            return {"run_id": run_id, "verdict": "ERROR", "reason": f"kernel build: {line}"}
        except ApflabError as err:
            if not self.needs_lab:
                raise
            line = str(err).splitlines()[0]
            self.emit(f"== the lab failed ({line}); the next run gets a fresh one")
            session.tear_down()
            self.owned = False
            return {"run_id": run_id, "verdict": "ERROR", "reason": f"lab: {line}"}

    def _ensure_lab(self, scenario: Scenario) -> None:
        """A lab up on the L1 kernel ``scenario`` asks for (built here; none: the lab
        image's kernel): the one that is up, or one this batch brings up."""
        config, sha256 = self.lab_config, None
        spec = scenario.host_kernel_spec()
        if spec is not None:
            built = ensure_built(spec, self.emit)
            config, sha256 = replace(config, kernel=built.bzimage), built.sha256
        if session.LabSession.path().is_file():
            if not self.owned:
                current = session.LabSession.load().host_kernel_sha256  # UsageError: gone
                if current != sha256:
                    raise UsageError(
                        "the lab that is up runs another L1 kernel than this run asks for "
                        "(host_source/host_patch/host_config): `apflab lab down` first"
                    )
                return
            try:
                if session.LabSession.load().host_kernel_sha256 == sha256:
                    return
                self.emit("== the next run needs another L1 kernel: replacing the lab")
            except UsageError as err:  # our own lab's QEMU is gone
                self.emit(f"== {err}; bringing up a fresh lab")
            session.tear_down()
        session.bring_up(config, host_kernel_sha256=sha256)
        self.owned = True
