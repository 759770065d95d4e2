"""Many runs in a row through one lab (calibration, nightly matrices).

:class:`Batch` keeps a lab up for all its runs when this host needs one: the lab
``apflab lab up`` left running if there is one (left up afterwards), else one it
brings up (and stops at the end).  When L1 fails during a run, that run is an
ERROR and a fresh lab serves the next ones.  On a KVM host runs go direct.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from apflab import paths
from apflab.errors import ApflabError
from apflab.host import kvm
from apflab.lab import session
from apflab.lab.l1 import LabConfig
from apflab.run import dispatch
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
        if self.needs_lab and session.attach() is None:
            session.bring_up(self.lab_config)
            self.owned = True
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
        try:
            return dispatch.run(scenario, results, self.emit, run_id=run_id)
        except ApflabError as err:
            if not self.needs_lab:
                raise
            line = str(err).splitlines()[0]
            self.emit(f"== the lab failed ({line}); bringing up a fresh one")
            session.tear_down()
            session.bring_up(self.lab_config)
            self.owned = True
            return {"run_id": run_id, "verdict": "ERROR", "reason": f"lab: {line}"}
