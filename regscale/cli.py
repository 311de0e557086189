"""`regscale VERB ...`: parses arguments and calls one function per verb.

Heavy imports (torch, mlflow, submitit) happen inside the verbs, so `regscale config` is instant.
A `ConfigError` (or any `UserError`) is printed as one line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from regscale.config import config_hash, load_config, to_yaml
from regscale.data import commands as data
from regscale.errors import UserError
from regscale.eval import commands as evaluation
from regscale.launch import commands as launch
from regscale.models import commands as models
from regscale.track import commands as track
from regscale.train import commands as train


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration and its hash."""
    cfg = load_config(args.recipe, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    print(f"# config hash: {config_hash(cfg)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit training (+ chained evaluation); with --dry-run, print the plan only (what a real
    submit would refuse about the run's files is a warning in it)."""
    from regscale.launch.plan import format_plan, make_plan

    cfg = load_config(args.recipe, args.overrides)
    if args.dry_run:
        print(format_plan(cfg, make_plan(cfg)))
        print(f"config hash    {config_hash(cfg)}")
        print("dry run: nothing submitted")
        return 0
    from regscale.launch.submit import submit

    return submit(args.recipe, args.overrides, local=args.local, sweep=args.sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regscale",
        description="Train SiT diffusion transformers with REG at cluster scale.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def recipe_verb(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("recipe", metavar="RECIPE", help="recipe YAML (see recipes/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.lr=2e-4")
        p.set_defaults(fn=fn)
        return p

    recipe_verb("config", cmd_config, "print the resolved configuration and its hash")
    submit = recipe_verb("submit", cmd_submit, "submit a training run (SLURM or local) with its evaluation")
    submit.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    submit.add_argument("--local", action="store_true", help="run here through submitit's local executor")
    submit.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                        help="one run per value (repeat for a grid); a SLURM job array")
    for area in (models, data, train, evaluation, launch, track):
        area.register(verbs)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The verb's arguments; its options may stand anywhere among its key=value overrides
    (`regscale submit RECIPE a=1 --dry-run b=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.fn(args)
    except UserError as err:
        print(f"regscale {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"regscale {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
