"""`regscale VERB ...`: parses arguments and calls one function per verb.

Heavy imports (torch, mlflow, submitit) happen inside the verbs, so `regscale config` is instant.
An expected failure (a `UserError`: bad input; an `OSError`: a path the system refuses) is printed
as one line and exits 2; Ctrl-C exits 130. Neither shows a traceback unless REGSCALE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn

from regscale.config import ConfigError, check_no_credentials, config_hash, load_config, to_yaml
from regscale.data import commands as data
from regscale.errors import debug, expected_failure, has_control_character
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
    """Submit training (+ chained evaluation); with --dry-run, the plan only, after the same checks
    (what a real submit would refuse about the run's files is a warning in the plan)."""
    from regscale.launch.plan import format_plan, make_plan
    from regscale.launch.submit import check_request, submit

    if args.dry_run:
        request = check_request(args.recipe, args.overrides, local=args.local, sweep=args.sweep)
        cfg = request.base
        print(format_plan(cfg, make_plan(cfg)))
        print(f"config hash    {config_hash(cfg)}")
        if args.sweep:
            print(f"sweep          {len(request.runs)} runs: {', '.join(str(c.run.name) for c in request.runs)}")
        print("dry run: nothing submitted")
        return 0
    return submit(args.recipe, args.overrides, local=args.local, sweep=args.sweep)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def check_texts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """No argument of the verb (a path, a name, a URI) may be empty, hold a control character or
    carry credentials; the overrides are the configuration's to judge."""
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in verbs.choices[args.verb]._actions:
        value = getattr(args, action.dest, None)
        if action.dest == "overrides" or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and (not item.strip() or has_control_character(item)):
                name = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
                parser.error(f"{name} {item!r}: expected a non-empty value without control characters")
            if isinstance(item, str):
                try:
                    check_no_credentials(item, action.option_strings[-1] if action.option_strings
                                         else action.metavar or action.dest)
                except ConfigError as err:
                    parser.error(str(err))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The verb's arguments; its options may stand anywhere among its key=value overrides
    (`regscale submit RECIPE a=1 --dry-run b=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    check_texts(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if debug():
            traceback.print_exc()
        print(f"regscale {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `regscale status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:
        message = expected_failure(err)
        if message is None:  # a bug: Python's traceback is the report
            raise
        if debug():
            traceback.print_exc()
        print(f"regscale {args.verb}: error: {message}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
