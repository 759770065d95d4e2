"""Argument parsing shared by every ``apflab`` subcommand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from apflab.cli.exitcodes import EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse with bad input ending in exit code 4 (nothing was changed)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"apflab: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist or is not a file")
    return p.resolve()


def existing_trace(text: str) -> Path:
    """A trace file, or a raw capture directory (results/<run>/trace.raw)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not (p.is_file() or (p / "formats.txt").is_file()):
        raise argparse.ArgumentTypeError(
            f"{text} is neither a trace file nor a raw capture (a directory with formats.txt)"
        )
    return p.resolve()


def add_boot_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str) -> None:
    """How L1 comes up (LabConfig.boot): `lab up --boot`, `run --lab-boot`."""
    parser.add_argument(
        flag,
        choices=["saved", "cold"],
        default="saved",
        help="saved (default): restore L1 from a saved boot in the machine cache (the "
        "first lab of each L1 kernel, image and size boots cold and makes it); cold: boot it",
    )
