"""Kernel sources: name one, know its identity, extract it once into the cache.

Four kinds (:func:`resolve` decides which from the string):

* ``debian-6.1`` / ``debian-6.12`` — Debian's ``linux-source-6.1`` / ``-6.12`` package.  The
  tarball in /usr/src when the package is installed; otherwise the .deb is fetched with
  ``apt-get download`` into the cache and unpacked with ``dpkg -x`` (nothing is installed
  on the host).  Identity: the package version.
* a kernel git work tree — identity: the HEAD commit, plus a hash of ``git diff HEAD``
  when tracked files are modified (untracked files are not part of it, and are not used).
  Exported with ``git archive`` plus the modified files, so the developer's tree is never
  written to.
* a tarball (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``) — identity: its sha256.

Each source is extracted once to ``<cache>/src/<dirname>/`` (atomically, under a lock) and
then read by every check and build: it is never modified (builds use copies).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apflab.errors import CommandError, UsageError
from apflab.kernel import cache
from apflab.kernel.make import run_long
from apflab.paths import sha256_file
from apflab.process import run

#: source name -> Debian package providing /usr/src/<package>.tar.xz
DEBIAN_SOURCES = {"debian-6.1": "linux-source-6.1", "debian-6.12": "linux-source-6.12"}
DEFAULT_SOURCE = "debian-6.1"
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SourceRef:
    """A resolved source, before or after extraction.

    :ivar kind: ``debian``, ``git`` or ``tarball``
    :ivar name: what the user gave (``debian-6.1``, a path)
    :ivar version: the package version, ``git describe``, or the tarball's file name
    :ivar identity: what the cache key hashes (changes whenever the code may change)
    :ivar dirname: the directory name under ``<cache>/src``
    :ivar origin: the package, tarball or git tree it comes from
    """

    kind: str
    name: str
    version: str
    identity: str
    dirname: str
    origin: str

    def describe(self) -> str:
        return f"{self.name} ({self.version})"

    def to_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "identity": self.identity,
        }


def resolve(source: str) -> SourceRef:
    """Name the source and compute its identity: cheap (no download, no extraction).

    :raises UsageError: an unknown name, a missing path, a directory that is not a git work
        tree, a file that is not a tarball, or a Debian package apt does not offer
    """
    if source in DEBIAN_SOURCES:
        return _resolve_debian(source, DEBIAN_SOURCES[source])
    path = Path(source).expanduser()
    if source.startswith("debian-") and not path.exists():
        raise UsageError(
            f"kernel source {source!r} is not one of {', '.join(DEBIAN_SOURCES)}; "
            "or give a kernel git tree or tarball"
        )
    if not path.exists():
        raise UsageError(
            f"kernel source {source}: no such file or directory; give "
            f"{' or '.join(DEBIAN_SOURCES)}, a kernel git tree, or a .tar/.tar.gz/.tar.xz"
        )
    if path.is_dir():
        return _resolve_git(path.resolve())
    if path.name.endswith(TARBALL_SUFFIXES):
        return _resolve_tarball(path.resolve())
    raise UsageError(
        f"kernel source {source} is neither a directory nor a .tar/.tar.gz/.tgz/.tar.xz file"
    )


# -- Debian ------------------------------------------------------------------
def parse_apt_policy(text: str) -> tuple[str | None, str | None]:
    """``(installed, candidate)`` versions from ``apt-cache policy PKG`` (None for "(none)")."""
    found: dict[str, str | None] = {"Installed": None, "Candidate": None}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in found and found[key] is None:
            value = value.strip()
            found[key] = None if value in ("", "(none)") else value
    return found["Installed"], found["Candidate"]


def _resolve_debian(name: str, package: str) -> SourceRef:
    tarball = Path("/usr/src") / f"{package}.tar.xz"
    installed = _dpkg_version(package) if tarball.is_file() else None
    if installed is not None:
        version, origin = installed, str(tarball)
    else:
        policy = run(["apt-cache", "policy", package], check=False)
        _, candidate = parse_apt_policy(policy.stdout)
        if candidate is None:
            raise UsageError(
                f"kernel source {name}: package {package} is neither installed nor offered by "
                "apt here (apt-cache policy: no candidate); run `apt-get update`, or add "
                "bookworm-security main to /etc/apt/sources.list"
            )
        version, origin = candidate, f"apt-get download {package}={candidate}"
    return SourceRef(
        kind="debian",
        name=name,
        version=version,
        identity=f"debian:{package}={version}",
        dirname=_safe(f"{name}_{version}"),
        origin=origin,
    )


def _dpkg_version(package: str) -> str | None:
    result = run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", package], check=False)
    status, _, version = result.stdout.partition("\t")
    return version.strip() if result.ok and status.endswith(" installed") else None


def _fetch_debian_tarball(ref: SourceRef, work: Path, progress: Progress) -> Path:
    package = DEBIAN_SOURCES[ref.name]
    installed = Path("/usr/src") / f"{package}.tar.xz"
    if ref.origin == str(installed):
        return installed
    progress(f"fetch source: apt-get download {package}={ref.version}")
    argv = ["apt-get", "download", f"{package}={ref.version}"]
    if os.geteuid() == 0:  # _apt cannot write to a root-owned work dir; avoid the warning
        argv[1:1] = ["-o", "APT::Sandbox::User=root"]
    try:
        run_long(argv, progress, "fetch source: apt-get download", cwd=work)
    except cache.KernelBuildError as err:
        raise cache.KernelBuildError(
            f"kernel source {ref.name}: apt-get download failed (network? apt sources?): {err}"
        ) from err
    debs = sorted(work.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise cache.KernelBuildError(f"apt-get download {package}: expected one .deb in {work}")
    run_long(["dpkg", "-x", debs[0], work / "deb"], progress, "fetch source: dpkg -x")
    debs[0].unlink()
    unpacked = work / "deb" / "usr" / "src" / f"{package}.tar.xz"
    if not unpacked.is_file():
        raise cache.KernelBuildError(f"{debs[0].name} holds no usr/src/{package}.tar.xz")
    return unpacked


# -- git work trees ----------------------------------------------------------
def _git(tree: Path, *args: str) -> str:
    return run(["git", "-C", tree, *args]).stdout


def _resolve_git(tree: Path) -> SourceRef:
    try:
        top = Path(_git(tree, "rev-parse", "--show-toplevel").strip())
        commit = _git(tree, "rev-parse", "HEAD").strip()
    except CommandError as err:
        raise UsageError(
            f"kernel source {tree} is a directory but not a git work tree with a commit; "
            "commit it (or give a tarball)"
        ) from err
    if top != tree:
        raise UsageError(f"kernel source {tree} is inside the git tree {top}; give {top}")
    if not (tree / "Kconfig").is_file() or not (tree / "arch" / "x86").is_dir():
        raise UsageError(f"kernel source {tree} is not a Linux source tree (no Kconfig, arch/x86)")
    describe = _git(tree, "describe", "--always", "--tags", "--dirty").strip()
    diff = run(["git", "-C", tree, "diff", "--binary", "HEAD"]).stdout.encode()
    identity = f"git:{commit}"
    dirname = f"git-{commit[:12]}"
    if diff:
        digest = hashlib.sha256(diff).hexdigest()
        identity += f"+diff:{digest}"
        dirname += f"-dirty-{digest[:12]}"
    return SourceRef("git", str(tree), describe, identity, dirname, str(tree))


def _export_git(ref: SourceRef, work: Path, progress: Progress) -> Path:
    tree = Path(ref.origin)
    out = work / "tree"
    out.mkdir()
    archive = work / "head.tar"
    run_long(
        ["git", "-C", tree, "archive", "--format=tar", "-o", archive, "HEAD"],
        progress,
        "extract: git archive",
    )
    run_long(["tar", "-xf", archive, "-C", out], progress, "extract: tar")
    archive.unlink()
    changed = _git(tree, "diff", "--name-only", "--no-renames", "-z", "HEAD").split("\0")
    for name in filter(None, changed):
        src, dst = tree / name, out / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.exists():
            dst.unlink()
    return out


# -- tarballs ----------------------------------------------------------------
def _resolve_tarball(path: Path) -> SourceRef:
    digest = sha256_file(path)
    return SourceRef(
        "tarball", str(path), path.name, f"sha256:{digest}", f"tar-{digest[:16]}", str(path)
    )


def _extract(tarball: Path, work: Path, progress: Progress) -> Path:
    progress(f"extract: {tarball.name}")
    out = work / "x"
    out.mkdir()
    try:
        run_long(["tar", "-xf", tarball, "-C", out, "--no-same-owner"], progress, "extract: tar")
    except cache.KernelBuildError as err:
        raise UsageError(f"kernel source {tarball}: tar cannot extract it ({err})") from err
    entries = list(out.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out


# -- the extracted tree --------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+~-]", "_", name)


def parse_kernel_version(makefile_text: str) -> str:
    """``VERSION.PATCHLEVEL.SUBLEVEL[EXTRAVERSION]`` from the top-level Makefile's head."""
    fields = {}
    for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION"):
        match = re.search(rf"^{key}\s*=[ \t]*(\S*)", makefile_text, re.MULTILINE)
        fields[key] = match.group(1) if match else ""
    version = ".".join(
        v for v in (fields["VERSION"], fields["PATCHLEVEL"], fields["SUBLEVEL"]) if v
    )
    return version + fields["EXTRAVERSION"]


def extracted(ref: SourceRef, root: Path, progress: Progress) -> Path:
    """The source tree of ``ref`` under ``<root>/src``, fetched and extracted if needed."""
    final = root / "src" / ref.dirname
    if (final / "Makefile").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with cache.locked(root / "src" / f"{ref.dirname}.lock", progress, f"source {ref.describe()}"):
        if (final / "Makefile").is_file():
            return final
        with tempfile.TemporaryDirectory(prefix=f".{ref.dirname}.", dir=final.parent) as tmp:
            work = Path(tmp)
            if ref.kind == "git":
                progress(f"extract: git archive {ref.origin} ({ref.version})")
                tree = _export_git(ref, work, progress)
            else:
                tarball = (
                    _fetch_debian_tarball(ref, work, progress)
                    if ref.kind == "debian"
                    else Path(ref.origin)
                )
                tree = _extract(tarball, work, progress)
            if not (tree / "Makefile").is_file() or not (tree / "arch" / "x86").is_dir():
                raise UsageError(
                    f"kernel source {ref.name} holds no Linux source tree (no Makefile, arch/x86)"
                )
            tree.rename(final)
    progress(f"extract: {ref.describe()} ready in {final}")
    return final
