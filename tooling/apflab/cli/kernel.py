"""``apflab kernel build``: a guest kernel from a source, patches and config fragments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apflab import kernel
from apflab.cli.args import Parser, existing_file
from apflab.cli.exitcodes import EXIT_OK
from apflab.cli.output import emit_err


def cmd_build(args: argparse.Namespace) -> int:
    spec = kernel.KernelSpec(
        source=args.source, patches=tuple(args.patch), configs=tuple(args.config)
    )
    built = kernel.build(spec, progress=emit_err, cache=args.cache)
    if args.json:
        print(json.dumps(built.to_dict(), indent=1))
    else:
        print(built.bzimage)
    return EXIT_OK


def register(sub: Any) -> None:
    k = sub.add_parser("kernel", help="guest kernels under test: build (cached)")
    ks = k.add_subparsers(dest="kernel_command", required=True, parser_class=Parser)
    b = ks.add_parser(
        "build",
        help="build (or find cached) a guest kernel; prints the bzImage path",
        description="A bzImage that boots the apflab guest image without modules or initrd, "
        "from a small base config (guest_images/kernel/) plus fragments; cached machine-wide "
        "by (source, patches, config).",
    )
    b.add_argument(
        "--source",
        default=kernel.DEFAULT_SOURCE,
        help=f"{', '.join(kernel.DEBIAN_SOURCES)}, a kernel git tree or a tarball "
        "(default %(default)s)",
    )
    b.add_argument("--patch", type=existing_file, action="append", default=[], metavar="FILE")
    b.add_argument("--config", type=existing_file, action="append", default=[], metavar="FRAGMENT")
    b.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"kernel cache (default $APFLAB_KERNEL_CACHE or {kernel.cache_dir()})",
    )
    b.add_argument("--json", action="store_true", help="print the build record as JSON")
    b.set_defaults(func=cmd_build)
