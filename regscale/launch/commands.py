"""CLI verbs of regscale.launch: `register` adds their sub-parsers; handlers import lazily.

`regscale submit` itself is defined in regscale/cli.py and calls `regscale.launch.submit.submit`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_resume(args: argparse.Namespace) -> int:
    from regscale.launch.submit import resume

    return resume(Path(args.run_dir), args.overrides, local=args.local)


def cmd_status(args: argparse.Namespace) -> int:
    from regscale.launch.status import status

    return status(Path(args.run_dir))


def cmd_cancel(args: argparse.Namespace) -> int:
    from regscale.launch.status import cancel

    return cancel(Path(args.run_dir))


def cmd_logs(args: argparse.Namespace) -> int:
    from regscale.launch.logs import logs

    return logs(Path(args.run_dir), args.attempt, args.rank, args.follow)


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
    p = verbs.add_parser("resume", help="resubmit a stopped or failed run from its newest checkpoint",
                         description="Resubmit a stopped or failed run from its newest checkpoint. "
                                     "Only slurm.time_limit_min, slurm.nodes and slurm.partition may change.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--local", action="store_true", help="run on this machine (submitit's local executor)")
    p.set_defaults(fn=cmd_resume)
    p = verbs.add_parser("status", help="runs, SLURM state, requeues, last checkpoint, images/s, ETA",
                         description="Show one run in detail, or every run under a folder (default: runs).")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default="runs")
    p.set_defaults(fn=cmd_status)
    p = verbs.add_parser("logs", help="print the log of one process of one attempt of a run",
                         description="Print the log of one training process: by default the newest attempt "
                                     "and the rank that ended it (attempts numbered as `regscale status` shows).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--attempt", type=int, metavar="K", help="attempt number (1 = first; default: the newest)")
    p.add_argument("--rank", type=int, metavar="R", help="global rank (default: the one that ended the attempt)")
    p.add_argument("--follow", action="store_true", help="keep printing, across in-job restarts and requeues")
    p.set_defaults(fn=cmd_logs)
    p = verbs.add_parser("cancel", help="cancel the SLURM jobs of a run", description="Cancel the SLURM jobs of a run.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(fn=cmd_cancel)
