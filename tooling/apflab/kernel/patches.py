"""Patches for a kernel under test: recognise them, dry-run a series, apply it.

A patch is a unified diff (``diff -u``) or a git diff / ``git format-patch`` mail, applied
with ``patch -p1`` from the top of the source tree.  Hunks may move (offsets are fine) but
not fuzz: ``--fuzz=0``, so a patch never lands on the wrong lines silently.

:func:`patch_kind` and :func:`touched_files` are pure; :func:`dry_run` applies the whole
series to a scratch copy of just the files it touches (milliseconds, and a later patch sees
what the earlier ones did); :func:`apply` runs the same command in a real tree.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from apflab.errors import CommandError, UsageError
from apflab.process import CmdResult, run

PATCH_ARGS = ("-p1", "--batch", "--forward", "--fuzz=0", "--no-backup-if-mismatch")

_MINUS = re.compile(r"^--- (\S+)", re.MULTILINE)
_PLUS = re.compile(r"^\+\+\+ (\S+)", re.MULTILINE)
_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@", re.MULTILINE)
_GIT = re.compile(r"^diff --git ", re.MULTILINE)
_FAILED = re.compile(
    r"Hunk #\d+ FAILED.*|.*can't find file.*|.*Reversed \(or previously applied\).*"
    r"|.*malformed patch.*|.*Only garbage was found.*"
)


def patch_kind(text: str) -> str | None:
    """``"git"``, ``"unified"``, or None when ``text`` holds no unified hunks.

    Binary git patches are refused (None): ``patch`` cannot apply them.
    """
    if "GIT binary patch" in text:
        return None
    if not (_MINUS.search(text) and _PLUS.search(text) and _HUNK.search(text)):
        return None
    return "git" if _GIT.search(text) else "unified"


def file_pairs(text: str) -> list[tuple[str | None, str | None]]:
    """(old, new) path of each file in the patch after ``-p1``; None for /dev/null."""
    pairs: list[tuple[str | None, str | None]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        minus, plus = _MINUS.match(line), _PLUS.match(lines[i + 1])
        if minus and plus:
            pairs.append((_strip1(minus.group(1)), _strip1(plus.group(1))))
    return pairs


def _strip1(name: str) -> str | None:
    if name == "/dev/null":
        return None
    return name.split("/", 1)[1] if "/" in name else name


def touched_files(text: str) -> list[str]:
    """Paths (after ``-p1``) that the patch reads or writes, in order, without duplicates."""
    paths: list[str] = []
    for pair in file_pairs(text):
        for name in pair:
            if name is not None and name not in paths:
                paths.append(name)
    return paths


def missing_files(text: str, tree: Path) -> list[str]:
    """Files the patch changes or deletes that ``tree`` does not have."""
    return [old for old, _new in file_pairs(text) if old is not None and not (tree / old).is_file()]


def read_patch(path: Path) -> str:
    """The text of a patch file after checking it is one.

    :raises UsageError: missing, unreadable, or not a unified/git diff
    """
    if not path.is_file():
        raise UsageError(
            f"patch {path}: no such file; give the path of a unified diff (diff -u or git diff)"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"patch {path}: cannot read it as text ({err})") from err
    if patch_kind(text) is None:
        raise UsageError(
            f"patch {path} is not a unified or git diff (needs '--- a/…', '+++ b/…' and '@@' "
            "hunk lines; no binary parts); make it with `git diff` or `diff -u`"
        )
    for name in touched_files(text):
        if name.startswith("/") or ".." in Path(name).parts:
            raise UsageError(
                f"patch {path} names {name!r} outside the source tree; make it with `git diff`"
            )
    return text


def dry_run(tree: Path, patches: Sequence[Path], source: str) -> None:
    """Apply the series to a scratch copy of the files it touches.

    :raises UsageError: naming the first patch that does not apply, and the failing hunk
    """
    texts = [read_patch(p) for p in patches]
    with tempfile.TemporaryDirectory(prefix="apflab-patch-") as scratch:
        root = Path(scratch)
        created: set[str] = set()  # by an earlier patch of the series
        for patch, text in zip(patches, texts, strict=True):
            absent = [name for name in missing_files(text, tree) if name not in created]
            created.update(new for old, new in file_pairs(text) if old is None and new)
            if absent:
                raise UsageError(
                    f"patch {patch} changes {absent[0]}, which {source} does not have; "
                    "make the patch against that source"
                )
            for name in touched_files(text):
                original = tree / name
                copy = root / name
                if original.is_file() and not copy.exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(original, copy)
        for patch in patches:
            result = _patch(root, patch)
            if not result.ok:
                raise UsageError(
                    f"patch {patch} does not apply to {source} with -p1 (no fuzz): "
                    f"{failure_summary(result.stdout + result.stderr)}; rebase it on that source"
                )


def apply(tree: Path, patches: Sequence[Path]) -> list[CmdResult]:
    """Apply the series in ``tree`` (files are replaced, so they get a new mtime).

    :raises CommandError: when a patch fails (:func:`dry_run` should have said so first)
    """
    results = []
    for patch in patches:
        result = _patch(tree, patch)
        if not result.ok:
            raise CommandError(f"patch {patch} failed in {tree}: {result.describe()}", result)
        results.append(result)
    return results


def _patch(tree: Path, patch: Path) -> CmdResult:
    try:
        return run(["patch", *PATCH_ARGS, "-d", tree, "-i", patch.resolve()], check=False)
    except CommandError as err:  # patch(1) itself missing
        raise UsageError("patch(1) is not installed; apt-get install patch") from err


def failure_summary(output: str) -> str:
    """What failed, from ``patch`` output: the file and the first failing hunk."""
    current = ""
    for line in output.splitlines():
        if line.startswith(("patching file ", "checking file ")):
            current = line.split(" ", 2)[2].strip().strip("'")
        elif _FAILED.fullmatch(line):
            what = line.strip().rstrip(".")
            return f"{current}: {what}" if current else what
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "patch gave no reason"
