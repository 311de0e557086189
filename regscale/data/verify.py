"""`regscale prepare --verify OUT`: every shard present, of the recorded size, hashes and counts right."""

from __future__ import annotations

import tempfile
from pathlib import Path

from regscale.data.shards import MANIFEST, SUMMARY
from regscale.data.store import Store
from regscale.errors import UserError


def _check_shard(path: Path, info: dict) -> list[str]:
    """Problems with one MDS shard file against its index entry ([] when it is sound)."""
    import numpy as np
    from streaming.base.hashing import get_hash

    raw = info["raw_data"]
    name = raw["basename"]
    if not path.is_file():
        return [f"{name}: missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != raw["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, index says {raw['bytes']}")
    for algo, expected in (raw.get("hashes") or {}).items():
        if get_hash(algo, data) != expected:
            problems.append(f"{name}: {algo} hash mismatch")
    if len(data) >= 4 and int(np.frombuffer(data[:4], np.uint32)[0]) != info["samples"]:
        problems.append(f"{name}: header holds {int(np.frombuffer(data[:4], np.uint32)[0])} samples, "
                        f"index says {info['samples']}")
    return problems


def verify(out: str, stage: str | None = None) -> tuple[list[str], dict]:
    """(problems, totals) for the dataset at OUT; remote shards are downloaded one at a time."""
    store = Store(out, stage)
    index = store.read_json("index.json")
    if index is None:
        raise UserError(f"{out}: no index.json (not a prepared dataset, or prepare has not finished: "
                        "rerun `regscale prepare SRC OUT` to resume it)")
    problems: list[str] = []
    samples = nbytes = 0
    for info in index["shards"]:
        basename = info["raw_data"]["basename"]
        samples += info["samples"]
        nbytes += info["raw_data"]["bytes"]
        if store.remote is None:
            problems += _check_shard(store.local / basename, info)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                from streaming.base.storage.download import CloudDownloader

                local = Path(tmp) / "shard.mds"
                try:
                    CloudDownloader.direct_download(f"{store.remote.rstrip('/')}/{basename}", str(local))
                except Exception as err:
                    problems.append(f"{basename}: cannot download ({type(err).__name__}: {err})")
                    continue
                problems += _check_shard(local, info)
    summary = store.read_json(SUMMARY)
    if store.read_json(MANIFEST) is None:
        problems.append(f"{MANIFEST}: missing (not written by `regscale prepare`)")
    if summary is not None and summary.get("samples") != samples:
        problems.append(f"index.json counts {samples} samples, {SUMMARY} says {summary.get('samples')}")
    return problems, {"shards": len(index["shards"]), "samples": samples, "bytes": nbytes,
                      "skipped": len(summary.get("skipped", [])) if summary else None}

