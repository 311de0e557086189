"""The evaluation job: sample a checkpoint, score the samples the ADM way, record and log.

`evaluate` is what the chained SLURM job runs after training (on all its ranks), and what
`regscale sample` + `regscale eval` do in two steps. It checks its inputs (reference batch,
Inception weights) before spending any GPU time on sampling, and leaves behind
`out_dir/samples.npz` (ADM format) and `out_dir/eval_record.json` (metrics, settings, evaluator
version, reference hash).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from regscale.config import Config, config_hash, is_remote
from regscale.errors import UserError, one_line
from regscale.eval.features import Features, extract
from regscale.eval.inception import InceptionFeatures, file_sha256, load_inception, resolve_weights
from regscale.eval.metrics import (ADM_UNDEFINED, IS_SPLIT_SIZE, chunk_sizes, frechet, inception_score,
                                   precision_recall)
from regscale.eval.npz import NpzArray, check_samples, load_reference, open_images, reference_stats
from regscale.fsutil import write_atomic
from regscale.rundir import CHECKPOINTS, EVAL_RECORD, PROGRESS, step_name
from regscale.track import progress

# Bump when anything that changes the numbers changes (network port, preprocessing, formulas).
EVALUATOR_VERSION = "regscale-adm-2"
PROTOCOL = ("ADM (guided-diffusion evaluations/evaluator.py): FID on pool_3, sFID on mixed_6/conv[..., :7] "
            "flattened HWC, IS on softmax(pool_3 @ W) in consecutive chunks of 5,000 (the last one "
            "shorter), precision/recall with k=3 manifolds on pool_3 from float16 distance blocks of "
            "10,000 x 10,000 (float32 for a block with a non-finite entry); Frechet distance in float64")
MAX_SHARD_REFERENCE = 10_000  # the ADM reference batch's size


# ---------------------------------------------------------------------------------------------
# the distributed environment


def dist_setup() -> tuple[int, int, torch.device]:
    """(rank, world, device): join the process group the launcher describes, if any."""
    from regscale import dist as rdist

    rdist.export_launcher_env()
    layout = rdist.read_layout()
    if layout.world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, rdist.local_device(layout)
    env = rdist.setup()
    return env.rank, env.world_size, env.device


def _broadcast(obj: Any) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# ---------------------------------------------------------------------------------------------
# the reference


class ShardImages:
    """Evenly spaced images of the training shards (MDS, read with `streaming`), as uint8 NHWC."""

    def __init__(self, cfg: Config, limit: int = MAX_SHARD_REFERENCE) -> None:
        from regscale.data.streaming_core import use_streaming_core

        use_streaming_core()
        from streaming import StreamingDataset

        from regscale.data.shards import decode_image
        from regscale.data.stream import cache_dir

        path = self.check(cfg)
        kwargs = {"remote": path, "local": cache_dir(cfg.data)} if is_remote(path) else {"local": path}
        self._ds = StreamingDataset(shuffle=False, batch_size=1, **kwargs)
        self._decode = decode_image
        total = self._ds.num_samples
        self.indices = np.unique(np.linspace(0, total - 1, min(limit, total)).round().astype(np.int64))
        self.path = path

    @staticmethod
    def check(cfg: Config) -> str:
        """data.path, if it can serve as the reference; a UserError saying why not otherwise."""
        path = cfg.data.path
        if path is None:
            raise UserError("'eval.ref_batch' is null and so is 'data.path': the random-Inception "
                            "reference is computed from the training shards; set one of them")
        if not is_remote(path) and not (Path(path) / "index.json").is_file():
            raise UserError(f"'data.path' has no index.json: {path} (the reference images for "
                            "eval.random_inception come from the training shards)")
        return path

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._decode(self._ds.get_item(int(i))["image"]).transpose(1, 2, 0)
                         for i in self.indices[start:stop]])


@dataclass
class Reference:
    """Reference images (for precision/recall) and, if usable, precomputed statistics."""

    images: Any  # NpzArray | ShardImages
    stats: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # mu, sigma, mu_s, sigma_s
    info: dict[str, Any]


def check_reference(ref_batch: Optional[str], cfg: Optional[Config], random_inception: bool) -> None:
    """Fail now, not after sampling, if the reference cannot be read."""
    if ref_batch is None:
        if not random_inception:
            raise UserError("'eval.ref_batch' is required: the ADM reference batch "
                            "VIRTUAL_imagenet256_labeled.npz (mu, sigma, mu_s, sigma_s, arr_0) that the "
                            "published FIDs are measured against")
        if cfg is None:
            raise UserError("no reference: give an ADM reference batch (--ref)")
        ShardImages.check(cfg)
    elif random_inception:  # its images only; statistics it holds must still be sound
        open_images(Path(ref_batch), what="reference images")
        reference_stats(Path(ref_batch))
    else:
        load_reference(ref_batch, hasher=lambda p: None)


def open_reference(ref_batch: Optional[str], cfg: Optional[Config], random_inception: bool,
                   hash_file: bool = True) -> Reference:
    """The ADM reference batch, checked; with a random Inception its images only (the stored
    statistics belong to the real network); with neither, the training shards (smoke only)."""
    check_reference(ref_batch, cfg, random_inception)
    if ref_batch is None:
        images = ShardImages(cfg)
        index = Path(images.path) / "index.json"
        return Reference(images, None, {
            "kind": "training-shards", "path": str(images.path), "images": len(images),
            "sha256": file_sha256(index) if hash_file and index.is_file() else None,  # of index.json
            "note": "no ADM reference batch: statistics computed from evenly spaced training-shard "
                    "images with the same random Inception; numbers compare to nothing"})
    if random_inception:
        images = open_images(Path(ref_batch), what="reference images")
        return Reference(images, None, {
            "kind": "reference-images-recomputed", "path": str(ref_batch),
            "sha256": file_sha256(Path(ref_batch)) if hash_file else None,
            "images": len(images), "note": "random Inception: statistics recomputed from the reference "
                                           "images (the stored mu/sigma belong to the real network)"})
    ref = load_reference(ref_batch, hasher=file_sha256 if hash_file else lambda p: None)
    return Reference(ref.images, (ref.mu, ref.sigma, ref.mu_s, ref.sigma_s), {
        "kind": "adm-reference-batch", "path": str(ref.path), "sha256": ref.sha256, "images": len(ref.images),
        "note": "precomputed mu, sigma, mu_s, sigma_s used as they are"})


# ---------------------------------------------------------------------------------------------
# metrics


def score(samples: NpzArray, reference: Reference, net: InceptionFeatures, *, batch_size: int,
          device: torch.device, num_samples: Optional[int] = None,
          pr_distances: str = "float16") -> Optional[dict[str, Any]]:
    """FID, sFID, IS, precision, recall of `samples` (all of them, as ADM, unless num_samples).
    Runs on every rank; on rank 0 {"metrics": {...}, "frechet": {metric: method}, "inception_score":
    {...}, "precision_recall": {...}} (how each was computed), else None."""
    smp = extract(net, samples, batch_size, device=device, limit=num_samples, desc="sample features")
    ref = extract(net, reference.images, batch_size, device=device, desc="reference features")
    if smp is None or ref is None:
        return None
    if reference.stats is not None:
        mu, sigma, mu_s, sigma_s = reference.stats
    else:
        (mu, sigma), (mu_s, sigma_s) = ref.pool_stats.mu_sigma(), ref.spatial_stats.mu_sigma()
    return _metrics(smp, ref, mu, sigma, mu_s, sigma_s, device, pr_distances)


def _metrics(smp: Features, ref: Features, mu, sigma, mu_s, sigma_s, device, pr_distances: str) -> dict[str, Any]:
    for name, feats in (("samples", smp), ("reference images", ref)):
        if feats.count <= 3:
            raise UserError(f"{feats.count} {name}: precision/recall (k=3) and the covariances need "
                            "at least 4 images")
    s_mu, s_sigma = smp.pool_stats.mu_sigma()
    s_mu_s, s_sigma_s = smp.spatial_stats.mu_sigma()
    fid, fid_method = frechet(s_mu, s_sigma, mu, sigma)
    sfid, sfid_method = frechet(s_mu_s, s_sigma_s, mu_s, sigma_s)
    pr = precision_recall(ref.pool, smp.pool, k=3, device=device, distances=pr_distances)
    metrics = {"fid": fid, "sfid": sfid, "inception_score": inception_score(smp.logits, IS_SPLIT_SIZE),
               "precision": pr.precision, "recall": pr.recall}
    return {"metrics": metrics, "frechet": {"fid": fid_method, "sfid": sfid_method},
            "inception_score": {"chunk_sizes": chunk_sizes(smp.count, IS_SPLIT_SIZE)},
            "precision_recall": {"distances": pr.distances, "float32_blocks": pr.float32_blocks,
                                 "blocks": pr.blocks}}


def tag_metrics(metrics: dict[str, float], comparable: bool) -> dict[str, float]:
    """Metric names as logged: `<name>_not_comparable` when a random Inception produced them."""
    return metrics if comparable else {f"{k}_not_comparable": v for k, v in metrics.items()}


def evaluator_info(net: InceptionFeatures) -> dict[str, Any]:
    import torch_fidelity

    import regscale

    return {"version": EVALUATOR_VERSION, "regscale": regscale.__version__, "protocol": PROTOCOL,
            "adm_undefined": list(ADM_UNDEFINED), "network": net.description,
            "torch_fidelity": torch_fidelity.__version__, "torch": torch.__version__}


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Atomic JSON write."""
    write_atomic(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# weights


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap content hash: names, shapes and a few values and sums of every tensor."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().float().cpu().flatten()
        h.update(f"{name}{tuple(state[name].shape)}".encode())
        h.update(t[:16].numpy().tobytes() + t[-16:].numpy().tobytes())
        h.update(np.float64(t.double().sum()).tobytes())
    return h.hexdigest()[:16]


def load_weights(weights: Path | str | dict, step: Optional[int] = None,
                 which: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, info) from a state dict, a .safetensors export, or a run directory."""
    if isinstance(weights, dict):
        return weights, {"source": "state_dict", "fingerprint": weights_fingerprint(weights)}
    path = Path(weights)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return state, {"source": str(path), "fingerprint": weights_fingerprint(state), "metadata": meta}
    if path.is_dir() and (path / CHECKPOINTS).is_dir():
        from regscale.engine.export import load_consolidated

        state, manifest = load_consolidated(path, step=step, weights=which)
        return state, {"source": str(path), "step": manifest.get("step"), "weights": which,
                       "fingerprint": weights_fingerprint(state)}
    raise UserError(f"{path}: expected a .safetensors file of our SiT (`regscale export`) or a run "
                    "directory with checkpoints/")


def build_sampling_model(cfg: Config, state: dict[str, torch.Tensor], device: torch.device,
                         source: str = "the weights") -> torch.nn.Module:
    """Our SiT for cfg.model with `state` loaded (a mismatch names `source` and the keys), compiled
    when eval.compile."""
    from regscale.models import build_model_from_config
    from regscale.sampling import compile_for_sampling

    model = build_model_from_config(cfg.model)
    fit = f"{source} do not fit model.size={cfg.model.size} {cfg.model.resolved()}"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes
        raise UserError(f"{fit}: {one_line(str(err))[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{fit}: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
    model = model.to(device).eval().requires_grad_(False)
    return compile_for_sampling(model) if cfg.eval.compile else model


# ---------------------------------------------------------------------------------------------
# the chained job


def evaluate_samples(samples_path: Path, ref_batch: Optional[str], *, inception: Optional[str] = None,
                     random_inception: bool = False, batch_size: int = 100, num_samples: Optional[int] = None,
                     cfg: Optional[Config] = None, seed: int = 0,
                     pr_distances: str = "float16") -> Optional[dict[str, Any]]:
    """Score an ADM-format samples .npz on all ranks: the record's metrics, evaluator, reference
    and samples entries on rank 0, None elsewhere. Inputs are checked before any feature work."""
    rank, _, device = dist_setup()
    samples = check_samples(Path(samples_path), num_samples)
    if not random_inception:
        resolve_weights(inception)
    reference = open_reference(ref_batch, cfg, random_inception, hash_file=rank == 0)
    net = load_inception(inception, random_init=random_inception, seed=seed, device=device)
    scored = score(samples, reference, net, batch_size=batch_size, device=device, num_samples=num_samples,
                   pr_distances=pr_distances)
    if rank != 0:
        return None
    return {"metrics": tag_metrics(scored["metrics"], net.comparable), "comparable": net.comparable,
            "frechet_method": scored["frechet"], "inception_score": scored["inception_score"],
            "precision_recall": scored["precision_recall"],
            "note": None if net.comparable else "RANDOM Inception (eval.random_inception=true): these "
                                                "numbers are not comparable to any published or other FID",
            "evaluator": evaluator_info(net), "reference": reference.info,
            "samples": {"path": str(samples_path), "count": num_samples or len(samples),
                        "shape": list(samples.shape)}}


def sample_checkpoint(cfg: Config, weights: Path | str | dict, out_dir: Path, step: Optional[int],
                      device: torch.device, which: str = "ema") -> tuple[Path, dict[str, Any]]:
    """Load the weights and the VAE decoder, draw the samples (all ranks): (samples.npz, weights info).
    The model and VAE are freed on return."""
    from regscale.eval.sample import generate
    from regscale.models.encoders import decode_latents, load_vae

    state, weights_info = load_weights(weights, step, which)
    model = build_sampling_model(cfg, state, device, f"the weights of {weights_info['source']}")
    del state
    vae = load_vae(cfg.vae.decoder, random_init=cfg.vae.random_init).to(device)
    npz = generate(model, lambda z: decode_latents(vae, z, scale=cfg.vae.scale), cfg, out_dir,
                   weights_info["fingerprint"], device=device)
    return npz, weights_info


def evaluate(cfg: Config, weights: Path | dict, out_dir: Path, step: int, tracker=None) -> dict:
    """Sample cfg.eval.num_samples images from `weights`, score them against the reference, write
    out_dir/eval_record.json, log to `tracker` (rank 0). Returns the record on every rank."""
    ev = cfg.eval
    out_dir = Path(out_dir)
    rank, world, device = dist_setup()
    if rank == 0:
        progress.record_to(out_dir / PROGRESS)  # for a `regscale submit` waiting on this job
    # inputs first: no GPU time before we know the evaluation can finish
    if not ev.random_inception:
        resolve_weights(ev.inception)
    check_reference(ev.ref_batch, cfg, ev.random_inception)
    t0 = time.time()
    npz, weights_info = sample_checkpoint(cfg, weights, out_dir, step, device)
    sample_s = time.time() - t0
    t1 = time.time()
    outcome = None
    try:
        record = evaluate_samples(npz, ev.ref_batch, inception=ev.inception, random_inception=ev.random_inception,
                                  batch_size=ev.batch_size, num_samples=ev.num_samples, cfg=cfg, seed=ev.seed,
                                  pr_distances=ev.pr_distances)
        if rank == 0:
            outcome = ("ok", _finish_record(record, cfg, npz, step, world, weights_info, sample_s, time.time() - t1))
            write_record(out_dir / EVAL_RECORD, outcome[1])
            if tracker is not None:
                tracker.log_eval(outcome[1]["metrics"], step, _tracker_info(outcome[1]))
                tracker.log_artifact(out_dir / EVAL_RECORD, f"eval/{step_name(step)}")
    except UserError as err:  # raised on rank 0 alone (the metrics): tell the others, not hang them
        if rank != 0 or world == 1:
            raise
        outcome = ("error", str(err))
    status, value = _broadcast(outcome)
    if status == "error":
        raise UserError(value)
    return value


def _finish_record(record: dict[str, Any], cfg: Config, npz: Path, step: int, world: int,
                   weights_info: dict[str, Any], sample_s: float, score_s: float) -> dict[str, Any]:
    """The scoring record plus what the chained job knows: step, settings, weights, timings."""
    ev = cfg.eval
    labels = NpzArray(npz, "arr_1").read_all()
    record = {
        "step": step, **record,
        "settings": {**asdict(ev), "model_size": cfg.model.size, "config_hash": config_hash(cfg)},
        "weights": weights_info,
        "timing_s": {"sampling": round(sample_s, 1), "scoring": round(score_s, 1)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    record["samples"].update(labels=ev.labels, classes_covered=int(len(np.unique(labels))), world_size=world)
    return record


def _tracker_info(record: dict[str, Any]) -> dict[str, Any]:
    s = record["settings"]
    return {"comparable": record["comparable"], "evaluator_version": record["evaluator"]["version"],
            "inception": record["evaluator"]["network"], "reference": record["reference"]["path"],
            "reference_sha256": record["reference"]["sha256"], "reference_kind": record["reference"]["kind"],
            "num_samples": s["num_samples"], "sampler": s["sampler"], "steps": s["steps"],
            "cfg_scale": s["cfg_scale"], "cls_cfg_scale": s["cls_cfg_scale"],
            "guidance_low": s["guidance_low"], "guidance_high": s["guidance_high"], "labels": s["labels"],
            "precision": s["precision"], "compile": s["compile"], "pr_distances": s["pr_distances"],
            "weights": record["weights"]["fingerprint"], "samples": record["samples"]["path"]}
