"""CLI verbs of regscale.track: `register` adds their sub-parsers; handlers import lazily."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from regscale.errors import UserError
from regscale.rundir import MLFLOW_DB
from regscale.track.store import check_store


def _store(args: argparse.Namespace) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the SQLite store in --runs-dir (must exist),
    checked: a usable URI, a reachable server, a file that is an SQLite database."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_store(uri, "--tracking-uri" if args.tracking_uri else "$MLFLOW_TRACKING_URI", reading=True)
        return uri
    db = Path(args.runs_dir).resolve() / MLFLOW_DB
    if not db.is_file():
        raise UserError(f"no MLflow store at {db} (nothing tracked there yet); pass --runs-dir DIR "
                        "(the recipe's run.dir) or --tracking-uri URI")
    uri = f"sqlite:///{db}"
    check_store(uri, "--runs-dir", reading=True)
    return uri


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the comparison table; write the plot and the CSV when asked."""
    from regscale.paths import check_output
    from regscale.track.compare import compare, is_compare_csv, is_compare_plot, plot, render_table, write_csv

    if args.runs and args.filter:
        raise UserError("--filter selects among the experiment's runs: give RUN ... or --filter, not both")
    uri = _store(args)
    inputs = [*args.runs, *([uri[len("sqlite:///"):]] if uri.startswith("sqlite:///") else [])]
    if args.plot:
        check_output(args.plot, "--plot", inputs=inputs, suffixes=(".png",), ours=is_compare_plot)
    if args.csv:
        check_output(args.csv, "--csv", inputs=inputs, suffixes=(".csv",), ours=is_compare_csv)
    summaries = compare(uri, args.runs, args.experiment, args.filter)
    sys.stdout.write(render_table(summaries))
    if args.plot:
        plot(summaries, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.csv:
        write_csv(summaries, Path(args.csv))
        print(f"csv: {args.csv}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI for the store on 127.0.0.1 until Ctrl-C or SIGTERM."""
    from regscale.track.ui import serve

    uri = _store(args)
    if not uri.startswith("sqlite:"):
        print(f"runs are on the tracking server {uri}: open it in a browser")
        return 0
    return serve(uri, args.port, args.workers)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", metavar="DIR",
                   help="the recipes' run.dir: its mlflow.db is the default store (default: runs)")
    p.add_argument("--tracking-uri", metavar="URI", help="any MLflow tracking URI (overrides --runs-dir)")


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
    p = verbs.add_parser("compare", help="compare training runs: differing recipe keys, best FID, "
                         "images/s, GPU hours; --plot and --csv",
                         description="Compare training runs from MLflow: a table of the recipe keys "
                         "that differ, the best FID and its step, images/s and GPU hours.")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run ids, run directories or run names "
                   "(default: every training run of the experiment)")
    p.add_argument("--experiment", default="regscale", help="MLflow experiment (default: regscale)")
    p.add_argument("--filter", metavar="EXPR",
                   help="MLflow search filter over the experiment's training runs (when no RUN is given), "
                   "e.g. \"params.model.size = 'XL/2'\"")
    p.add_argument("--plot", metavar="OUT.png", help="write FID and loss against iterations")
    p.add_argument("--csv", metavar="OUT.csv", help="write the table as CSV")
    _store_args(p)
    p.set_defaults(fn=cmd_compare)

    p = verbs.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the runs' store",
                         description="Start the MLflow UI bound to 127.0.0.1 on the runs' store; say "
                         "where once it answers; Ctrl-C or SIGTERM stops it whole.")
    p.add_argument("--port", type=int, default=5000, help="port, 1-65535 (default: 5000)")
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes, 1 to 2 x the CPU cores (default: 1)")
    _store_args(p)
    p.set_defaults(fn=cmd_ui)
