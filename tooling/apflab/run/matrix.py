"""A variants file (Avocado yaml_to_mux) as cells: a name and a scenario each.

The matrix of ``apflab nightly`` and the controls of the functional suite
(tests/functional/controls.yaml) are such files: each variant's params are
scenario options (``patch``, ``kernel_source``, ``cmdline``, ``rounds``, ...), so
the same file drives ``avocado run tests/functional/test_apf.py -m FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apflab.errors import UsageError
from apflab.run.scenario import Scenario


@dataclass(frozen=True)
class Cell:
    """One variant of the matrix: its name (the variant's path) and scenario."""

    name: str
    scenario: Scenario


def cells_of(matrix: Path) -> list[Cell]:
    """The matrix's variants.

    :raises UsageError: the file is not a variants file, or a param is not a
        scenario option's valid value (one line)
    """
    # Avocado only here.  The loader first: importing mux first starts Avocado's plugin
    # initialisation, which imports the loader, which needs mux complete (a cycle)
    from avocado_varianter_yaml_to_mux import varianter_yaml_to_mux as loader  # noqa: PLC0415, I001
    from avocado_varianter_yaml_to_mux import mux  # noqa: PLC0415

    try:
        tree = loader.create_from_yaml([str(matrix)])
        variants = list(mux.MuxTree(tree))
    except Exception as err:  # yaml_to_mux raises several unrelated types
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"matrix {matrix}: not a yaml_to_mux variants file ({line})") from None
    known = {o.name for o in Scenario.options()}
    cells = []
    for variant in variants:
        params: dict[str, Any] = {}
        for node in variant:
            params.update(node.environment)
        name = "-".join(node.path.rsplit("/", 1)[-1] for node in variant) or "default"
        values = {k: v for k, v in params.items() if k in known}
        try:
            cells.append(Cell(name, Scenario.from_values(values)))
        except UsageError as err:
            raise UsageError(f"matrix {matrix}, variant {name}: {err}") from None
    if not cells:
        raise UsageError(f"matrix {matrix}: no variant in it")
    return cells
