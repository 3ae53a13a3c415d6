"""`medgen config show STAGE`: every key of a training stage's config with its default, what it
allows and what it does (the schemas: medgen/train/schema.py, medgen/data/config.py)."""

from __future__ import annotations

import argparse
import importlib

from medgen.config import annotated_yaml, load_config
from medgen.train.commands import STAGES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list every config key of a training stage with its default and allowed values",
                       description="Inspect configs. The schema (every key, its type, default and allowed values) lives "
                                   "in medgen/train/schema.py and medgen/data/config.py.")
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print a stage's config: defaults, or a --config file with overrides, resolved",
                              description="Print every key of STAGE's config with its value, what it allows and what it "
                                          "does. With --config and key=value overrides: the config a run would use.")
    show.add_argument("stage", choices=sorted(STAGES), metavar="STAGE", help=f"one of {', '.join(sorted(STAGES))}")
    show.add_argument("--config", default=None, help="experiment YAML to resolve (default: the schema's defaults)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as for `medgen train`")
    show.set_defaults(func=_show_cmd)


def _show_cmd(args: argparse.Namespace) -> int:
    schema = importlib.import_module(STAGES[args.stage][0]).DEFAULTS
    print(annotated_yaml(load_config(args.config, args.overrides, schema), schema), end="")
    return 0
