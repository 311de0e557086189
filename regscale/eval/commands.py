"""CLI verbs of regscale.eval: `register` adds their sub-parsers; handlers import lazily.

    regscale sample CHECKPOINT_OR_RUN [k=v ...]   samples.npz (ADM format) from a run or an export
    regscale eval SAMPLES.npz --ref REF.npz        FID, sFID, IS, precision, recall the ADM way

Both run on every rank when launched by torchrun or srun, and alone otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _target_config(target: Path, recipe: str | None, overrides: list[str]):
    """The Config for sampling `target`: the run's config.yaml, --recipe, or the export's metadata."""
    from regscale.config import load_config
    from regscale.errors import UserError

    if recipe is not None:
        return load_config(recipe, overrides)
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise UserError(f"{target}: not a run directory (no config.yaml); give a run directory "
                            "or a .safetensors export")
        return load_config(target / "config.yaml", overrides)
    if target.suffix == ".safetensors" and target.is_file():
        from safetensors import safe_open

        with safe_open(str(target), "pt") as f:
            text = (f.metadata() or {}).get("config")
        if text is None:
            raise UserError(f"{target}: the export carries no configuration; pass --recipe RECIPE "
                            "(the model section must match the weights)")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
            tmp.write(text)
            tmp.flush()
            return load_config(tmp.name, overrides)
    raise UserError(f"{target}: no such run directory or .safetensors file")


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw eval.num_samples images into an ADM-format .npz (resumable)."""
    from regscale.dist import teardown
    from regscale.eval.job import dist_setup, sample_checkpoint
    from regscale.rundir import CHECKPOINTS, step_name

    target = Path(args.target)
    cfg = _target_config(target, args.recipe, args.overrides)
    rank, _, device = dist_setup()
    step = args.step
    if target.is_dir() and step is None:  # pin the newest valid checkpoint (none: loading says so)
        from regscale.checkpoints import find_valid

        found = find_valid(target / CHECKPOINTS)
        step = found[1]["step"] if found else None
    if args.out:
        out = Path(args.out)
    elif target.is_dir():
        out = target / "eval" / step_name(step or 0)
    else:
        out = target.with_name(target.stem + "_samples")
    try:
        npz, _ = sample_checkpoint(cfg, target, out, step, device, args.weights)
    finally:
        teardown()
    if rank == 0:
        ev = cfg.eval
        print(f"samples: {npz}  ({ev.num_samples} images, labels {ev.labels}, {ev.sampler} {ev.steps} steps, "
              f"cfg {ev.cfg_scale}, cls cfg {ev.cls_cfg_scale}, guidance [{ev.guidance_low}, {ev.guidance_high}])")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a samples .npz against an ADM reference batch."""
    from regscale.dist import teardown
    from regscale.eval.job import evaluate_samples, write_record

    samples = Path(args.samples)
    try:
        record = evaluate_samples(samples, args.ref, inception=args.inception,
                                  random_inception=args.random_inception, batch_size=args.batch_size,
                                  num_samples=args.num_samples, pr_distances=args.pr_distances)
    finally:
        teardown()
    if record is None:  # not rank 0
        return 0
    out = Path(args.out) if args.out else samples.with_name(samples.stem + ".eval.json")
    write_record(out, record)
    width = max(map(len, record["metrics"]))
    for name, value in record["metrics"].items():
        print(f"{name:<{width}}  {value:.4f}")
    if not record["comparable"]:
        print(f"WARNING: {record['note']}", file=sys.stderr)
    print(f"record: {out}")
    if args.json:
        print(json.dumps(record["metrics"]))
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
    p = verbs.add_parser("sample", help="draw samples from a run or an export into an ADM-format .npz",
                         description=cmd_sample.__doc__ + " Settings: the eval.* keys of the run's "
                         "configuration (or --recipe), overridable as key=value.")
    p.add_argument("target", metavar="CHECKPOINT_OR_RUN", help="run directory or .safetensors export")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.num_samples=10000 eval.cfg_scale=2.3")
    p.add_argument("--recipe", help="configuration for a .safetensors without one (its model section must match)")
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: newest valid)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="run directory: which weights")
    p.add_argument("--out", help="output directory (default: RUN/eval/step_XXXXXXXX or beside the export)")
    p.set_defaults(fn=cmd_sample)

    p = verbs.add_parser("eval", help="FID, sFID, IS, precision, recall of a samples .npz (ADM protocol)",
                         description=cmd_eval.__doc__)
    p.add_argument("samples", metavar="SAMPLES.npz", help="uint8 [N,H,W,3] images in arr_0")
    p.add_argument("--ref", help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz (with "
                   "--random-inception: any .npz whose arr_0 holds reference images)", required=True)
    p.add_argument("--inception", help="TF-ported Inception weights file (default: the torch-fidelity cache)")
    p.add_argument("--random-inception", action="store_true",
                   help="random network for tests only: every number is tagged not comparable")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward, per process")
    p.add_argument("--num-samples", type=int, help="use the first N samples and require that many (default: all)")
    p.add_argument("--pr-distances", choices=("float16", "float32"), default="float16",
                   help="precision/recall distances: float16 as ADM (default), or float32")
    p.add_argument("--out", help="record JSON (default: SAMPLES.eval.json)")
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    p.set_defaults(fn=cmd_eval)
