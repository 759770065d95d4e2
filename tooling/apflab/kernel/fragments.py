"""Kernel config fragments: parse, validate against a source's Kconfig, merge, verify.

A fragment is a ``.config`` excerpt: ``CONFIG_X=y``, ``CONFIG_X=n``, ``CONFIG_X="text"``,
``CONFIG_X=123`` / ``0x1f``, or ``# CONFIG_X is not set``; blank lines and other ``#``
comments are ignored.  ``=m`` is refused: apflab's kernels boot without modules.

Everything here is pure (text in, values out) except :func:`kconfig_symbols`, which scans
a source tree's Kconfig files for ``config FOO`` / ``menuconfig FOO`` (a second or so).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apflab.errors import UsageError

_SET = re.compile(r'CONFIG_([A-Za-z0-9_]+)=(y|n|m|"(?:[^"\\]|\\.)*"|-?[0-9]+|0x[0-9a-fA-F]+)')
_UNSET = re.compile(r"# CONFIG_([A-Za-z0-9_]+) is not set")
_KCONFIG_DEF = re.compile(r"^[ \t]*(?:menu)?config[ \t]+([A-Za-z0-9_]+)[ \t]*$", re.MULTILINE)
_PATCH_KCONFIG_DEF = re.compile(r"^\+[ \t]*(?:menu)?config[ \t]+([A-Za-z0-9_]+)[ \t]*$", re.M)


@dataclass(frozen=True)
class Setting:
    """One line of a fragment.

    :ivar symbol: without the ``CONFIG_`` prefix
    :ivar value: ``y``, ``n``, a quoted string (quotes kept) or a number as written
    :ivar origin: ``file:line`` for messages
    """

    symbol: str
    value: str
    origin: str

    def line(self) -> str:
        """The ``.config`` line for this setting."""
        if self.value == "n":
            return f"# CONFIG_{self.symbol} is not set"
        return f"CONFIG_{self.symbol}={self.value}"


def parse_fragment(text: str, name: str) -> list[Setting]:
    """Parse a fragment's text; ``name`` (its path) is used in messages.

    :raises UsageError: on the first line that is not a config line, or sets ``=m``
    """
    settings: list[Setting] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        origin = f"{name}:{number}"
        if not line:
            continue
        unset = _UNSET.fullmatch(line)
        if unset:
            settings.append(Setting(unset.group(1), "n", origin))
            continue
        if line.startswith("#"):
            continue
        match = _SET.fullmatch(line)
        if not match:
            raise UsageError(
                f"config fragment {origin}: {line!r} is not a config line; write "
                "CONFIG_X=y|n|\"string\"|number or '# CONFIG_X is not set'"
            )
        symbol, value = match.groups()
        if value == "m":
            raise UsageError(
                f"config fragment {origin}: CONFIG_{symbol}=m asks for a module, but apflab "
                "kernels boot without modules; use =y or '# CONFIG_" + symbol + " is not set'"
            )
        settings.append(Setting(symbol, value, origin))
    return settings


def kconfig_symbols(tree: Path) -> frozenset[str]:
    """Every symbol defined by a ``config``/``menuconfig`` line in the tree's Kconfig files."""
    symbols: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("Kconfig"):
                text = (Path(dirpath) / filename).read_text(errors="replace")
                symbols.update(_KCONFIG_DEF.findall(text))
    return frozenset(symbols)


def symbols_added_by_patch(patch_text: str) -> set[str]:
    """Symbols a patch defines in a Kconfig file (``+config FOO`` lines)."""
    return set(_PATCH_KCONFIG_DEF.findall(patch_text))


def check_symbols(settings: Iterable[Setting], known: frozenset[str], source: str) -> None:
    """Refuse a setting whose symbol no Kconfig file of ``source`` defines.

    :raises UsageError: naming the fragment line, with the closest known symbols
    """
    for setting in settings:
        if setting.symbol in known:
            continue
        close = difflib.get_close_matches(setting.symbol, known, n=3, cutoff=0.8)
        hint = (
            f"did you mean {', '.join('CONFIG_' + c for c in close)}?"
            if close
            else ("check the spelling against the source's Kconfig files")
        )
        raise UsageError(
            f"config fragment {setting.origin}: CONFIG_{setting.symbol} is not a Kconfig "
            f"symbol of {source}; {hint}"
        )


def config_values(text: str) -> dict[str, str]:
    """Parse a full ``.config``: symbol -> value (``n`` for ``# ... is not set``)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        unset = _UNSET.fullmatch(line)
        if unset:
            values[unset.group(1)] = "n"
            continue
        if line.startswith("CONFIG_") and "=" in line:
            symbol, _, value = line[len("CONFIG_") :].partition("=")
            values[symbol] = value
    return values


def merge(config_text: str, settings: Sequence[Setting]) -> str:
    """``config_text`` with each setting replacing any line for its symbol, appended in order.

    The same as ``scripts/kconfig/merge_config.sh -m``: later settings win.  Run
    ``make olddefconfig`` on the result to resolve dependencies.
    """
    final: dict[str, Setting] = {}
    for setting in settings:
        final.pop(setting.symbol, None)  # the last one wins, at its own position
        final[setting.symbol] = setting
    kept = [line for line in config_text.splitlines() if _line_symbol(line) not in final]
    return "\n".join([*kept, *(s.line() for s in final.values())]) + "\n"


def _line_symbol(line: str) -> str | None:
    stripped = line.strip()
    unset = _UNSET.fullmatch(stripped)
    if unset:
        return unset.group(1)
    if stripped.startswith("CONFIG_") and "=" in stripped:
        return stripped[len("CONFIG_") :].partition("=")[0]
    return None


def _same_value(wanted: str, got: str | None) -> bool:
    if wanted == "n":
        return got in (None, "n")
    if got is None:
        return False
    if wanted == got:
        return True
    try:
        return int(wanted, 0) == int(got, 0)
    except ValueError:
        return False


def unmet(settings: Sequence[Setting], final_config: str) -> list[tuple[Setting, str | None]]:
    """Settings whose value did not survive ``olddefconfig``: (setting, final value or None).

    Only the last setting of each symbol counts (it is the one that was merged).
    """
    values = config_values(final_config)
    last: dict[str, Setting] = {s.symbol: s for s in settings}
    return [
        (s, values.get(s.symbol))
        for s in last.values()
        if not _same_value(s.value, values.get(s.symbol))
    ]
