"""CLI verbs of regscale.eval: `register` adds their sub-parsers; handlers import lazily.

    regscale sample CHECKPOINT_OR_RUN [k=v ...]   samples.npz (ADM format) from a run or an export
    regscale eval SAMPLES.npz --ref REF.npz        FID, sFID, IS, precision, recall the ADM way

Both run on every rank when launched by torchrun or srun, and alone otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from regscale.cliargs import non_negative_int, positive_int
from regscale.errors import UserError, first_line
from regscale.rundir import CHECKPOINTS, CONFIG, EVAL, EVAL_RECORD, EVAL_SAMPLES, EVAL_SHARDS, step_name

SAMPLING_OUTPUTS = (EVAL_SAMPLES, EVAL_SHARDS, EVAL_RECORD)  # what marks a folder as sampling's


def is_sampling_output(folder: Path) -> bool:
    """A folder that `regscale sample` (or the evaluation job) wrote: sampling may resume in it."""
    return any((folder / name).exists() for name in SAMPLING_OUTPUTS)


def is_eval_record(path: Path) -> bool:
    """A JSON record written by `regscale eval` (which may be replaced by a new one)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "metrics" in record and "evaluator" in record


def _export_config_text(target: Path) -> str | None:
    """The run configuration a `regscale export` file carries (None: none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(target), "pt") as f:
            return (f.metadata() or {}).get("config")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{target}: not a readable safetensors file ({first_line(err)})") from None


def _target_config(target: Path, recipe: str | None, overrides: list[str]):
    """The Config for sampling `target`: --recipe, the run's config.yaml, or the export's metadata;
    overrides only of keys that do not define the trained model (eval.*, vae.decoder, ...)."""
    from regscale.config import from_yaml_text, load_config, resumable

    for item in overrides:
        key = item.partition("=")[0]
        if "=" in item and not resumable(key):
            raise UserError(f"sample: '{key}' is fixed by the trained weights and their run; set eval.* "
                            "keys (sampling settings) only")

    if target.suffix == ".safetensors" and target.is_file():
        text = _export_config_text(target)  # also: the file is readable, before any work
        if recipe is not None:
            return load_config(recipe, overrides)
        if text is None:
            raise UserError(f"{target}: the export carries no configuration; pass --recipe RECIPE "
                            "(the model section must match the weights)")
        return from_yaml_text(text, f"{target} (its configuration)", overrides)
    if recipe is not None:
        return load_config(recipe, overrides)
    if target.is_dir():
        if not (target / CONFIG).is_file():
            raise UserError(f"{target}: not a run directory (no {CONFIG}); give a run directory "
                            "or a .safetensors export")
        return load_config(target / CONFIG, overrides)
    raise UserError(f"{target}: no such run directory or .safetensors file")


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw eval.num_samples images into an ADM-format .npz (resumable)."""
    from regscale.dist import teardown
    from regscale.eval.job import dist_setup, sample_checkpoint
    from regscale.paths import check_output, writing_into

    target = Path(args.target)
    cfg = _target_config(target, args.recipe, args.overrides)
    if target.is_file() and args.step is not None:
        raise UserError(f"--step {args.step}: {target} is an export of one checkpoint; --step picks a "
                        "checkpoint of a run directory")
    if target.is_file() and args.weights is not None:
        raise UserError(f"--weights {args.weights}: {target} holds the weights it was exported with; "
                        "--weights picks them in a run directory")
    step = args.step
    if target.is_dir() and step is None:  # pin the newest valid checkpoint
        from regscale.checkpoints import find_valid

        found = find_valid(target / CHECKPOINTS)
        if found is None:
            raise UserError(f"{target / CHECKPOINTS}: no valid checkpoint to sample (broken ones are "
                            "named above; expected step_XXXXXXXX/ with manifest.json, written by `regscale train`)")
        step = found[1]["step"]
    if args.out:
        out = Path(args.out)
    elif target.is_dir():
        out = target / EVAL / step_name(step or 0)
    else:
        out = target.with_name(target.stem + "_samples")
    check_output(out, "--out" if args.out else "the output folder", inputs=[target, *filter(None, [args.recipe])],
                 kind="dir", ours=is_sampling_output)
    rank, _, device = dist_setup()
    try:
        with writing_into(out):
            npz, _ = sample_checkpoint(cfg, target, out, step, device, args.weights or "ema")
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

    from regscale.paths import check_output

    if args.inception and args.random_inception:
        raise UserError("--inception and --random-inception exclude each other")
    samples = Path(args.samples)
    out = Path(args.out) if args.out else samples.with_name(samples.stem + ".eval.json")
    if Path(args.ref).resolve() == samples.resolve():
        raise UserError(f"--ref {args.ref} is the samples file itself; give the ADM reference batch")
    check_output(out, "--out" if args.out else "the record", suffixes=(".json",), ours=is_eval_record,
                 inputs=[samples, args.ref, *filter(None, [args.inception])])
    try:
        record = evaluate_samples(samples, args.ref, inception=args.inception,
                                  random_inception=args.random_inception, batch_size=args.batch_size,
                                  num_samples=args.num_samples, pr_distances=args.pr_distances)
    finally:
        teardown()
    if record is None:  # not rank 0
        return 0
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
    p.add_argument("--step", type=non_negative_int, help="checkpoint step of a run directory (default: newest valid)")
    p.add_argument("--weights", choices=("ema", "model"), help="run directory: which weights (default: ema)")
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
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per forward, per process")
    p.add_argument("--num-samples", type=positive_int,
                   help="use the first N samples and require that many (default: all)")
    p.add_argument("--pr-distances", choices=("float16", "float32"), default="float16",
                   help="precision/recall distances: float16 as ADM (default), or float32")
    p.add_argument("--out", help="record JSON (default: SAMPLES.eval.json)")
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    p.set_defaults(fn=cmd_eval)
