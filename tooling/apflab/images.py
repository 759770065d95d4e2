"""Image recipes and the content-addressed cache.

A recipe is a directory under ``guest_images/`` (``recipe.json`` plus an
optional ``customize.sh``) built on top of ``guest_images/common``.  Its
*input hash* covers every file of the recipe and of ``common``, the apflab
image-format version, and per-recipe extra inputs (the workload source, the
pinned Python lock for the lab).  A build goes to
``<cache>/images/<name>-<hash16>/`` and is reused until an input changes.

Builds need root (mmdebstrap in root mode, then ``mke2fs -d`` into a raw ext4
image: no loop mounts).  The Debian archive is an input we do not pin: a
rebuild may pick newer package versions; the manifest records what was built.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import ImageBuildError, UsageError
from apflab.process import run
from apflab.vm.qemu import BootSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the build procedure itself changes


@dataclass(frozen=True)
class Recipe:
    name: str
    directory: Path
    common: Path
    spec: dict[str, Any]

    @property
    def needs_workload(self) -> bool:
        return bool(self.spec.get("workload"))

    @property
    def needs_wheels(self) -> bool:
        return bool(self.spec.get("wheels"))


@dataclass(frozen=True)
class BuiltImage:
    """A built image in the cache.

    :ivar disk: raw ext4 root filesystem image (never written by a guest)
    :ivar host_key: the image's SSH host public key line (pinned by clients)
    """

    name: str
    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    host_key: str
    cmdline: str
    manifest: dict[str, Any]

    def boot_spec(self, extra_cmdline: str = "") -> BootSpec:
        cmdline = f"{self.cmdline} {extra_cmdline}".strip()
        return BootSpec(self.kernel, self.initrd, cmdline)

    @classmethod
    def load(cls, directory: Path) -> BuiltImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(
            manifest["name"],
            directory,
            directory / "root.img",
            directory / "vmlinuz",
            directory / "initrd.img",
            (directory / "ssh_host_ed25519_key.pub").read_text().strip(),
            manifest["cmdline"],
            manifest,
        )


def recipes_root() -> Path:
    env = os.environ.get("APFLAB_IMAGES")
    if env:
        return Path(env)
    repo = paths.repo_root()
    if repo is None:
        raise UsageError(
            "cannot find guest_images/: run from an apflab checkout or set APFLAB_IMAGES"
        )
    return repo / "guest_images"


def load_recipe(name: str, root: Path | None = None) -> Recipe:
    base = root or recipes_root()
    directory = base / name
    spec_file = directory / "recipe.json"
    if not spec_file.is_file():
        known = sorted(p.parent.name for p in base.glob("*/recipe.json"))
        raise UsageError(f"no image recipe {name!r} in {base}; known recipes: {', '.join(known)}")
    return Recipe(name, directory, base / "common", json.loads(spec_file.read_text()))


def _hash_tree(h: hashlib._Hash, top: Path, label: str) -> None:
    for path in sorted(top.rglob("*")):
        if path.is_file():
            rel = path.relative_to(top).as_posix()
            mode = "x" if os.access(path, os.X_OK) else "-"
            h.update(f"{label}/{rel}\0{mode}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")


def lock_file() -> Path:
    repo = paths.repo_root()
    candidates = [Path(os.environ["APFLAB_LOCKFILE"])] if "APFLAB_LOCKFILE" in os.environ else []
    if repo is not None:
        candidates.append(repo / "requirements.lock")
    for c in candidates:
        if c.is_file():
            return c
    raise UsageError("cannot find requirements.lock: run from an apflab checkout")


def input_hash(recipe: Recipe) -> str:
    """sha256 over everything that determines the built image."""
    h = hashlib.sha256(f"apflab-image-format-{FORMAT_VERSION}\0".encode())
    _hash_tree(h, recipe.directory, recipe.name)
    _hash_tree(h, recipe.common, "common")
    if recipe.needs_workload:
        _hash_tree(h, recipe.directory.parent / "workload", "workload")
    if recipe.needs_wheels:
        h.update(b"lock\0" + lock_file().read_bytes())
    return h.hexdigest()


def image_dir(recipe: Recipe, cache: Path | None = None) -> Path:
    return (cache or paths.cache_dir()) / "images" / f"{recipe.name}-{input_hash(recipe)[:16]}"


def cached(recipe: Recipe, cache: Path | None = None) -> BuiltImage | None:
    d = image_dir(recipe, cache)
    return BuiltImage.load(d) if (d / "manifest.json").is_file() else None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(name: str, cache: Path | None = None) -> BuiltImage:
    """Return the cached image for recipe ``name``, building it if needed."""
    recipe = load_recipe(name)
    target = image_dir(recipe, cache)
    if (target / "manifest.json").is_file():  # fast path; also works on a read-only cache
        log.info("image %s: cached at %s", name, target)
        return BuiltImage.load(target)
    with _exclusive(target.parent / f".{recipe.name}.lock"):
        if (target / "manifest.json").is_file():
            log.info("image %s: cached at %s", name, target)
            return BuiltImage.load(target)
        return _build(recipe, target, cache or paths.cache_dir())


def _preflight_build() -> None:
    if os.geteuid() != 0:
        raise UsageError("building images needs root (mmdebstrap root mode): run as root")
    for tool in ("mmdebstrap", "mke2fs", "gcc"):
        if shutil.which(tool) is None:
            raise UsageError(f"building images needs {tool}: run `make deps`")


def build_workload(cache: Path) -> Path:
    """Compile the static guest workload (cached by source hash)."""
    src = recipes_root() / "workload" / "apflab-memtouch.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = cache / "workload" / f"apflab-memtouch-{digest}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", tmp, src])
        tmp.replace(out)
    return out


def prepare_wheels(cache: Path) -> Path:
    """Download the pinned runtime wheels for the lab (cached by lock hash)."""
    lock = lock_file()
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    out = cache / "wheels" / digest
    if not (out / ".complete").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary=:all:",
                "--no-deps",
                "-r",
                lock,
                "-d",
                tmp,
            ],
            timeout=900,
        )
        (tmp / ".complete").write_text(lock.read_text())
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return out


def make_ext4(source: Path, image: Path, label: str, free_mb: int = 0) -> int:
    """Write ``source``'s tree into a new raw ext4 file ``image`` (``mke2fs -d``:
    no loop mount, no root-owned mount point), sized to fit with ``free_mb`` to
    spare.

    :return: the image size in MiB
    """
    used_mb = int(run(["du", "-sm", "--apparent-size", source]).stdout.split()[0])
    size_mb = used_mb + free_mb + 64
    run(
        [
            *("mke2fs", "-q", "-t", "ext4", "-L", label, "-E", "root_owner=0:0"),
            *("-d", source, "-F", image, f"{size_mb}M"),
        ],
        timeout=600,
    )
    return size_mb


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    base = path.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # Field 5 is the mount point, with space, tab, newline, backslash octal-escaped.
        point = Path(fields[4].encode().decode("unicode_escape"))
        if point == base or base in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_build_dir(path: Path) -> None:
    """Remove a (possibly stale) build directory without descending into mounts.

    Builds run mmdebstrap in a private mount namespace, so its /proc, /sys and
    /dev/pts mounts die with it; a directory left by an older build killed
    mid-way may still hold such mounts, and ``rm -r`` must never walk into a
    live /proc or /sys.  Detach them first.
    """
    for point in mounts_under(path):
        log.warning("unmounting %s left under a stale build directory", point)
        run(["umount", "--lazy", point])
    shutil.rmtree(path, ignore_errors=True)


def _build(recipe: Recipe, target: Path, cache: Path) -> BuiltImage:
    _preflight_build()
    spec = recipe.spec
    work = target.with_name(target.name + ".building")
    remove_build_dir(work)
    work.mkdir(parents=True)
    rootfs = work / "rootfs"
    env = {
        "APFLAB_COMMON": str(recipe.common),
        "APFLAB_HOSTNAME": spec.get("hostname", f"apflab-{recipe.name}"),
    }
    extra_hook = recipe.directory / "customize.sh"
    if extra_hook.exists():
        env["APFLAB_EXTRA"] = str(extra_hook)
    if recipe.needs_workload:
        env["APFLAB_WORKLOAD"] = str(build_workload(cache))
    if recipe.needs_wheels:
        env["APFLAB_WHEELS"] = str(prepare_wheels(cache))
        env["APFLAB_LOCK"] = str(lock_file())
    log.info("image %s: building into %s (mmdebstrap, then mke2fs -d)", recipe.name, target)
    t0 = time.monotonic()
    try:
        run(
            [
                # A private mount namespace: mmdebstrap's mounts inside the
                # rootfs vanish with it, even if it is killed with SIGKILL.
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "mmdebstrap",
                "--mode=root",
                f"--variant={spec.get('variant', 'minbase')}",
                "--include=" + ",".join(spec["packages"]),
                '--aptopt=APT::Install-Recommends "false"',
                f"--customize-hook={recipe.common / 'customize.sh'}",
                spec.get("suite", "bookworm"),
                rootfs,
            ],
            env=env,
            timeout=1800,
        )
        t_debootstrap = time.monotonic() - t0
        boot = rootfs / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            raise ImageBuildError(
                f"image {recipe.name}: expected one kernel and one initrd in /boot, "
                f"found {[k.name for k in kernels]} / {[i.name for i in initrds]}"
            )
        release = kernels[0].name.removeprefix("vmlinuz-")
        shutil.copy2(kernels[0], work / "vmlinuz")
        shutil.copy2(initrds[0], work / "initrd.img")
        shutil.copy2(rootfs / "etc/ssh/ssh_host_ed25519_key.pub", work / "ssh_host_ed25519_key.pub")
        packages = run(
            ["chroot", rootfs, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"]
        ).stdout.split()
        t1 = time.monotonic()
        size_mb = make_ext4(rootfs, work / "root.img", "root", int(spec.get("free_mb", 512)))
        t_mke2fs = time.monotonic() - t1
        shutil.rmtree(rootfs)
        manifest = {
            "name": recipe.name,
            "input_hash": input_hash(recipe),
            "kernel_release": release,
            "cmdline": spec["cmdline"],
            "size_mb": size_mb,
            "packages": packages,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": {
                "mmdebstrap": round(t_debootstrap, 1),
                "mke2fs": round(t_mke2fs, 1),
                "total": round(time.monotonic() - t0, 1),
            },
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        work.replace(target)
    except BaseException:
        remove_build_dir(work)
        raise
    log.info("image %s: built in %.0fs", recipe.name, manifest["build_seconds"]["total"])
    return BuiltImage.load(target)


def prune(cache: Path | None = None, keep: set[Path] | None = None) -> list[Path]:
    """Remove cached images not in ``keep`` (stale input hashes)."""
    removed = []
    base = (cache or paths.cache_dir()) / "images"
    for d in sorted(base.glob("*-*")) if base.is_dir() else []:
        if d.is_dir() and (keep is None or d not in keep):
            remove_build_dir(d)
            removed.append(d)
    return removed
