"""`regscale prepare --verify OUT`: every shard present, of the recorded size, hashes and counts right."""

from __future__ import annotations

from regscale.data.shards import INDEX, MANIFEST, SUMMARY, index_shards, shard_problems
from regscale.data.store import Store, download
from regscale.errors import UserError


def verify(out: str, stage: str | None = None) -> tuple[list[str], dict]:
    """(problems, totals) for the dataset at OUT; remote shards are downloaded one at a time (the
    store is what is checked: nothing is read from a local stage)."""
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
            continue
        with store.scratch() as folder:
            local = folder / "shard.mds"
            if download(store.uri(basename), local):
                problems += shard_problems(local, info)
            else:
                problems.append(f"{basename}: missing (no object {store.uri(basename)})")
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
