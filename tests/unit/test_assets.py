"""The lab's assets: the source shipped into L1 carries its bytecode."""

import importlib.util
from pathlib import Path

from apflab import paths
from apflab.lab.assets import _copy_source


def test_the_shipped_source_has_hash_checked_bytecode(tmp_path: Path) -> None:
    repo = paths.repo_root()
    assert repo is not None
    _copy_source(repo, tmp_path)
    src = tmp_path / "tooling" / "apflab" / "host" / "doctor.py"
    pyc = Path(importlib.util.cache_from_source(str(src)))
    header = pyc.read_bytes()[:16]
    assert header[:4] == importlib.util.MAGIC_NUMBER
    # PEP 552 flags: bit 0 hash-based, bit 1 check_source
    assert int.from_bytes(header[4:8], "little") == 0b11
    assert not list((tmp_path / "tooling").rglob("*.cpython-*.opt-*.pyc"))


def test_the_compiled_analyzer_stays_on_this_host(tmp_path: Path) -> None:
    """L1 runs the source: the extensions make native built here (for this host's
    Python) and their stamp do not ship."""
    repo = paths.repo_root()
    assert repo is not None
    _copy_source(repo, tmp_path)
    assert (tmp_path / "tooling" / "apflab" / "analysis" / "parse.py").is_file()
    assert not list((tmp_path / "tooling").rglob("*.so"))
    assert not list((tmp_path / "tooling").rglob(".native.json"))
