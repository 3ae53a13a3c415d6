"""The `medgen` command line. Thin: parse, load config, call one function per subcommand.

Each stage registers its own subcommands in `<stage>/commands.py` with
`register(subparsers)`; the parser sets `func(args) -> int | None` on each leaf command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from medgen.errors import MedgenError

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
        code = args.func(args)
    except MedgenError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"medgen: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("medgen: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
