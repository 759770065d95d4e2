"""Kernel cache: keys, location, tree clones, and the small parsers around the builder."""

import json
import os
from pathlib import Path

import pytest

from apflab import kernel
from apflab.errors import UsageError
from apflab.kernel import cache, make, sources


def _key(**over: object) -> str:
    args: dict[str, object] = {
        "source_identity": "debian:linux-source-6.1=6.1.192-3",
        "patches": [b"patch one", b"patch two"],
        "configs": [b"CONFIG_SMP=y\n", b"CONFIG_X86_MSR=y\n"],
        "toolchain": "gcc 12.2.0 | ld 2.40",
    }
    args.update(over)
    return cache.compute_key(**args)  # type: ignore[arg-type]


def test_key_is_stable_and_hex() -> None:
    assert _key() == _key()
    assert len(_key()) == 64
    int(_key(), 16)


@pytest.mark.parametrize(
    "change",
    [
        {"source_identity": "debian:linux-source-6.1=6.1.193-1"},
        {"patches": [b"patch two", b"patch one"]},  # order matters
        {"patches": [b"patch one"]},
        {"configs": [b"CONFIG_X86_MSR=y\n", b"CONFIG_SMP=y\n"]},
        {"configs": [b"CONFIG_SMP=y\nCONFIG_X86_MSR=y\n"]},  # one layer, same bytes
        {"toolchain": "gcc 13.1.0 | ld 2.40"},
        {"format_version": "apflab-kernel-2"},
    ],
)
def test_key_changes_with_every_input(change: dict[str, object]) -> None:
    assert _key(**change) != _key()


def test_key_parts_cannot_run_into_each_other() -> None:
    assert _key(patches=[b"ab", b"c"]) != _key(patches=[b"a", b"bc"])
    assert _key(patches=[b"x"], configs=[]) != _key(patches=[], configs=[b"x"])


def test_cache_dir_override_env_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("APFLAB_KERNEL_CACHE", raising=False)
    assert cache.cache_dir() == Path("/var/cache/apflab/kernels")
    monkeypatch.setenv("APFLAB_KERNEL_CACHE", str(tmp_path / "env"))
    assert kernel.cache_dir() == tmp_path / "env"
    assert cache.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def _source_tree(root: Path) -> Path:
    (root / "kernel").mkdir(parents=True)
    (root / "kernel" / "fork.c").write_text("int fork;\n")
    (root / "Makefile").write_text("VERSION = 6\n")
    os.symlink("fork.c", root / "kernel" / "link.c")
    os.utime(root / "kernel" / "fork.c", (1_000_000_000, 1_000_000_000))
    return root


def test_link_tree_shares_inodes_and_keeps_symlinks(tmp_path: Path) -> None:
    src = _source_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    cache.link_tree(src, dst)
    assert (dst / "kernel" / "fork.c").stat().st_ino == (src / "kernel" / "fork.c").stat().st_ino
    assert os.readlink(dst / "kernel" / "link.c") == "fork.c"


def test_clone_build_tree_copies_outputs_and_links_sources(tmp_path: Path) -> None:
    src = _source_tree(tmp_path / "src")
    base = tmp_path / "base"
    cache.link_tree(src, base)
    (base / "kernel" / "fork.o").write_bytes(b"\x7fELF")  # a build output: one link
    os.utime(base / "kernel" / "fork.o", (1_000_000_100, 1_000_000_100))
    work = tmp_path / "work"
    cache.clone_build_tree(base, work)
    source, output = work / "kernel" / "fork.c", work / "kernel" / "fork.o"
    assert source.stat().st_ino == (src / "kernel" / "fork.c").stat().st_ino
    assert output.stat().st_ino != (base / "kernel" / "fork.o").stat().st_ino
    assert output.stat().st_mtime == 1_000_000_100  # make compares mtimes
    output.write_bytes(b"rebuilt")  # make writing in the clone never reaches the base
    assert (base / "kernel" / "fork.o").read_bytes() == b"\x7fELF"
    assert cache.dir_bytes(work) == output.stat().st_blocks * 512


def test_locked_is_reentrant_across_sequential_holders(tmp_path: Path) -> None:
    said: list[str] = []
    lock = tmp_path / "k.lock"
    with cache.locked(lock, said.append, "kernel k"):
        pass
    with cache.locked(lock, said.append, "kernel k"):
        pass
    assert said == []  # never had to wait


