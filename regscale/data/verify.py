"""`regscale prepare --verify OUT`: every shard present, of the recorded size, hashes and counts right."""

from __future__ import annotations

import tempfile
from pathlib import Path

from regscale.data.shards import INDEX, MANIFEST, SUMMARY, index_shards, shard_problems
from regscale.data.store import Store
from regscale.errors import UserError


def verify(out: str, stage: str | None = None) -> tuple[list[str], dict]:
    """(problems, totals) for the dataset at OUT; remote shards are downloaded one at a time."""
    store = Store(out, stage)
    index = store.read_json(INDEX)
    if index is None:
        raise UserError(f"{out}: no {INDEX} (not a prepared dataset, or prepare has not finished: "
                        "rerun `regscale prepare SRC OUT` to resume it)")
    shards = index_shards(index, f"{out.rstrip('/')}/{INDEX}")
    problems: list[str] = []
    samples = nbytes = 0
    for info in shards:
        basename = info["raw_data"]["basename"]
        samples += info["samples"]
        nbytes += info["raw_data"]["bytes"]
        if store.remote is None:
            problems += shard_problems(store.local / basename, info)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                from streaming.base.storage.download import CloudDownloader

                local = Path(tmp) / "shard.mds"
                try:
                    CloudDownloader.direct_download(f"{store.remote.rstrip('/')}/{basename}", str(local))
                except Exception as err:
                    problems.append(f"{basename}: cannot download ({type(err).__name__}: {err})")
                    continue
                problems += shard_problems(local, info)
    summary = store.read_json(SUMMARY)
    if summary is not None and not isinstance(summary, dict):
        raise UserError(f"{out.rstrip('/')}/{SUMMARY}: expected a JSON object, got {type(summary).__name__}")
    if store.read_json(MANIFEST) is None:
        problems.append(f"{MANIFEST}: missing (not written by `regscale prepare`)")
    if summary is not None and summary.get("samples") != samples:
        problems.append(f"{INDEX} counts {samples} samples, {SUMMARY} says {summary.get('samples')}")
    skipped = summary.get("skipped") if summary else None
    return problems, {"shards": len(shards), "samples": samples, "bytes": nbytes,
                      "skipped": len(skipped) if isinstance(skipped, list) else None}

