"""Patch files: what counts as one, and a series dry-run on a scratch copy (GNU patch)."""

import shutil
from pathlib import Path

import pytest

from apflab.errors import UsageError
from apflab.kernel import patches

UNIFIED = """\
--- a/arch/x86/kernel/kvm.c
+++ b/arch/x86/kernel/kvm.c
@@ -2,3 +2,2 @@ handler
 \t\tkvm_async_pf_task_wake(token);
 \t\t__this_cpu_write(apf_reason.token, 0);
-\t\twrmsrl(MSR_KVM_ASYNC_PF_ACK, 1);
"""

GIT_HEAD = """\
From 1234 Mon Sep 17 00:00:00 2001
Subject: [PATCH] x

---
 arch/x86/kernel/kvm.c | 1 -
 1 file changed, 1 deletion(-)

diff --git a/arch/x86/kernel/kvm.c b/arch/x86/kernel/kvm.c
index 1111111..2222222 100644
"""
GIT = GIT_HEAD + UNIFIED

KVM_C = "\ttoken = 1;\n\t\tkvm_async_pf_task_wake(token);\n\t\t__this_cpu_write(apf_reason.token, 0);\n\t\twrmsrl(MSR_KVM_ASYNC_PF_ACK, 1);\n"  # noqa: E501

needs_patch = pytest.mark.skipif(shutil.which("patch") is None, reason="needs GNU patch")


def test_kinds() -> None:
    assert patches.patch_kind(UNIFIED) == "unified"
    assert patches.patch_kind(GIT) == "git"
    assert patches.patch_kind("root:x:0:0:root:/root:/bin/bash\n") is None
    context_diff = "*** a/f\n--- b/f\n***************\n*** 1 ****\n"
    assert patches.patch_kind(context_diff) is None
    binary = "diff --git a/x b/x\nGIT binary patch\nliteral 1\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n"
    assert patches.patch_kind(binary) is None


def test_file_pairs_strip_one_component() -> None:
    new_file = "--- /dev/null\n+++ b/tools/new.c\n@@ -0,0 +1 @@\n+x\n"
    assert patches.file_pairs(UNIFIED + new_file) == [
        ("arch/x86/kernel/kvm.c", "arch/x86/kernel/kvm.c"),
        (None, "tools/new.c"),
    ]
    assert patches.touched_files(GIT) == ["arch/x86/kernel/kvm.c"]


def test_read_patch_messages(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"missing\.patch: no such file"):
        patches.read_patch(tmp_path / "missing.patch")
    passwd = tmp_path / "passwd.patch"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UsageError, match="is not a unified or git diff"):
        patches.read_patch(passwd)
    escape = tmp_path / "escape.patch"
    escape.write_text(UNIFIED.replace("a/arch", "a/../../etc"))
    with pytest.raises(UsageError, match="outside the source tree"):
        patches.read_patch(escape)


def _tree(root: Path) -> Path:
    (root / "arch" / "x86" / "kernel").mkdir(parents=True)
    (root / "arch" / "x86" / "kernel" / "kvm.c").write_text(KVM_C)
    return root


@needs_patch
def test_dry_run_applies_a_series_without_touching_the_tree(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "src")
    first = tmp_path / "no-ack.patch"
    first.write_text(GIT)
    second = tmp_path / "new-file.patch"
    second.write_text("--- /dev/null\n+++ b/arch/x86/kernel/apflab.c\n@@ -0,0 +1 @@\n+int x;\n")
    third = tmp_path / "edit-new-file.patch"
    third.write_text(
        "--- a/arch/x86/kernel/apflab.c\n+++ b/arch/x86/kernel/apflab.c\n"
        "@@ -1 +1 @@\n-int x;\n+int y;\n"
    )
    patches.dry_run(tree, [first, second, third], "fake-6.1")
    assert (tree / "arch" / "x86" / "kernel" / "kvm.c").read_text() == KVM_C
    assert not (tree / "arch" / "x86" / "kernel" / "apflab.c").exists()


@needs_patch
def test_dry_run_names_the_failing_patch_and_hunk(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "src")
    good = tmp_path / "no-ack.patch"
    good.write_text(UNIFIED)
    with pytest.raises(UsageError) as err:  # the same patch twice: the second cannot apply
        patches.dry_run(tree, [good, good], "fake-6.1")
    message = str(err.value)
    assert message.startswith(f"patch {good} does not apply to fake-6.1 with -p1")
    assert "arch/x86/kernel/kvm.c" in message
    assert "\n" not in message


@needs_patch
def test_dry_run_refuses_fuzz(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "src")
    fuzzy = tmp_path / "fuzzy.patch"
    fuzzy.write_text(
        UNIFIED.replace(" \t\tkvm_async_pf_task_wake(token);", " \t\tsomething_else();")
    )
    with pytest.raises(UsageError, match=r"Hunk #1 FAILED"):
        patches.dry_run(tree, [fuzzy], "fake-6.1")


def test_dry_run_names_a_file_the_source_lacks(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "src")
    other = tmp_path / "other.patch"
    other.write_text(UNIFIED.replace("arch/x86/kernel/kvm.c", "virt/kvm/async_pf.c"))
    with pytest.raises(UsageError, match=r"changes virt/kvm/async_pf\.c, which fake-6\.1 does not"):
        patches.dry_run(tree, [other], "fake-6.1")


def test_failure_summary() -> None:
    out = "checking file arch/x86/kernel/kvm.c\nHunk #1 FAILED at 302.\n1 out of 1 hunk FAILED\n"
    assert patches.failure_summary(out) == "arch/x86/kernel/kvm.c: Hunk #1 FAILED at 302"
    assert patches.failure_summary("") == "patch gave no reason"


@pytest.mark.parametrize("name", ["no-ack.patch", "ack-faults.patch"])
def test_project_patches_are_unified_diffs_of_kvm_c(name: str) -> None:
    path = Path(__file__).parents[2] / "guest_images" / "kernel" / "patches" / name
    text = patches.read_patch(path)
    assert patches.touched_files(text) == ["arch/x86/kernel/kvm.c"]