def test_parse_apt_policy() -> None:
    text = """linux-source-6.12:
  Installed: (none)
  Candidate: 6.12.117-1~deb12u1
  Version table:
     6.12.117-1~deb12u1 500
"""
    assert sources.parse_apt_policy(text) == (None, "6.12.117-1~deb12u1")
    assert sources.parse_apt_policy("") == (None, None)
    gone = "linux-source-9.9:\n  Installed: (none)\n  Candidate: (none)\n"
    assert sources.parse_apt_policy(gone) == (None, None)


def test_parse_kernel_version() -> None:
    head = "# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\nNAME = Curry\n"
    assert sources.parse_kernel_version(head) == "6.1.192"
    rc = "VERSION = 6\nPATCHLEVEL = 13\nSUBLEVEL = 0\nEXTRAVERSION = -rc3\n"
    assert sources.parse_kernel_version(rc) == "6.13.0-rc3"


def test_resolve_refuses_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file or directory"):
        sources.resolve(str(tmp_path / "linux"))
    with pytest.raises(UsageError, match=r"'debian-5\.10' is not one of debian-6\.1, debian-6\.12"):
        sources.resolve("debian-5.10")
    odd = tmp_path / "linux.zip"
    odd.write_bytes(b"PK")
    with pytest.raises(UsageError, match=r"neither a directory nor a \.tar"):
        sources.resolve(str(odd))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UsageError, match="not a git work tree"):
        sources.resolve(str(plain))


def test_tarball_identity_is_its_sha256(tmp_path: Path) -> None:
    tarball = tmp_path / "linux-6.1.tar.gz"
    tarball.write_bytes(b"not really a tarball")
    ref = sources.resolve(str(tarball))
    assert ref.kind == "tarball"
    assert ref.identity == "sha256:" + sources.sha256_file(tarball)
    assert ref.dirname == "tar-" + ref.identity[7:23]


def test_make_progress_counts_kbuild_steps() -> None:
    progress = make.MakeProgress()
    for line in [
        "  HOSTCC  scripts/kconfig/conf.o",
        "  CC      arch/x86/kernel/kvm.o",
        "arch/x86/kernel/kvm.c:12:1: warning: unused",
        "  CC      init/version.o",
        "  LD      vmlinux.o",
        "Kernel: arch/x86/boot/bzImage is ready  (#1)",
    ]:
        progress.feed(line)
    assert progress.steps == {"HOSTCC": 1, "CC": 2, "LD": 1}
    assert progress.compiled == ["arch/x86/kernel/kvm.o", "init/version.o"]
    assert progress.summary().startswith("2 CC, 1 HOSTCC, 1 LD; last LD vmlinux.o")


def test_make_env_drops_what_would_steer_make(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKEFLAGS", "-j8 --jobserver-auth=3,4")
    monkeypatch.setenv("KBUILD_OUTPUT", "/elsewhere")
    monkeypatch.setenv("ARCH", "arm64")
    monkeypatch.setenv("CCACHE_DISABLE", "1")
    env = make.make_env({"CCACHE_DIR": "/c"})
    assert "MAKEFLAGS" not in env and "KBUILD_OUTPUT" not in env and "ARCH" not in env
    assert "CCACHE_DISABLE" not in env
    assert env["CCACHE_DIR"] == "/c" and env["LC_ALL"] == "C"
    assert env["PATH"] == os.environ["PATH"]


def test_load_entry_refuses_a_damaged_entry(tmp_path: Path) -> None:
    entry = tmp_path / "0123456789abcdef"
    entry.mkdir()
    (entry / "bzImage").write_bytes(b"kernel")
    meta = {
        "key": "k" * 64,
        "release": "6.1.192-apflab",
        "sha256": sources.sha256_file(entry / "bzImage"),
        "source": {"kind": "debian"},
        "patches": [],
        "configs": [],
        "built": {"how": "cold"},
    }
    (entry / "meta.json").write_text(json.dumps(meta))
    loaded = kernel.load_entry(entry, "k" * 64)
    assert loaded is not None and loaded.how == "cached" and loaded.release == "6.1.192-apflab"
    assert loaded.to_dict()["built"] == {"how": "cold"}
    assert kernel.load_entry(entry, "x" * 64) is None  # another key
    (entry / "bzImage").write_bytes(b"truncated")
    assert kernel.load_entry(entry, "k" * 64) is None


def test_run_long_reports_while_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(make, "HEARTBEAT_S", 0.05)
    said: list[str] = []
    make.run_long(["sleep", "0.3"], said.append, "extract: tar")
    assert said and all(line.startswith("extract: tar: ") for line in said)


def test_run_long_failure_names_the_command_and_its_last_line() -> None:
    with pytest.raises(kernel.KernelBuildError, match=r"`sh -c .*` exited 3: broken"):
        make.run_long(["sh", "-c", "echo first; echo broken >&2; exit 3"], print, "x")
