"""CLI verbs of regscale.train: `register` adds their sub-parsers; handlers import lazily."""

from __future__ import annotations

import argparse
from pathlib import Path

from regscale.cliargs import non_negative_int


def cmd_train(args: argparse.Namespace) -> int:
    """One training process (start one per GPU: srun, torchrun, or plain for one process)."""
    from regscale.config import check_paths_for_training, load_config
    from regscale.data.shards import check_dataset
    from regscale.dist import read_layout
    from regscale.paths import check_run_dir
    from regscale.train.loop import train

    cfg = load_config(args.recipe, args.overrides)
    check_paths_for_training(cfg)
    check_dataset(cfg.data.path, cfg.data.synthetic)
    run_dir = Path(cfg.run.dir) / str(cfg.run.name)
    main = read_layout().is_main
    if main:  # before rank 0 writes there (the other ranks would find its files)
        check_run_dir(run_dir, cfg.data.path)
    tracker = None
    if not args.no_track and main:
        from regscale.track.lineage import tracking_uri
        from regscale.track.mlflow import Tracker
        from regscale.track.store import check_store

        check_store(tracking_uri(cfg, run_dir), "the MLflow store (mlflow.tracking_uri)", reading=False)

        tracker = Tracker.open(cfg, run_dir, recipe=Path(args.recipe))
    outcome = train(cfg, run_dir, tracker)
    print(f"regscale train: {outcome.value}")
    return outcome.exit_code


EXPORT_METADATA = ("step", "weights", "config_hash")  # what `regscale export` writes into every file


def is_export(path: Path) -> bool:
    """Whether `path` is a safetensors file written by `regscale export` (which may be replaced)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return all(key in meta for key in EXPORT_METADATA)


def cmd_export(args: argparse.Namespace) -> int:
    """One consolidated safetensors file from a run's checkpoint, whatever engine/world size."""
    from safetensors import SafetensorError

    from regscale.config import load_saved_config
    from regscale.errors import UserError, one_line
    from regscale.fsutil import NoSpaceError, no_space_message
    from regscale.paths import check_output
    from regscale.engine.export import export_safetensors
    from regscale.rundir import CONFIG

    out = check_output(args.out, "--out", inputs=[args.run_dir], suffixes=(".safetensors",), ours=is_export)
    if (Path(args.run_dir) / CONFIG).exists():  # it travels in the file's metadata: it must load
        load_saved_config(Path(args.run_dir) / CONFIG)
    try:
        manifest = export_safetensors(args.run_dir, args.out, step=args.step, weights=args.weights)
    except SafetensorError as err:  # the library's writer reports the OS's error inside its own
        if "os error 28" in str(err):
            raise NoSpaceError(no_space_message(out.parent)) from None
        raise UserError(f"--out {args.out}: cannot write it ({one_line(str(err))})") from None
    print(f"wrote {args.out}: {args.weights} weights of step {manifest['step']} "
          f"({manifest['engine']['kind']}, {manifest['world_size']} processes)")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
    p = verbs.add_parser("train", help="run one training process (per GPU; resumes by itself)",
                         description=cmd_train.__doc__)
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.lr=2e-4")
    p.add_argument("--no-track", action="store_true", help="no MLflow tracking (metrics.jsonl only)")
    p.set_defaults(fn=cmd_train)

    e = verbs.add_parser("export", help="write a checkpoint's weights as one safetensors file",
                         description=cmd_export.__doc__)
    e.add_argument("run_dir", metavar="RUN_DIR", help="runs/<name>")
    e.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (default: newest valid)")
    e.add_argument("--weights", choices=("ema", "model"), default="ema")
    e.add_argument("--out", required=True, metavar="FILE.safetensors")
    e.set_defaults(fn=cmd_export)
