"""The scenario of one run, each option declared once.

Every field of :class:`Scenario` is one option, declared with :func:`opt`
(default, unit, help, check).  From that one declaration come:

* the ``apflab run`` flags, ``--name-with-dashes`` (:func:`apflab.cli.run.add_scenario_args`);
* the Avocado params of the functional tests, ``name`` (:meth:`Scenario.from_params`);
* the argv that runs the same scenario again inside the lab (:meth:`Scenario.argv`);
* the ``scenario`` section of run.json and verdict.json (:meth:`Scenario.to_dict`).

Adding an option is one edit here, plus the code that uses it.  Defaults are
calibrated on the nested lab (2-core host, TCG L1, KVM L2): docs/calibration.md
has the measurements behind them.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis import thresholds
from apflab.analysis.thresholds import Thresholds
from apflab.errors import UsageError
from apflab.kernel import (
    DEBIAN_SOURCES,
    DEFAULT_SOURCE,
    KernelSpec,
    check_bzimage,
    default_base_config,
    fragments,
    patches,
)
from apflab.run.pressure import PressureSpec, check_sizes
from apflab.run.workload import PATTERNS, WorkloadSpec

Check = Callable[[Any], str | None]


def positive(value: float | None) -> str | None:
    return None if value is None or value > 0 else "must be > 0"


def non_negative(value: float | None) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0"


def existing_file(value: Path | None) -> str | None:
    return None if value is None or value.is_file() else "does not exist or is not a file"


def host_config_fragment() -> Path:
    """What turns apflab's guest kernel config into a KVM host's (L1's) config."""
    return default_base_config().parent / "host.config"


def bzimage(value: Path | None) -> str | None:
    """An existing x86 bzImage (the boot protocol header), refused before any VM starts."""
    problem = existing_file(value)
    if value is None or problem:
        return problem
    try:
        check_bzimage(value)
    except UsageError as err:
        return str(err).removeprefix(f"kernel {value} ")
    return None


def block_device(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        mode = os.stat(value).st_mode
    except OSError:
        return "does not exist: name a block device of this host"
    return None if stat.S_ISBLK(mode) else "is not a block device"


@dataclass(frozen=True)
class Option:
    """One scenario option: the field of :class:`Scenario` of the same name.

    :ivar parse: text (a flag's value, an Avocado param) → value; raises ValueError
    :ivar check: the value → what is wrong with it, or None
    :ivar choices: the only values allowed (shown in the help)
    :ivar file: a file on the host: shipped into the lab, path mapped by :meth:`Scenario.argv`
    :ivar repeat: may be given several times: the value is a tuple of items
    """

    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    unit: str = ""
    choices: tuple[str, ...] = ()
    check: Check | None = None
    file: bool = False
    repeat: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, raw: object, check: bool = True) -> Any:
        """A raw value (text, or already typed from YAML) → the checked value.

        :param check: apply the option's check (False: a recorded value, e.g. a path
            that exists only inside the lab)
        :raises ValueError: with one line saying what is wrong
        """
        if raw is None:
            return self.default
        if self.repeat:
            items = raw if isinstance(raw, list | tuple) else [raw]
            return tuple(self._convert_one(item, check) for item in items)
        return self._convert_one(raw, check)

    def _convert_one(self, raw: object, check: bool) -> Any:
        text = str(raw)
        try:
            value = self.parse(text)
        except ValueError:
            kinds: dict[object, str] = {int: "an integer", float: "a number"}
            kind = kinds.get(self.parse, "valid")
            raise ValueError(f"{text!r} is not {kind}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
        problem = self.check(value) if self.check is not None and check else None
        if problem:
            raise ValueError(f"{text} {problem}" if self.file else f"{text!r} {problem}")
        return value

    def to_json(self, value: Any) -> Any:
        if self.repeat:
            return [str(v) if isinstance(v, Path) else v for v in value]
        return str(value) if isinstance(value, Path) else value


def opt(
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    unit: str = "",
    choices: tuple[str, ...] = (),
    check: Check | None = None,
    file: bool = False,
    repeat: bool = False,
) -> dict[str, Any]:
    """The metadata that makes a :class:`Scenario` field an option (see the module doc):
    ``name: int = field(default=3, metadata=opt("what it is", parse=int))``."""
    meta = {"parse": parse, "help": help, "unit": unit, "choices": choices, "check": check}
    return {"option": {**meta, "file": file, "repeat": repeat}}


@dataclass(frozen=True)
class Scenario:
    """Everything that defines one run (all of it recorded in run.json)."""

    kernel: Path | None = field(
        default=None,
        metadata=opt(
            "guest bzImage to judge (default: the image's)", parse=Path, check=bzimage, file=True
        ),
    )
    initrd: Path | None = field(
        default=None,
        metadata=opt(
            "initrd for --kernel (default: none for a kernel apflab built, else the image's)",
            parse=Path,
            check=existing_file,
            file=True,
        ),
    )
    patch: tuple[Path, ...] = field(
        default=(),
        metadata=opt(
            "build the guest kernel with this patch (diff -u / git diff, applied with -p1 to "
            "--kernel-source); repeatable",
            parse=Path,
            check=existing_file,
            file=True,
            repeat=True,
        ),
    )
    kernel_source: str | None = field(
        default=None,
        metadata=opt(
            f"build the guest kernel from this source: {', '.join(DEBIAN_SOURCES)} "
            f"(the default with --patch or --kernel-config: {DEFAULT_SOURCE}), a kernel "
            "git tree or a tarball",
        ),
    )
    kernel_config: tuple[Path, ...] = field(
        default=(),
        metadata=opt(
            "merge this config fragment (CONFIG_X=y lines) into the built guest kernel's "
            "config; repeatable",
            parse=Path,
            check=existing_file,
            file=True,
            repeat=True,
        ),
    )
    cmdline: str = field(default="", metadata=opt("extra guest kernel command line"))
    boot: str = field(
        default="cold",
        metadata=opt(
            "saved: restore the guest from a saved boot (made by the first run of each "
            "kernel and guest size, kept in the machine cache); cold: boot it every run",
            choices=("saved", "cold"),
        ),
    )
    image: str = field(default="guest", metadata=opt("guest image recipe (guest_images/NAME)"))
    guest_memory: int = field(
        default=1024, metadata=opt("guest RAM", parse=int, unit="MB", check=positive)
    )
    guest_cpus: int | None = field(
        default=None,
        metadata=opt(
            "guest vCPUs; default: 2 on a KVM host, 1 inside the nested lab",
            parse=int,
            check=positive,
        ),
    )
    limit: int = field(
        default=256,
        metadata=opt("memory limit on the guest's QEMU", parse=int, unit="MB", check=positive),
    )
    swap: int = field(
        default=2048,
        metadata=opt(
            "swap file size when no swap disk is given", parse=int, unit="MB", check=positive
        ),
    )
    swap_device: str | None = field(
        default=None,
        metadata=opt("use this block device as swap", check=block_device, file=False),
    )
    guest_thp: str = field(
        default="auto",
        metadata=opt(
            "back guest RAM with transparent huge pages; auto: off under cgroup v1 "
            "(THP-backed QEMU was OOM-killed there), on under v2",
            choices=("auto", "on", "off"),
        ),
    )
    working_set: int = field(
        default=100, metadata=opt("per process", parse=int, unit="MB", check=positive)
    )
    procs: int = field(
        default=3, metadata=opt("guest processes touching memory", parse=int, check=positive)
    )
    rounds: int = field(
        default=2, metadata=opt("passes after the first fill", parse=int, check=non_negative)
    )
    pattern: str = field(default="bursty", metadata=opt("access pattern", choices=PATTERNS))
    pause_ms: int = field(
        default=500, metadata=opt("sleep between rounds", parse=int, unit="MS", check=non_negative)
    )
    seed: int = field(default=1, metadata=opt("random seed of the access pattern", parse=int))
    deadline: float = field(
        default=300.0,
        metadata=opt(
            "workload deadline; passing it with page-readies outstanding is a FAIL",
            parse=float,
            unit="S",
            check=positive,
        ),
    )
    trace_buffer_kb: int = field(
        default=8192,
        metadata=opt("trace ring buffer per CPU", parse=int, unit="KB", check=positive),
    )
    host_source: str | None = field(
        default=None,
        metadata=opt(
            "nested lab only: build L1's kernel (the KVM host) from this source, with "
            "guest_images/kernel/config/host.config; like --kernel-source",
        ),
    )
    host_patch: tuple[Path, ...] = field(
        default=(),
        metadata=opt(
            "nested lab only: apply this patch to L1's kernel (host-side KVM under test); "
            "repeatable",
            parse=Path,
            check=existing_file,
            file=True,
            repeat=True,
        ),
    )
    host_config: tuple[Path, ...] = field(
        default=(),
        metadata=opt(
            "nested lab only: merge this config fragment into L1's kernel; repeatable",
            parse=Path,
            check=existing_file,
            file=True,
            repeat=True,
        ),
    )
    trace: str = field(
        default="on",
        metadata=opt(
            "on: the ring buffer's pages streamed as they are (trace_pipe_raw, decoded on "
            "the outer host); text: trace_pipe's text streamed (the kernel formats every "
            "event, in L1's CPU time); off: no tracing, only to measure the tracer's own cost "
            "(make bench): such a run gets no verdict; record: the events stay in the ring "
            "buffer (--trace-buffer-kb) until the workload ends, read then both as text and "
            "raw, so the cost of recording shows apart from the reader's (make bench; no "
            "live stall watch)",
            choices=("on", "text", "off", "record"),
        ),
    )
    thresholds: Path | None = field(
        default=None,
        metadata=opt(
            "verdict bounds: a JSON file overriding the profile of where the guest runs "
            "(nested-lab or bare-metal; see analysis/thresholds.py)",
            parse=Path,
            check=existing_file,
            file=True,
        ),
    )
    accel: str | None = field(
        default=None,
        metadata=opt(
            "tcg: pressure machinery only, no async PF (never a PASS)", choices=("kvm", "tcg")
        ),
    )

    # -- the derivations -----------------------------------------------------
    @staticmethod
    def options() -> list[Option]:
        """The declared options, in declaration order."""
        out = []
        for f in dataclasses.fields(Scenario):
            meta = f.metadata["option"]
            out.append(Option(f.name, f.default, **meta))
        return out

    @classmethod
    def from_values(cls, values: Mapping[str, object], check: bool = True) -> Scenario:
        """Options from raw values (text or typed); missing ones keep their defaults.

        :param check: apply each option's check (False for a recorded scenario)
        :raises UsageError: a value does not parse or fails its check (one line)
        """
        fields: dict[str, Any] = {}
        for opt in cls.options():
            try:
                fields[opt.name] = opt.convert(values.get(opt.name), check)
            except ValueError as err:
                raise UsageError(f"{opt.name}: {err}") from None
        return cls(**fields)

    @classmethod
    def from_params(cls, params: Any, **overrides: object) -> Scenario:
        """From Avocado params of the same names (``-p limit=192``, yaml_to_mux)."""
        values = {o.name: params.get(o.name, default=None) for o in cls.options()}
        return cls.from_values({**values, **overrides})

    def argv(self, file_dir: str | None = None) -> list[str]:
        """The ``apflab run`` options that reproduce this scenario (non-defaults only).

        :param file_dir: where the files of ``file`` options are inside the lab
        """
        argv: list[str] = []
        for opt in self.options():
            value = getattr(self, opt.name)
            if value == opt.default:
                continue
            for item in value if opt.repeat else (value,):
                where = Path(file_dir) / Path(item).name if opt.file and file_dir else item
                argv += [opt.flag, str(where)]
        return argv

    def files(self) -> list[Path]:
        """The host files this scenario needs (to ship into the lab)."""
        out: list[Path] = []
        for opt in self.options():
            value = getattr(self, opt.name)
            if opt.file and value is not None:
                out += list(value) if opt.repeat else [value]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {o.name: o.to_json(getattr(self, o.name)) for o in self.options()}

    def validate(self) -> None:
        """Every option's own check, then whether the sizes fit together.

        :raises UsageError: one line naming the option and the fix
        """
        for opt in self.options():
            value = getattr(self, opt.name)
            if value != opt.default:
                try:
                    opt.convert(value)
                except ValueError as err:
                    raise UsageError(f"{opt.flag}: {err}") from None
        self._check_files()
        if self.kernel is not None and self.kernel_spec() is not None:
            raise UsageError(
                "--kernel names a built kernel; --patch, --kernel-config and --kernel-source "
                "build one: give one or the other"
            )
        check_sizes(self.pressure_spec(), self.workload_spec().total_mb, self.guest_memory)

    def _check_files(self) -> None:
        """The content of the files given, before anything is built or booted: each
        patch is a diff, each config fragment parses, the thresholds file loads."""
        for patch in (*self.patch, *self.host_patch):
            patches.read_patch(patch)
        for fragment in (*self.kernel_config, *self.host_config):
            try:
                text = fragment.read_text()
            except (OSError, UnicodeDecodeError) as err:
                raise UsageError(f"config fragment {fragment}: cannot read it ({err})") from None
            fragments.parse_fragment(text, str(fragment))
        if self.thresholds is not None:
            self.verdict_bounds(paths.in_lab())

    def verdict_bounds(self, in_lab: bool) -> Thresholds:
        """The bounds the verdict applies: the profile of where the guest ran, with
        the ``thresholds`` file's changes."""
        base = thresholds.for_host(in_lab)
        return thresholds.load(self.thresholds, base) if self.thresholds else base

    def host_kernel_spec(self) -> KernelSpec | None:
        """L1's kernel to build (the nested lab's KVM host), or None (the lab image's)."""
        if not (self.host_patch or self.host_config or self.host_source):
            return None
        return KernelSpec(
            source=self.host_source or DEFAULT_SOURCE,
            patches=self.host_patch,
            configs=(host_config_fragment(), *self.host_config),
        )

    def kernel_spec(self) -> KernelSpec | None:
        """The guest kernel to build, or None (the image's kernel, or ``kernel``)."""
        if not (self.patch or self.kernel_config or self.kernel_source):
            return None
        return KernelSpec(
            source=self.kernel_source or DEFAULT_SOURCE,
            patches=self.patch,
            configs=self.kernel_config,
        )

    # -- views for the parts of the experiment -------------------------------
    def pressure_spec(self) -> PressureSpec:
        """Inside the lab a scenario without a swap device uses L1's swap disk."""
        return PressureSpec(
            limit_mb=self.limit,
            swap_mb=self.swap,
            swap_device=self.swap_device or paths.lab_swap_device(),
            guest_thp=None if self.guest_thp == "auto" else self.guest_thp == "on",
        )

    def workload_spec(self) -> WorkloadSpec:
        return WorkloadSpec(
            mb=self.working_set,
            procs=self.procs,
            rounds=self.rounds,
            pattern=self.pattern,
            pause_ms=self.pause_ms,
            seed=self.seed,
        )

    def guest_cpus_here(self) -> int:
        return self.guest_cpus or paths.default_guest_cpus()
