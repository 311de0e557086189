"""Inception features of an image set, extracted in batches across all ranks.

Each rank reads a contiguous slice of the images (a memory-mapped .npz or MDS shards), runs the
network batch by batch and folds pool3 and mixed_6/conv into float64 running statistics; only the
pool3 vectors (precision/recall) and logits (IS) are kept, never the images. Rank 0 receives
every rank's part, in index order, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from regscale.eval.inception import LOGITS_DIM, POOL_DIM, SPATIAL_DIM, InceptionFeatures
from regscale.eval.metrics import FeatureStats
from regscale.track import progress


class ImageSource(Protocol):
    """Random access to uint8 NHWC images."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


@dataclass
class Features:
    """What the metrics need from one image set (complete on rank 0)."""

    pool: np.ndarray  # [N, 2048] float32, in index order
    logits: np.ndarray  # [N, 1008] float32
    pool_stats: FeatureStats
    spatial_stats: FeatureStats

    @property
    def count(self) -> int:
        return self.pool_stats.count


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous index range [start, stop) rank `rank` handles."""
    return n * rank // world, n * (rank + 1) // world


def extract(net: InceptionFeatures, images: ImageSource, batch_size: int, *,
            device: torch.device | str = "cpu", limit: Optional[int] = None,
            desc: str = "features") -> Optional[Features]:
    """Features of the first `limit` (default: all) images; the full result on rank 0, None elsewhere."""
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    n = len(images) if limit is None else min(limit, len(images))
    start, stop = rank_slice(n, rank, world)
    pool_stats = FeatureStats.empty(POOL_DIM, device)
    spatial_stats = FeatureStats.empty(SPATIAL_DIM, device)
    pools, logits = [], []
    bounds = [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]
    with ThreadPoolExecutor(1) as reader, tqdm(total=n, desc=desc, disable=rank != 0, mininterval=10) as bar:
        pending = reader.submit(images.read, *bounds[0]) if bounds else None
        for i, _ in enumerate(bounds):
            batch = pending.result()
            pending = reader.submit(images.read, *bounds[i + 1]) if i + 1 < len(bounds) else None
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
            pool, spatial, logit = net(x)
            pool_stats.update(pool)
            spatial_stats.update(spatial)
            pools.append(pool.float().cpu().numpy())
            logits.append(logit.float().cpu().numpy())
            bar.update(len(batch) * world)
            progress.report(desc, min(bar.n, n), n, "images")
    part = (np.concatenate(pools) if pools else np.zeros((0, POOL_DIM), np.float32),
            np.concatenate(logits) if logits else np.zeros((0, LOGITS_DIM), np.float32),
            pool_stats.to_cpu(), spatial_stats.to_cpu())
    parts = _gather_to_main(part, rank, world)
    if rank != 0:
        return None
    total_pool, total_spatial = FeatureStats.empty(POOL_DIM), FeatureStats.empty(SPATIAL_DIM)
    for _, _, ps, ss in parts:
        total_pool.merge(ps)
        total_spatial.merge(ss)
    return Features(pool=np.concatenate([p[0] for p in parts]), logits=np.concatenate([p[1] for p in parts]),
                    pool_stats=total_pool, spatial_stats=total_spatial)


def _gather_to_main(obj, rank: int, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []
