"""The `medgen` command line. Thin: parse, load config, call one function per subcommand.

Each stage registers its own subcommands in `<stage>/commands.py` with
`register(subparsers)`; the parser sets `func(args) -> int | None` on each leaf command.

Exit codes mean one thing each, so a script can tell a crash from a verdict: 0 ok / pass /
released, 1 fail / refused, 2 an error the user can fix (one `medgen: error:` line), 3
inconclusive, 70 an internal error (a bug: one `medgen: internal error:` line), 130 interrupted
(SIGINT), 143 terminated (SIGTERM). Interrupted and terminated runs remove their staging folders.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
import traceback
from typing import Iterator

from medgen.errors import MedgenError
from medgen.io import command_outputs

EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE of sysexits.h: a bug of medgen, never a verdict or a user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM (timeout, Slurm, docker stop)
ISSUES_URL = "https://github.com/medgen/medgen/issues"  # = pyproject.toml [project.urls] Issues

# Modules that provide `register(subparsers)`; each adds one top-level subcommand.
COMMAND_MODULES = (
    "medgen.demo",
    "medgen.train.config_show",
    "medgen.data.commands",
    "medgen.metrics.commands",
    "medgen.train.commands",
    "medgen.train.encode",
    "medgen.sample.commands",
    "medgen.privacy.commands",
    "medgen.recon.commands",
    "medgen.release.commands",
    "medgen.export.commands",
)


def build_parser() -> argparse.ArgumentParser:
    from medgen import __version__

    parser = argparse.ArgumentParser(prog="medgen", description="Generative medical imaging: train, sample, evaluate, audit.")
    parser.add_argument("--version", action="version", version=f"medgen {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` and `atomic_dir`'s cleanup runs
    (a BaseException: no `except Exception` swallows it)."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops the cleanup at once
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` (signal handlers live in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def internal_error_line(e: BaseException, verbose: bool) -> str:
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"medgen: internal error: {type(e).__name__}: {message} (please report it at {ISSUES_URL}"
            + ("" if verbose else "; rerun with --verbose for the traceback") + ")")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `key=value` overrides may sit anywhere among the options (argparse alone would take only
    # one contiguous run of positionals).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        with sigterm_raises(), command_outputs():
            code = args.func(args)
    except MedgenError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"medgen: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("medgen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("medgen: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        print(internal_error_line(e, args.verbose), file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
