"""The ``apflab`` entry point: the parser of every subcommand, signals, and how each
error family maps to an exit code (:mod:`apflab.cli.exitcodes`)."""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType

from apflab import __version__, paths
from apflab.cli import host, kernel, lab, regress, run, suite
from apflab.cli.args import Parser
from apflab.cli.exitcodes import EXIT_ERROR, EXIT_USAGE
from apflab.errors import ApflabError, PreflightError, UsageError, is_disk_full

log = logging.getLogger("apflab")


class Terminated(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that every ``with`` block unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


#: the commands that only read files: any user may run them
NO_ROOT = frozenset({"analyze", "judge", "compare", "history", "doctor"})


def build_parser() -> Parser:
    p = Parser(prog="apflab", description="KVM async page fault integration tests")
    p.add_argument("--version", action="version", version=f"apflab {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (host, kernel, lab, regress, run, suite):
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("paramiko", "qemu.qmp", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    func: Callable[..., int] = args.func
    if args.command not in NO_ROOT and os.geteuid() != 0:
        print(
            f"apflab: `apflab {args.command}` needs root (it drives cgroups, swap, tracefs, "
            "KVM and the machine caches): run it as root, e.g. with sudo",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return func(args)
    except UsageError as err:
        print(f"apflab: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PreflightError as err:
        print(f"apflab: pre-flight: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("apflab: interrupted; cleanup done", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"apflab: {err}; cleanup done", file=sys.stderr)
        return 128 + err.signum
    except ApflabError as err:
        log.debug("error", exc_info=True)
        print(f"apflab: ERROR: {err}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError as err:
        if not _stdout_closed():
            return _unexpected(err)
        # `apflab analyze ... | head`: the reader has what it wanted; not an error of
        # ours, and nothing more can be said on stdout (its flush at exit would fail too)
        _mute_stdout()
        return 128 + signal.SIGPIPE
    except OSError as err:
        if not is_disk_full(err) or err.filename is not None:
            return _unexpected(err)
        # a write with no file name: stdout (`apflab analyze ... > /dev/full`) or an open
        # results file on a full disk; the flush at exit would fail again
        print(
            f"apflab: ERROR: {err.strerror} while writing the output (stdout or the results "
            "directory): free some space, or send them elsewhere",
            file=sys.stderr,
        )
        _mute_stdout()
        return EXIT_ERROR
    except Exception as err:  # a bug of ours: one line here, the traceback in a file
        return _unexpected(err)


def _mute_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for it cannot be written, and
    its flush at exit would fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _unexpected(err: Exception) -> int:
    where = _crash_log(err)
    what = f"unexpected {type(err).__name__}: {err}"
    print(f"apflab: ERROR ({what}); see {where}", file=sys.stderr)
    return EXIT_ERROR


def _stdout_closed() -> bool:
    """Is stdout a pipe or socket whose reader has gone (POLLERR, always reported)?"""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), 0)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _crash_log(err: BaseException) -> str:
    """Write the traceback of an unexpected exception to a file; return its path."""
    text = "".join(traceback.format_exception(err))
    try:
        root = paths.runtime_root() / "crashes"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{paths.new_run_id('crash')}.log"
        path.write_text(text)
        return str(path)
    except OSError as write_err:  # a full disk: the traceback goes to the debug log only
        log.debug("%s", text)
        return f"no crash log ({write_err.strerror}; the run's debug log has the traceback)"


if __name__ == "__main__":
    sys.exit(main())
