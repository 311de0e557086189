"""CLI verbs of regscale.data: `register` adds their sub-parsers; handlers import lazily."""

from __future__ import annotations

import argparse

from regscale.cliargs import positive_int
from regscale.errors import UserError, first_line


def _part(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (for example 3/16), got {text!r}") from None
    return index, count


def _device(text: str) -> str:
    """A torch device that exists here (cpu, cuda, cuda:1, ...)."""
    import torch

    try:
        torch.empty(0, device=torch.device(text))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable torch device here ({first_line(err)})") from None
    return text


def _check_paths(src: str, out: str, stage: str | None) -> None:
    """SRC and OUT apart, OUT (or its staging folder) a writable place for a dataset."""
    from regscale.config import is_remote
    from regscale.paths import check_disjoint, check_output

    if is_remote(out):
        local, what = stage, "--stage"  # None: a temporary folder of its own
    elif stage is not None:
        raise UserError("--stage is for a remote OUT (s3://, gs://, ...); a local OUT is written in place")
    else:
        local, what = out, "OUT"
        check_disjoint(src, "SRC", out, "OUT")
    if local is not None:  # what an existing one holds is judged by prepare against its manifest
        check_output(local, what, kind="dir", inputs=[src], ours=lambda d: True)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Prepare SRC into MDS shards at OUT, or with --verify check OUT's shards."""
    if args.verify:
        from regscale.data.verify import verify

        if args.out is not None:
            raise UserError("--verify takes one argument: the dataset to check (regscale prepare --verify OUT)")
        problems, totals = verify(args.src, args.stage)
        for line in problems:
            print(f"BAD {line}")
        print(f"{args.src}: {totals['shards']} shards, {totals['samples']} samples, {totals['bytes']} bytes"
              + (f", {totals['skipped']} source files skipped at prepare time" if totals["skipped"] else ""))
        if problems:
            print(f"{len(problems)} problem(s); rerun `regscale prepare SRC {args.src}` after deleting the "
                  "chunk-NNNNNN folders named above to rebuild them")
            return 1
        print("OK")
        return 0
    from regscale.data.prepare import PrepareOptions, part_from_env, prepare
    from regscale.paths import writing_into

    if args.out is None:
        raise UserError("prepare needs SRC and OUT (or --verify OUT)")
    if args.vae is not None and args.random_vae:
        raise UserError("--vae and --random-vae exclude each other")
    _check_paths(args.src, args.out, args.stage)
    opts = PrepareOptions(vae=args.vae, random_vae=args.random_vae, image_encoding=args.image_encoding,
                          chunk_size=args.chunk_size, batch_size=args.batch_size,
                          part=args.part or part_from_env(), workers=args.workers, device=args.device,
                          stage=args.stage, progress=not args.quiet)
    with writing_into(args.stage or args.out):
        summary = prepare(args.src, args.out, opts)
    if not summary.complete:
        print(f"part {opts.part[0]}/{opts.part[1]} done; {summary.chunks_done}/{summary.chunks} chunks complete. "
              "The part that finishes last writes index.json (or rerun this command to finish).")
        return 0
    print(f"{args.out}: {summary.samples} samples in {len(summary.per_class)} classes, "
          f"{summary.bytes / 1e9:.3f} GB in shards")
    counts = sorted(summary.per_class.values())
    if counts:
        print(f"per class: min {counts[0]}, max {counts[-1]} (all counts in classes.json)")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable file(s) (listed in summary.json):")
        for item in summary.skipped[:10]:
            print(f"  {item['path']}: {item['error']}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
    p = verbs.add_parser("prepare", help="images -> ADM crop -> SD-VAE moments -> MDS shards (resumable)",
                         description="Prepare ImageNet-style images as MDS shards for training; "
                                     "with --verify, check a prepared dataset's shards.")
    p.add_argument("src", metavar="SRC", help="ImageFolder tree, or the REG layout (images/ + vae-sd/); "
                   "with --verify: the dataset to check")
    p.add_argument("out", metavar="OUT", nargs="?", help="output directory or remote URI (s3://, gs://, ...)")
    p.add_argument("--verify", action="store_true", help="check every shard's size, hashes and counts")
    p.add_argument("--vae", help="diffusers AutoencoderKL folder or cached Hub id (default stabilityai/sd-vae-ft-mse)")
    p.add_argument("--random-vae", action="store_true", help="tiny random VAE (smoke runs and tests only)")
    p.add_argument("--image-encoding", choices=("raw", "webp"), default="raw",  # shards.IMAGE_ENCODINGS
                   help="raw: fastest to read (default); webp: lossless, ~0.55x the bytes, ~1 core/GPU to decode")
    p.add_argument("--part", type=_part, help="i/n: do the i-th of n interleaved shares (default: the "
                   "SLURM array task, else 0/1)")
    p.add_argument("--workers", type=positive_int, default=1, help="local processes (each loads its own VAE)")
    p.add_argument("--chunk-size", type=positive_int, default=2048, help="samples per resumable chunk")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call")
    p.add_argument("--device", type=_device, help="torch device for the VAE (default: cuda when available)")
    p.add_argument("--stage", help="local staging directory for a remote OUT")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(fn=cmd_prepare)
