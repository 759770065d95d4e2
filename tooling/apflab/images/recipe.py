"""Image recipes and the content-addressed cache: what an image is built from.

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

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import UsageError
from apflab.vm.qemu import BootSpec

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
