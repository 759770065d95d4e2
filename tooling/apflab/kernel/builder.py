"""Cached guest-kernel builds: a source, patches and config fragments in, a bzImage out.

::

    spec = KernelSpec(patches=(Path("guest_images/kernel/patches/no-ack.patch"),))
    check(spec)                      # seconds: every input problem, one line each
    kernel = build(spec, progress=print)
    kernel.bzimage, kernel.release, kernel.how   # ... "incremental"

How a key is built (:func:`build`):

* ``cached`` — ``<cache>/<key16>/`` exists: nothing is built.
* ``cold`` — an unpatched key: the pristine source is hard-linked into
  ``<cache>/base/<key16>/tree``, configured (``make tinyconfig`` +
  ``kernel/configs/kvm_guest.config`` + the project's base config and version layers + the
  fragments, then ``make olddefconfig``, then a check that every line took) and built with
  ``make -j$(nproc) bzImage`` through ccache.  The built tree is kept there.  (A patched
  key whose base tree is missing builds that first: also ``cold``.)
* ``incremental`` — a patched key: the base tree of the same source and config is moved
  aside and cloned back into its own path (objects copied with their mtimes, sources
  linked), the patches are applied (patched files get a new mtime) and make rebuilds only
  what they change; then the base tree is put back.  Only the bzImage, config, log and
  meta.json are kept.  The result is bit-identical to a from-scratch build of that key.

The builder never installs anything on the host and never writes outside the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from apflab import paths
from apflab.errors import CommandError, PreflightError, UsageError
from apflab.kernel import bzimage, fragments, make, patches, sources
from apflab.kernel import cache as kcache
from apflab.kernel.cache import KernelBuildError
from apflab.process import run

Progress = Callable[[str], None]

#: Layers every build gets, from the source tree, before the project's base config.
SOURCE_LAYERS = ("kernel/configs/kvm_guest.config",)
RECIPE = "make tinyconfig + kernel/configs/kvm_guest.config + base config + fragments"
ARCH = "x86_64"


def _print(line: str) -> None:
    print(line, flush=True)


def default_base_config() -> Path:
    """``guest_images/kernel/config/base.config`` of this checkout."""
    root = paths.repo_root()
    if root is None:
        raise UsageError(
            "no apflab checkout found for guest_images/kernel/config/base.config; "
            "run from a clone or pass KernelSpec(base_config=...)"
        )
    return root / "guest_images" / "kernel" / "config" / "base.config"


def patches_dir() -> Path:
    """``guest_images/kernel/patches`` of this checkout (the project's control patches)."""
    return default_base_config().parent.parent / "patches"


@dataclass(frozen=True)
class KernelSpec:
    """What to build.

    :ivar source: ``debian-6.1`` (default), ``debian-6.12``, a kernel git tree or a tarball
    :ivar patches: applied in order with ``patch -p1``
    :ivar configs: fragments merged in order over the base config (later lines win)
    :ivar base_config: None for the project's ``guest_images/kernel/config/base.config``
    """

    source: str = sources.DEFAULT_SOURCE
    patches: tuple[Path, ...] = ()
    configs: tuple[Path, ...] = ()
    base_config: Path | None = None


@dataclass(frozen=True)
class BuiltKernel:
    """A built kernel in the cache.

    :ivar bzimage: the kernel to boot (``<cache>/<key16>/bzImage``)
    :ivar release: ``make kernelrelease`` (what ``uname -r`` says)
    :ivar sha256: of the bzImage
    :ivar key: the full cache key
    :ivar source: kind, name, version, identity
    :ivar patches: ``{path, sha256}`` in order
    :ivar configs: ``{path, sha256}`` in order, the base config first
    :ivar build_seconds: wall time of this :func:`build` call
    :ivar how: ``cached``, ``incremental`` or ``cold`` (this call)
    :ivar built: how the cache entry was made, when and in how long (from meta.json)
    """

    bzimage: Path
    release: str
    sha256: str
    key: str
    source: dict[str, str]
    patches: list[dict[str, str]]
    configs: list[dict[str, str]]
    build_seconds: float
    how: str
    config: Path
    log: Path
    built: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``kernel`` section of verdict.json."""
        return {
            "bzimage": str(self.bzimage),
            "release": self.release,
            "sha256": self.sha256,
            "key": self.key,
            "source": dict(self.source),
            "patches": [dict(p) for p in self.patches],
            "configs": [dict(c) for c in self.configs],
            "config_recipe": RECIPE,
            "config": str(self.config),
            "build_log": str(self.log),
            "build_seconds": round(self.build_seconds, 1),
            "how": self.how,
            "built": dict(self.built),
        }


@dataclass(frozen=True)
class _Plan:
    """Everything :func:`check` resolved: what :func:`build` needs."""

    ref: sources.SourceRef
    tree: Path  # the pristine extracted source
    patches: tuple[tuple[Path, bytes], ...]
    configs: tuple[tuple[Path, bytes], ...]  # base config first
    settings: tuple[fragments.Setting, ...]  # base config + fragments, in order
    patch_symbols: frozenset[str]  # Kconfig symbols only the patches define
    toolchain: str
    key: str
    base_key: str  # the same source and config without patches

    @property
    def key16(self) -> str:
        return self.key[:16]


# -- check ---------------------------------------------------------------------
def check(spec: KernelSpec, progress: Progress = _print, cache: Path | None = None) -> None:
    """Everything checkable before a build, in seconds (plus a first fetch and extract).

    :raises UsageError: one line naming the file and the fix: a missing source, a Debian
        source apt does not offer, a patch that is missing, not a diff, or does not apply,
        a config line that is malformed, ``=m``, or names no Kconfig symbol of the source
    :raises PreflightError: the host lacks a build tool (flex, bison, libelf-dev...)
    """
    _plan(spec, progress, kcache.cache_dir(cache))


def _plan(spec: KernelSpec, progress: Progress, root: Path) -> _Plan:
    # the inputs first (milliseconds), then the source (a first fetch takes a minute)
    base = spec.base_config or default_base_config()
    user = [(p, _read_fragment_bytes(p)) for p in (base, *spec.configs)]
    for path, data in user:
        fragments.parse_fragment(data.decode(), str(path))
    patch_texts = [patches.read_patch(p) for p in spec.patches]
    toolchain = _toolchain()
    _writable(root)
    ref = sources.resolve(spec.source)
    tree = sources.extracted(ref, root, progress)
    version = sources.parse_kernel_version((tree / "Makefile").read_text()[:2000])
    layers = [(p, _read_fragment_bytes(p)) for p in version_layers(base.parent, version)]
    configs = (user[0], *layers, *user[1:])
    settings = [s for p, data in configs for s in fragments.parse_fragment(data.decode(), str(p))]
    known = fragments.kconfig_symbols(tree)
    added = frozenset(s for t in patch_texts for s in fragments.symbols_added_by_patch(t)) - known
    fragments.check_symbols(settings, known | added, ref.describe())
    if spec.patches:
        patches.dry_run(tree, spec.patches, ref.describe())
    patch_bytes = tuple((p, t.encode()) for p, t in zip(spec.patches, patch_texts, strict=True))
    config_bytes = [data for _p, data in configs]

    def key(with_patches: Sequence[bytes]) -> str:
        return kcache.compute_key(ref.identity, with_patches, config_bytes, toolchain)

    return _Plan(
        ref=ref,
        tree=tree,
        patches=patch_bytes,
        configs=configs,
        settings=tuple(settings),
        patch_symbols=added,
        toolchain=toolchain,
        key=key([data for _p, data in patch_bytes]),
        base_key=key([]),
    )


def version_layers(config_dir: Path, kernel_version: str) -> list[Path]:
    """The version layers in ``config_dir`` that apply to a source of ``kernel_version``.

    ``since-X.Y.config`` applies to sources of version X.Y and later, ``before-X.Y.config``
    to older ones; they follow the base config, ordered by X.Y.  A setting whose symbol
    exists only in some versions (6.1's BASE_FULL, 6.2's SLUB_TINY) lives there, so the
    base config stays valid for every source.
    """
    have = _major_minor(kernel_version)
    found = []
    for path in config_dir.glob("*.config"):
        kind, _, bound = path.name[: -len(".config")].partition("-")
        edge = _major_minor(bound)
        if kind not in ("since", "before") or edge is None or have is None:
            continue
        if (have >= edge) == (kind == "since"):
            found.append((edge, kind, path))
    return [path for _edge, _kind, path in sorted(found)]


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0].split("+")[0])
    except (IndexError, ValueError):
        return None


def _writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreflightError(
            f"kernel cache {root} cannot be created ({err.strerror}); set "
            "APFLAB_KERNEL_CACHE to a directory of yours"
        ) from err
    if not os.access(root, os.W_OK | os.X_OK):
        raise PreflightError(
            f"kernel cache {root} is not writable; set APFLAB_KERNEL_CACHE to a directory of yours"
        )


def _read_fragment_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UsageError(
            f"config fragment {path}: no such file; give a file of CONFIG_X=y lines "
            "(see guest_images/kernel/README.md)"
        )
    data = path.read_bytes()
    try:
        data.decode()
    except UnicodeDecodeError as err:
        raise UsageError(f"config fragment {path} is not UTF-8 text") from err
    return data


def _toolchain() -> str:
    """The compiler and linker version lines: a host upgrade is a new key."""
    missing = make.missing_tools()
    if missing:
        raise PreflightError(
            f"building a kernel needs {', '.join(missing)}: apt-get install {' '.join(missing)}"
        )
    try:
        gcc = run(["gcc", "--version"]).stdout.splitlines()[0]
        ld = run(["ld", "--version"]).stdout.splitlines()[0]
    except CommandError as err:
        raise UsageError(
            "gcc/binutils are not installed; apt-get install gcc make bc flex bison libelf-dev"
        ) from err
    return f"{gcc} | {ld}"


# -- build ---------------------------------------------------------------------
def build(
    spec: KernelSpec,
    progress: Progress = _print,
    cache: Path | None = None,
    *,
    incremental: bool = True,
) -> BuiltKernel:
    """The bzImage for ``spec``: from the cache, or built now.

    :param progress: called with one line per phase and at least every 10 s during make
    :param cache: the kernel cache (default :func:`apflab.kernel.cache_dir`)
    :param incremental: build a patched key from the built unpatched tree (default); False
        builds it from the pristine source like an unpatched key (through ccache)
    :raises UsageError: see :func:`check`
    :raises KernelBuildError: the fetch or make failed; the message names the log
    """
    start = time.monotonic()
    root = kcache.cache_dir(cache)
    plan = _plan(spec, progress, root)
    tag = f"kernel {plan.key16}"

    def say(line: str) -> None:
        progress(f"{tag}: {line} [{time.monotonic() - start:.0f}s]")

    with kcache.locked(root / f"{plan.key16}.lock", say, f"kernel {plan.key16}"):
        cached = load_entry(root / plan.key16, plan.key)
        if cached is not None:
            say(f"cached: {cached.bzimage} ({cached.release})")
            _remember(spec, cached, root)
            return _finish(cached, "cached", start)
        if not plan.patches:
            entry, how = _build_base(plan, root, say), "cold"
        elif incremental:
            entry, how = _build_incremental(plan, root, say)
        else:
            entry, how = _build_cold_patched(plan, root, say), "cold"
        _remember(spec, entry, root)
    kernel = _finish(entry, how, start)
    say(f"done: {kernel.bzimage} ({kernel.release}, {how}, {kernel.build_seconds:.0f}s)")
    return kernel


# -- the request index: finding a built kernel where its source is not (the lab) ----
def request_key(spec: KernelSpec) -> str:
    """What names a request without resolving its source: the source's name and the
    content of the base config, the fragments and the patches.  :func:`build` maps it
    to the full key (source identity and toolchain included) in ``<cache>/index/``."""
    base = spec.base_config or default_base_config()
    return kcache.compute_key(
        f"request {spec.source}",
        [p.read_bytes() for p in spec.patches],
        [_read_fragment_bytes(p) for p in (base, *spec.configs)],
        "",
    )


def _remember(spec: KernelSpec, kernel: BuiltKernel, root: Path) -> None:
    index = root / "index" / f"{request_key(spec)[:16]}.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f".{index.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": kernel.key, "source": spec.source}) + "\n")
    tmp.replace(index)


def index_file(spec: KernelSpec, cache: Path | None = None) -> Path:
    """Where the request index of ``spec`` lives (written by :func:`build`)."""
    return kcache.cache_dir(cache) / "index" / f"{request_key(spec)[:16]}.json"


def built_at(bzimage: Path) -> BuiltKernel | None:
    """The cache entry a bzImage path belongs to (``<entry>/bzImage`` beside its
    meta.json), None for a kernel apflab did not build."""
    meta = bzimage.parent / "meta.json"
    if bzimage.name != "bzImage" or not meta.is_file():
        return None
    try:
        key = json.loads(meta.read_text())["key"]
    except (ValueError, KeyError):
        return None
    return load_entry(bzimage.parent, str(key))


def lookup(spec: KernelSpec, cache: Path | None = None) -> BuiltKernel | None:
    """The kernel :func:`build` made for ``spec`` before, found by the request index:
    no source, compiler or network needed (inside the lab, where a kernel cache is
    shipped read-only).  None when it was never built (or the entry is gone)."""
    root = kcache.cache_dir(cache)
    index = index_file(spec, root)
    if not index.is_file():
        return None
    key = json.loads(index.read_text())["key"]
    return load_entry(root / key[:16], key)


def _finish(kernel: BuiltKernel, how: str, start: float) -> BuiltKernel:
    return dataclasses.replace(kernel, how=how, build_seconds=time.monotonic() - start)


def load_entry(entry: Path, key: str) -> BuiltKernel | None:
    """The published kernel in ``entry``, or None when there is none (or it is damaged)."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file() or not (entry / "bzImage").is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key or paths.sha256_file(entry / "bzImage") != meta.get("sha256"):
        return None
    return BuiltKernel(
        bzimage=entry / "bzImage",
        release=meta["release"],
        sha256=meta["sha256"],
        key=key,
        source=meta["source"],
        patches=meta["patches"],
        configs=meta["configs"],
        build_seconds=0.0,
        how="cached",
        config=entry / "config",
        log=entry / "build.log",
        built=meta["built"],
    )


# The built tree of an unpatched key lives at <cache>/base/<key16>/tree and is always built
# and rebuilt at that path: tools/objtool records absolute paths, so a tree that moved
# would relink objtool, and every object depends on objtool.  An incremental build moves
# the base tree aside, clones it back into place, builds there, and restores it.
def _base_paths(root: Path, plan: _Plan) -> tuple[Path, Path, Path]:
    base = root / "base" / plan.base_key[:16]
    return base / "tree", base / "tree.aside", base / "complete"


def _restore_base(root: Path, plan: _Plan) -> None:
    """Undo an incremental build that died half-way (the aside tree is the base)."""
    tree, aside, _ = _base_paths(root, plan)
    if aside.is_dir():
        kcache.remove_tree(tree)
        aside.rename(tree)


def _build_base(plan: _Plan, root: Path, say: Progress) -> BuiltKernel:
    """Cold-build an unpatched key in its base tree; publish its entry if there is none.

    The caller holds the key's lock (the base key's: ``plan.key == plan.base_key``).
    """
    t0 = time.monotonic()
    tree, _aside, complete = _base_paths(root, plan)
    _restore_base(root, plan)
    complete.unlink(missing_ok=True)
    kcache.remove_tree(tree)
    work = _work_dir(root, plan)
    try:
        say(f"extract: linking {plan.ref.describe()} into {tree}")
        kcache.link_tree(plan.tree, tree)
        with _failed_log(root, plan, work), (work / "build.log").open("w") as log:
            env = _env(plan, root, tree)
            _configure(plan, tree, env, log, say, verify_all=False)
            counts = _make_bzimage(tree, env, log, say)
        existing = load_entry(root / plan.key16, plan.key)
        if existing is not None and existing.sha256 != paths.sha256_file(_image(tree)):
            say(f"note: the rebuilt base differs from the cached {existing.sha256[:12]} (kept)")
        seconds = time.monotonic() - t0
        kernel = existing or _publish(plan, root, work, tree, counts, "cold", seconds)
        complete.write_text(plan.key + "\n")
        return kernel
    except BaseException:
        kcache.remove_tree(tree.parent)  # no half-built base is ever kept
        raise
    finally:
        kcache.remove_tree(work)


def _build_incremental(plan: _Plan, root: Path, say: Progress) -> tuple[BuiltKernel, str]:
    """Build a patched key from a clone of its unpatched base tree, at the base's path.

    :returns: the kernel, and ``incremental`` or ``cold`` (the base had to be built first)
    """
    base_plan = dataclasses.replace(plan, patches=(), key=plan.base_key)
    tree, aside, complete = _base_paths(root, plan)
    how = "incremental"
    with kcache.locked(root / f"{base_plan.key16}.lock", say, f"from the base {base_plan.key16}"):
        _restore_base(root, plan)
        if not complete.is_file():
            say(f"base: no built tree of the unpatched kernel {base_plan.key16}; building it")
            _build_base(base_plan, root, say)
            how = "cold"
        t0 = time.monotonic()
        work = _work_dir(root, plan)
        tree.rename(aside)
        try:
            say(f"extract: cloning the built tree of the unpatched kernel {base_plan.key16}")
            kcache.clone_build_tree(aside, tree)
            counts = _patch_and_make(plan, root, work, tree, say, reconfigure=False)
            seconds = time.monotonic() - t0
            return _publish(plan, root, work, tree, counts, "incremental", seconds), how
        finally:
            kcache.remove_tree(tree)
            aside.rename(tree)
            kcache.remove_tree(work)


def _build_cold_patched(plan: _Plan, root: Path, say: Progress) -> BuiltKernel:
    """Build a patched key from the pristine source, like an unpatched one (via ccache)."""
    t0 = time.monotonic()
    work = _work_dir(root, plan)
    try:
        tree = work / "tree"
        say(f"extract: linking {plan.ref.describe()} into {tree}")
        kcache.link_tree(plan.tree, tree)
        counts = _patch_and_make(plan, root, work, tree, say, reconfigure=True)
        return _publish(plan, root, work, tree, counts, "cold", time.monotonic() - t0)
    finally:
        kcache.remove_tree(work)


def _patch_and_make(
    plan: _Plan, root: Path, work: Path, tree: Path, say: Progress, *, reconfigure: bool
) -> make.MakeProgress:
    with _failed_log(root, plan, work), (work / "build.log").open("w") as log:
        say(f"apply patches: {', '.join(p.name for p, _ in plan.patches)}")
        for result in patches.apply(tree, [p for p, _ in plan.patches]):
            log.write(f"$ {' '.join(result.argv)}\n{result.stdout}{result.stderr}")
        env = _env(plan, root, tree)
        if reconfigure or _needs_reconfigure(plan, tree):
            _configure(plan, tree, env, log, say, verify_all=True, fresh=reconfigure)
        return _make_bzimage(tree, env, log, say)


@contextlib.contextmanager
def _failed_log(root: Path, plan: _Plan, work: Path) -> Iterator[None]:
    """On a failed build keep its log as ``<cache>/failed/<key16>.build.log`` and say so."""
    try:
        yield
    except KernelBuildError as err:
        kept = root / "failed" / f"{plan.key16}.build.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "build.log", kept)
        raise KernelBuildError(f"{err}; full log: {kept}") from err


def _needs_reconfigure(plan: _Plan, tree: Path) -> bool:
    """Does the base tree's .config lack a setting only the patches make possible?"""
    current = (tree / ".config").read_text()
    return bool(plan.patch_symbols) and bool(fragments.unmet(plan.settings, current))


def _work_dir(root: Path, plan: _Plan) -> Path:
    work = root / "tmp" / f"{plan.key16}.{os.getpid()}"
    kcache.remove_tree(work)
    work.mkdir(parents=True)
    return work


def _env(plan: _Plan, root: Path, tree: Path) -> dict[str, str]:
    extra = {
        # reproducible: the same inputs give the same bzImage; `uname -v` names the key
        "KBUILD_BUILD_TIMESTAMP": f"apflab {plan.key16}",
        "KBUILD_BUILD_USER": "apflab",
        "KBUILD_BUILD_HOST": "apflab",
        "KBUILD_BUILD_VERSION": "1",
        # ccache: one cache for every tree; in-tree builds use relative paths, and BASEDIR
        # rewrites any absolute one, so a copied or relocated tree still hits
        "CCACHE_DIR": str(root / "ccache"),
        "CCACHE_BASEDIR": str(tree),
        "CCACHE_NOHASHDIR": "1",
        "CCACHE_MAXSIZE": "4G",
        "CCACHE_COMPRESS": "1",
    }
    return make.make_env(extra)


def _make_argv(tree: Path, *targets: str) -> list[str]:
    cc, _ = make.compiler_wrapper()
    return ["make", "-C", str(tree), f"ARCH={ARCH}", f"CC={cc}", f"HOSTCC={cc}", *targets]


def _configure(
    plan: _Plan,
    tree: Path,
    env: dict[str, str],
    log: IO[str],
    say: Progress,
    *,
    verify_all: bool,
    fresh: bool = True,
) -> None:
    """tinyconfig + source layers + base + fragments, olddefconfig, then check it took."""
    say(f"configure: {RECIPE}")
    if fresh:
        make.run_make(_make_argv(tree, "tinyconfig"), env, log, say, "configure")
    layers: list[fragments.Setting] = []
    for rel in SOURCE_LAYERS:
        layers += fragments.parse_fragment((tree / rel).read_text(), rel)
    config = tree / ".config"
    config.write_text(fragments.merge(config.read_text(), [*layers, *plan.settings]))
    make.run_make(_make_argv(tree, "olddefconfig"), env, log, say, "configure")
    wanted = [s for s in plan.settings if verify_all or s.symbol not in plan.patch_symbols]
    missing = fragments.unmet(wanted, config.read_text())
    if missing:
        setting, got = missing[0]
        more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
        why = (
            "another option selects it: turn that one off too (grep 'select "
            f"{setting.symbol}' in the Kconfig files)"
            if setting.value == "n"
            else "a dependency is not set: add what its Kconfig entry 'depends on'"
        )
        raise UsageError(
            f"config fragment {setting.origin}: {setting.line()} did not take (olddefconfig "
            f"made it {got or 'absent'}){more}; {why}"
        )


def _make_bzimage(
    tree: Path, env: dict[str, str], log: IO[str], say: Progress
) -> make.MakeProgress:
    n = make.jobs()
    cc, with_ccache = make.compiler_wrapper()
    say(f"build: make -j{n} bzImage (CC={cc})" + ("" if with_ccache else "; no ccache installed"))
    before = _ccache_stats(env) if with_ccache else {}
    argv = _make_argv(tree, f"-j{n}", "bzImage")
    counts = make.run_make(argv, env, log, say, "build")
    after = _ccache_stats(env) if with_ccache else {}
    counts.ccache = {k: after[k] - before.get(k, 0) for k in after}
    return counts


def _ccache_stats(env: dict[str, str]) -> dict[str, int]:
    result = run(["ccache", "--print-stats"], env=env, check=False)
    stats = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("\t")
        if value.strip().isdigit():
            stats[name] = int(value)
    return {
        k: stats[k]
        for k in ("direct_cache_hit", "preprocessed_cache_hit", "cache_miss")
        if k in stats
    }


def _image(tree: Path) -> Path:
    return tree / "arch" / "x86" / "boot" / "bzImage"


def _publish(
    plan: _Plan,
    root: Path,
    work: Path,
    tree: Path,
    counts: make.MakeProgress,
    how: str,
    seconds: float,
) -> BuiltKernel:
    """Move the kernel, config, log and meta.json into ``<cache>/<key16>`` atomically."""
    image = _image(tree)
    header = bzimage.check_bzimage(image)
    release = (tree / "include" / "config" / "kernel.release").read_text().strip()
    staging = work / "entry"
    staging.mkdir()
    shutil.copy2(image, staging / "bzImage")
    shutil.copy2(tree / ".config", staging / "config")
    shutil.copy2(work / "build.log", staging / "build.log")
    digest = paths.sha256_file(staging / "bzImage")
    entry = root / plan.key16
    compiled = counts.compiled
    built: dict[str, Any] = {
        "how": how,
        "seconds": round(seconds, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "toolchain": plan.toolchain,
        "jobs": make.jobs(),
        "steps": dict(counts.steps),
        "compiled": compiled if len(compiled) <= 200 else len(compiled),
        "ccache": counts.ccache,
        "bzimage_bytes": (staging / "bzImage").stat().st_size,
        "version": header.version,
    }
    if how == "incremental":
        built["base"] = plan.base_key[:16]
    meta = {
        "key": plan.key,
        "release": release,
        "sha256": digest,
        "source": {**plan.ref.to_dict(), "kernel_version": _kernel_version(plan.tree)},
        "patches": [_file_ref(p, data) for p, data in plan.patches],
        "configs": [_file_ref(p, data) for p, data in plan.configs],
        "built": built,
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(entry, ignore_errors=True)  # a damaged entry (load_entry said None)
    staging.rename(entry)
    kernel = load_entry(entry, plan.key)
    assert kernel is not None
    return kernel


def _kernel_version(tree: Path) -> str:
    return sources.parse_kernel_version((tree / "Makefile").read_text()[:2000])


def _file_ref(path: Path, data: bytes) -> dict[str, str]:
    return {"path": str(path), "sha256": _sha256(data)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
