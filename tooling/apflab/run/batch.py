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
from apflab.errors import ApflabError
from apflab.host import kvm
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
        """One run; an L1 failure is this run's ERROR, and a fresh lab serves the next."""
        config, sha256 = self.lab_config, None
        if self.needs_lab:
            config, sha256 = self._lab_for(scenario)
            self._ensure_lab(config, sha256)
        try:
            return dispatch.run(scenario, results, self.emit, run_id=run_id)
        except ApflabError as err:
            if not self.needs_lab:
                raise
            line = str(err).splitlines()[0]
            self.emit(f"== the lab failed ({line}); bringing up a fresh one")
            session.tear_down()
            session.bring_up(config, host_kernel_sha256=sha256)
            self.owned = True
            return {"run_id": run_id, "verdict": "ERROR", "reason": f"lab: {line}"}

    def _lab_for(self, scenario: Scenario) -> tuple[LabConfig, str | None]:
        """The lab ``scenario`` runs in: L1 on its host kernel (built here), or the default."""
        spec = scenario.host_kernel_spec()
        if spec is None:
            return self.lab_config, None
        built = ensure_built(spec, self.emit)
        return replace(self.lab_config, kernel=built.bzimage), built.sha256

    def _ensure_lab(self, config: LabConfig, sha256: str | None) -> None:
        """A lab up on the L1 kernel ``sha256`` (None: the lab image's kernel)."""
        if session.LabSession.path().is_file():
            current = session.LabSession.load().host_kernel_sha256
            if current == sha256 or not self.owned:
                return  # the right lab; or the user's, which the run itself checks
            self.emit("== the next run needs another L1 kernel: replacing the lab")
            session.tear_down()
        session.bring_up(config, host_kernel_sha256=sha256)
        self.owned = True
