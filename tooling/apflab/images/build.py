"""Building images: mmdebstrap in a private mount namespace, then ``mke2fs -d``.

:func:`ensure` returns the cached image of a recipe (:mod:`apflab.images.recipe`),
building it first when its inputs changed.  Builds need root (mmdebstrap in root
mode); no loop mounts.  The Debian archive is an input we do not pin: a rebuild
may pick newer package versions; the manifest records what was built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from apflab import paths
from apflab.errors import ImageBuildError, UsageError
from apflab.images.ext4 import make_ext4, remove_build_dir
from apflab.images.recipe import (
    BuiltImage,
    Recipe,
    image_dir,
    input_hash,
    load_recipe,
    lock_file,
    recipes_root,
)
from apflab.process import run

log = logging.getLogger(__name__)


def ensure(name: str, cache: Path | None = None) -> BuiltImage:
    """Return the cached image for recipe ``name``, building it if needed."""
    recipe = load_recipe(name)
    target = image_dir(recipe, cache)
    if (target / "manifest.json").is_file():  # fast path; also works on a read-only cache
        log.info("image %s: cached at %s", name, target)
        return BuiltImage.load(target)
    with paths.exclusive(target.parent / f".{recipe.name}.lock"):
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


def _hook_env(recipe: Recipe, cache: Path) -> dict[str, str]:
    """The environment of the customize hooks (guest_images/common/customize.sh)."""
    env = {
        "APFLAB_COMMON": str(recipe.common),
        "APFLAB_HOSTNAME": recipe.spec.get("hostname", f"apflab-{recipe.name}"),
    }
    extra_hook = recipe.directory / "customize.sh"
    if extra_hook.exists():
        env["APFLAB_EXTRA"] = str(extra_hook)
    if recipe.needs_workload:
        env["APFLAB_WORKLOAD"] = str(build_workload(cache))
    if recipe.needs_wheels:
        env["APFLAB_WHEELS"] = str(prepare_wheels(cache))
        env["APFLAB_LOCK"] = str(lock_file())
    return env


def _mmdebstrap(recipe: Recipe, rootfs: Path, env: dict[str, str]) -> None:
    spec = recipe.spec
    run(
        [
            # A private mount namespace: mmdebstrap's mounts inside the
            # rootfs vanish with it, even if it is killed with SIGKILL.
            *("unshare", "--mount", "--propagation", "private", "--"),
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


def _take_boot_files(recipe: Recipe, rootfs: Path, work: Path) -> str:
    """Copy the kernel, initrd and SSH host key out of the rootfs; return the release."""
    boot = rootfs / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ImageBuildError(
            f"image {recipe.name}: expected one kernel and one initrd in /boot, "
            f"found {[k.name for k in kernels]} / {[i.name for i in initrds]}"
        )
    shutil.copy2(kernels[0], work / "vmlinuz")
    shutil.copy2(initrds[0], work / "initrd.img")
    shutil.copy2(rootfs / "etc/ssh/ssh_host_ed25519_key.pub", work / "ssh_host_ed25519_key.pub")
    return kernels[0].name.removeprefix("vmlinuz-")


def _build(recipe: Recipe, target: Path, cache: Path) -> BuiltImage:
    _preflight_build()
    work = target.with_name(target.name + ".building")
    remove_build_dir(work)
    work.mkdir(parents=True)
    rootfs = work / "rootfs"
    env = _hook_env(recipe, cache)
    log.info("image %s: building into %s (mmdebstrap, then mke2fs -d)", recipe.name, target)
    t0 = time.monotonic()
    try:
        _mmdebstrap(recipe, rootfs, env)
        t_debootstrap = time.monotonic() - t0
        release = _take_boot_files(recipe, rootfs, work)
        packages = run(
            ["chroot", rootfs, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"]
        ).stdout.split()
        t1 = time.monotonic()
        free_mb = int(recipe.spec.get("free_mb", 512))
        size_mb = make_ext4(rootfs, work / "root.img", "root", free_mb)
        t_mke2fs = time.monotonic() - t1
        shutil.rmtree(rootfs)
        manifest = {
            "name": recipe.name,
            "input_hash": input_hash(recipe),
            "kernel_release": release,
            "cmdline": recipe.spec["cmdline"],
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
