"""Build a Scenario from Avocado params (shared by the pressure and apf tests).

Every field of :class:`apflab.experiment.Scenario` can be set as a param of
the same name (yaml_to_mux variants, ``-p key=value``); unset ones keep the
calibrated defaults.
"""

from pathlib import Path
from typing import Any

from apflab import paths
from apflab.experiment import Scenario
from apflab.pressure import PressureSpec
from apflab.workload import WorkloadSpec


def _tristate(value: Any) -> bool | None:
    """``auto`` -> None, ``on``/``yes``/``true``/``1`` -> True, anything else False."""
    text = str(value).lower()
    return None if text == "auto" else text in ("on", "yes", "true", "1")


def from_params(params: Any, **overrides: Any) -> Scenario:
    d = Scenario()

    def get(name: str, default: Any) -> Any:
        value = params.get(name, default=default)
        return type(default)(value) if default is not None and value is not None else value

    kernel = params.get("kernel", default=None)
    initrd = params.get("initrd", default=None)
    swap_device = params.get("swap_device", default=None) or paths.lab_swap_device()
    fields: dict[str, Any] = dict(
        kernel=Path(kernel) if kernel else None,
        initrd=Path(initrd) if initrd else None,
        cmdline=get("cmdline", d.cmdline),
        image=get("image", d.image),
        guest_memory_mb=get("guest_memory", d.guest_memory_mb),
        guest_cpus=int(params.get("guest_cpus", default=paths.default_guest_cpus())),
        accel=params.get("accel", default=None),
        pressure=PressureSpec(
            limit_mb=get("limit", d.pressure.limit_mb),
            swap_mb=get("swap", d.pressure.swap_mb),
            swap_device=swap_device,
            guest_thp=_tristate(params.get("guest_thp", default="auto")),
        ),
        workload=WorkloadSpec(
            mb=get("working_set", d.workload.mb),
            procs=get("procs", d.workload.procs),
            rounds=get("rounds", d.workload.rounds),
            pattern=get("pattern", d.workload.pattern),
            pause_ms=get("pause_ms", d.workload.pause_ms),
            seed=get("seed", d.workload.seed),
        ),
        deadline_s=get("deadline", d.deadline_s),
        trace_buffer_kb=get("trace_buffer_kb", d.trace_buffer_kb),
    )
    fields.update(overrides)
    return Scenario(**fields)
