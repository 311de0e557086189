"""Data in object storage, for real: a real S3-compatible server on 127.0.0.1 (tests/fixtures/s3.py:
moto's server behind a relay that can be taken away and can answer 503 SlowDown), spoken to over
HTTP by boto3 and streaming, against the same shards in a local directory.

prepare to s3:// (the store is the truth: an emptied prefix, a new bucket, a foreign stage, a kill
mid-upload), `--verify` naming a corrupted or missing object, the training stream (one download of
each shard per host, a cache of an older dataset at the same URI), and training from s3:// with the
node cache bounded to a quarter of the dataset through 503s, a kill, a server outage and a change of
world size: the losses of the run on the same number of processes are bit-identical to the local
run's, every step draws the same samples and noise. Past data.download_retry_s, or on a corrupted
object, training stops with one line and no traceback from any thread.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch

from regscale.cli import main
from regscale.data.prepare import PrepareOptions, prepare
from regscale.engine.export import load_consolidated
from regscale.errors import UserError
from regscale.rundir import METRICS
from tests.fixtures.data import make_reg_layout
from tests.fixtures.s3 import S3Server
from tests.fixtures.train import (ELASTIC_RTOL, launch_train, logged_step, losses, max_relative_difference, ok,
                                  traced_draws)
from tests.test_data import _cfg, _in_own_group, _read_all, _rank_main, _run_ranks

TRAIN_SAMPLES, TRAIN_CHUNK = 160, 10  # 16 equal shards: a quarter of the dataset holds 4 (streaming's minimum)
# the shuffle block the stream advises for a cache of 4 shards (with the default, a window of the
# whole dataset, most samples would need their shard downloaded again: same numbers, 10x the traffic)
BASE = ["train.max_steps=8", "train.ckpt_every=2", "train.keep_last=2", "data.synthetic=0",
        "data.shuffle_block_size=16"]
TRACE = {"REGSCALE_TRACE_DRAWS": "1"}


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix


def _copy(server: S3Server, uri: str, name: str) -> str:
    """A copy of the dataset at `uri` under another prefix of its bucket (downloaded and uploaded:
    moto's server-side copy of a multipart object serves a checksum that does not match)."""
    bucket, prefix = _split(uri)
    client = server.client()
    for key in server.keys(bucket, prefix + "/"):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key=name + key[len(prefix):], Body=body)
    return f"s3://{bucket}/{name}"


def _flip_a_byte(server: S3Server, uri: str) -> None:
    bucket, key = _split(uri)
    client = server.client()
    blob = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(blob))


@pytest.fixture(scope="module")
def remote_reg(s3_server: S3Server, reg_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """reg_dataset's source prepared into a bucket with the same options."""
    with mock.patch.dict(os.environ, s3_server.env):
        uri = f"s3://{s3_server.new_bucket()}/reg"
        prepare(str(reg_dataset.parent / "src"), uri,
                PrepareOptions(chunk_size=64, progress=False, stage=str(tmp_path_factory.mktemp("stage"))))
    return uri


@pytest.fixture(scope="module")
def train_data(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """(local dataset, the same prepared into a bucket, its shard bytes): 160 samples of 10 classes
    in 16 shards, for the smoke model."""
    root = tmp_path_factory.mktemp("s3-train")
    src = make_reg_layout(root / "src", TRAIN_SAMPLES, 10)
    opts = dict(chunk_size=TRAIN_CHUNK, progress=False)
    prepare(str(src), str(root / "local"), PrepareOptions(**opts))
    with mock.patch.dict(os.environ, s3_server.env):
        uri = f"s3://{s3_server.new_bucket()}/train"
        prepare(str(src), uri, PrepareOptions(stage=str(root / "stage"), **opts))
    index = json.loads((root / "local" / "index.json").read_text())
    return root / "local", uri, sum(s["raw_data"]["bytes"] for s in index["shards"])


# ---------------------------------------------------------------------------------------------
# prepare and verify


def test_prepare_to_s3_writes_the_same_shards_and_verify_reads_the_store(s3, remote_reg, reg_dataset, capsys):
    bucket, prefix = _split(remote_reg)
    index = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/index.json")["Body"].read())
    assert index == json.loads((reg_dataset / "index.json").read_text())  # names, sizes, hashes
    assert main(["prepare", "--verify", remote_reg]) == 0
    out = capsys.readouterr().out
    assert f"{remote_reg}: 5 shards, 256 samples" in out and "1 source files skipped" in out and "OK" in out


def test_the_store_is_the_truth_and_a_stage_only_scratch(s3, tmp_path, capsys):
    """The same prepare again into an emptied prefix rebuilds it; a stage holding another dataset
    and a new bucket change nothing (they used to: "0/3 chunks complete", 0 objects uploaded, or
    "already holds a different dataset"), and nothing of the stage's own files is touched."""
    src, stage = make_reg_layout(tmp_path / "a", 24, 2), tmp_path / "stage"
    bucket = s3.new_bucket()
    argv = ["prepare", str(src), f"s3://{bucket}/ds", "--chunk-size", "8", "--stage", str(stage), "--quiet"]
    assert main(argv) == 0
    keys = s3.keys(bucket)
    assert len(keys) == 3 * 3 + 4 and "ds/chunk-000002/chunk.json" in keys and "ds/index.json" in keys
    assert not [p for p in stage.rglob("*") if p.is_file()], "a finished prepare leaves no file in its stage"

    for key in keys:  # the prefix deleted: everything is uploaded again
        s3.client().delete_object(Bucket=bucket, Key=key)
    capsys.readouterr()
    assert main(argv) == 0 and "24 samples in 2 classes" in capsys.readouterr().out
    assert s3.keys(bucket) == keys

    other = make_reg_layout(tmp_path / "b", 16, 2, seed=5)
    assert main(["prepare", str(other), str(stage), "--quiet"]) == 0  # another dataset where the stage is
    theirs = {p: p.read_bytes() for p in stage.rglob("*") if p.is_file()}
    fresh = s3.new_bucket()
    assert main(["prepare", str(src), f"s3://{fresh}/ds", "--chunk-size", "8", "--stage", str(stage), "--quiet"]) == 0
    assert s3.keys(fresh) == keys
    assert {p: p.read_bytes() for p in stage.rglob("*") if p.is_file()} == theirs
    capsys.readouterr()
    assert main(["prepare", "--verify", f"s3://{fresh}/ds", "--stage", str(stage)]) == 0
    assert f"s3://{fresh}/ds: 3 shards, 24 samples" in capsys.readouterr().out
    empty = s3.new_bucket()
    assert main(["prepare", "--verify", f"s3://{empty}/ds", "--stage", str(stage)]) == 2
    assert f"s3://{empty}/ds: no index.json" in capsys.readouterr().err


def test_killed_prepare_to_s3_redoes_exactly_the_missing_chunks(s3, tmp_path):
    src = make_reg_layout(tmp_path / "src", 48, 2)
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/ds"
    argv = ["prepare", str(src), uri, "--chunk-size", "8", "--stage", str(tmp_path / "stage"), "--quiet"]
    start = len(s3.requests())
    proc = mp.get_context("fork").Process(target=_in_own_group, args=(main, argv))
    proc.start()
    uploading = f"PUT /{bucket}/ds/chunk-000002/shard.00000.mds"  # chunks 0 and 1 are complete by then
    deadline = time.monotonic() + 120
    while not any(r.startswith(uploading) for r in s3.requests()[start:]):
        assert proc.is_alive() and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.join()
    done = {k.split("/")[1] for k in s3.keys(bucket) if k.endswith("/chunk.json")}
    assert {"chunk-000000", "chunk-000001"} <= done and len(done) < 6 and "ds/index.json" not in s3.keys(bucket)

    mark = len(s3.requests())
    assert main(argv) == 0
    puts = [r.split()[1] for r in s3.requests()[mark:] if r.startswith("PUT ")]
    chunks = [p.split("/")[3] for p in puts if p.split("/")[3].startswith("chunk-")]
    assert set(chunks) == {f"chunk-{c:06d}" for c in range(6)} - done, "a complete chunk was uploaded again"
    assert sorted(p.split("/")[3] for p in puts if p.endswith("/chunk.json")) == sorted(set(chunks))
    assert [int(s["index"]) for s in _read_all(uri, f"data.local_cache={tmp_path / 'cache'}")] == list(range(48))


def test_verify_names_a_corrupted_or_missing_object(s3, remote_reg, capsys):
    uri = _copy(s3, remote_reg, "verify-broken")
    victim = "chunk-000002/shard.00000.mds"
    _flip_a_byte(s3, f"{uri}/{victim}")
    assert main(["prepare", "--verify", uri]) == 1
    out = capsys.readouterr().out
    assert f"BAD {victim}: sha1 hash mismatch" in out and f"BAD {victim}: xxh64 hash mismatch" in out
    bucket, prefix = _split(uri)
    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/{victim}")
    assert main(["prepare", "--verify", uri]) == 1
    assert f"BAD {victim}: missing (no object {uri}/{victim})" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the stream


def test_two_ranks_on_one_host_download_each_shard_once_and_read_what_local_reads(s3, remote_reg, reg_dataset,
                                                                                  tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "remote").mkdir()
    local = _run_ranks(_rank_main, 2, reg_dataset, tmp_path / "local")
    start = len(s3.requests())
    remote = _run_ranks(_rank_main, 2, remote_reg, tmp_path / "remote", f"data.local_cache={tmp_path / 'cache'}")
    assert remote == local  # per rank: the same samples in the same order, the same stream state
    # boto3 starts each download with one HEAD (then ranged GETs): 2 ranks x 2 workers, one download a shard
    downloads = Counter(r for r in s3.requests()[start:] if r.startswith("HEAD ") and r.endswith(".mds"))
    assert len(downloads) == 5 and set(downloads.values()) == {1}, downloads


def test_a_cache_of_an_older_dataset_at_the_same_uri_is_not_used(s3, tmp_path):
    bucket = s3.new_bucket()
    uri, cache = f"s3://{bucket}/ds", f"data.local_cache={tmp_path / 'cache'}"
    old, new = make_reg_layout(tmp_path / "old", 16, 2, seed=1), make_reg_layout(tmp_path / "new", 16, 2, seed=2)
    opts = PrepareOptions(chunk_size=8, progress=False, stage=str(tmp_path / "stage"))
    prepare(str(old), uri, opts)
    before = _read_all(uri, cache)
    for key in s3.keys(bucket):  # rebuilt in place: the same shard names, other bytes
        s3.client().delete_object(Bucket=bucket, Key=key)
    prepare(str(new), uri, opts)
    prepare(str(new), str(tmp_path / "new-local"), PrepareOptions(chunk_size=8, progress=False))
    after, expected = _read_all(uri, cache), _read_all(tmp_path / "new-local")
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["moments"], b["moments"])
               for a, b in zip(after, expected, strict=True))
    assert not torch.equal(before[0]["image"], after[0]["image"])
    with pytest.raises(UserError, match=r"'data.cache_limit' \(1mb = 1048576 bytes\) is too small for the dataset "
                                        r"at s3://.*: the cache must hold 4 x its largest shard"):
        from regscale.data.stream import TrainStream

        TrainStream(*_cfg(uri, workers=0, overrides=(cache, "data.cache_limit=1mb")), 0, 1, 8)


# ---------------------------------------------------------------------------------------------
# training


def _metrics_size(run_dir: Path) -> int:
    path = run_dir / METRICS
    return path.stat().st_size if path.is_file() else 0


class Outage(threading.Thread):
    """Once run_dir logs `step` (from now on), the S3 endpoint goes away for `seconds` (or until
    `end`); `went_on()`: a step was logged after it came back."""

    def __init__(self, server: S3Server, run_dir: Path, step: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.server, self.run_dir, self.step, self.seconds = server, run_dir, step, seconds
        self.offset = _metrics_size(run_dir)
        self.stop, self.back_at = threading.Event(), None

    def run(self) -> None:
        while logged_step(self.run_dir, self.offset) < self.step and not self.stop.is_set():
            time.sleep(0.05)
        if self.stop.is_set():
            return
        self.server.outage()
        try:
            self.stop.wait(self.seconds)
        finally:
            self.server.resume()
            self.back_at = logged_step(self.run_dir, self.offset)

    def went_on(self) -> bool:
        return self.back_at is not None and logged_step(self.run_dir, self.offset) > self.back_at

    def end(self) -> None:
        self.stop.set()
        self.join()


def test_training_from_s3_through_slowdown_kill_outage_and_resharding_matches_local(s3, train_data, tmp_path):
    """The cache bounded to a quarter of the dataset; 503s on the first downloads, then SIGKILL;
    resumed on 2 processes, the server away for 8 s mid-run, then SIGUSR2 once training went on;
    the rest on one process."""
    local, uri, nbytes = train_data
    base = [*BASE, "train.max_steps=12"]
    ref = launch_train(tmp_path / "ref" / "run", local, base, env=TRACE)
    assert ref.returncode == 0, ok(ref)

    cache = tmp_path / "cache"
    overrides = [*base, f"data.cache_limit={nbytes // 4}", f"data.local_cache={cache}"]
    env = {**s3.env, **TRACE}
    run = tmp_path / "s3" / "run"
    start = len(s3.requests())
    s3.slow_down(6)
    first = launch_train(run, uri, overrides, env=env, kill_at=4, published=2)
    assert first.returncode != 0 and first.killed_at is not None, ok(first)
    assert sum(r.endswith(" 503") for r in s3.requests()[start:]) == 6

    outage = Outage(s3, run, 5, 8.0)
    outage.start()
    try:
        second = launch_train(run, uri, overrides, env=env, usr2_at=6, when=outage.went_on)
    finally:
        outage.end()
    stopped = re.findall(r"\[rank \d\] INFO regscale.train: preempted at step (\d+)", second.stderr)
    assert len(stopped) == 2 and len(set(stopped)) == 1, ok(second)
    assert re.search(r"download of s3://.* failed \(.*\); retrying with backoff for up to 600 s", second.stderr)
    assert re.search(r"download of s3://.* went through after \d+ failed attempts", second.stderr), ok(second)

    last = launch_train(run, uri, overrides, env=env, nproc=1)  # the rest on one process: elastic
    assert last.returncode == 0, ok(last)
    assert "resharded from 2 to 1 processes: same samples and noise" in last.stderr

    assert traced_draws(run) == traced_draws(ref.run_dir), "a step drew other samples or noise than the local run"
    ref_losses, run_losses = losses(ref.run_dir), losses(run)
    assert run_losses.keys() == ref_losses.keys() - {int(stopped[0])}  # no loss is logged at the stop step
    on_two = int(stopped[0])  # the steps run on 2 processes, like the local run, are bit-identical to it
    assert {s: v for s, v in run_losses.items() if s < on_two} == {s: v for s, v in ref_losses.items() if s < on_two}
    assert all(abs(run_losses[s] - ref_losses[s]) <= ELASTIC_RTOL * abs(ref_losses[s]) for s in run_losses)
    for weights in ("model", "ema"):
        difference = max_relative_difference(load_consolidated(ref.run_dir, weights=weights)[0],
                                             load_consolidated(run, weights=weights)[0])
        assert difference <= ELASTIC_RTOL, (weights, difference)
    cached = sum(p.stat().st_size for p in cache.rglob("*.mds"))
    assert 0 < cached <= nbytes // 4, f"the cache holds {cached} bytes, past data.cache_limit {nbytes // 4}"
    downloads = sum(r.startswith("HEAD ") and r.endswith(".mds") for r in s3.requests()[start:])
    assert downloads > 4, f"{downloads} shard downloads: no shard was evicted from a cache of 4"


@pytest.mark.parametrize("fault", ["outage past data.download_retry_s", "corrupted objects"])
def test_training_stops_with_one_line_and_no_traceback(s3, train_data, tmp_path, fault):
    _, uri, nbytes = train_data
    overrides = [*BASE, "train.max_steps=20", f"data.cache_limit={nbytes // 4}",
                 f"data.local_cache={tmp_path / 'cache'}", "data.download_retry_s=4"]
    run = tmp_path / "run"
    outage = None
    if fault == "corrupted objects":
        uri = _copy(s3, uri, f"broken-{tmp_path.name}")
        for chunk in range(TRAIN_SAMPLES // TRAIN_CHUNK):
            _flip_a_byte(s3, f"{uri}/chunk-{chunk:06d}/shard.00000.mds")
        expected = (rf"shard chunk-\d{{6}}/shard.00000.mds of the dataset at {uri} does not match its index.json "
                    r"\(xxh64 of the download differs\).*regscale prepare --verify")
    else:  # away from step 2 until the run has ended
        outage = Outage(s3, run, 2, 3600.0)
        outage.start()
        expected = (rf"cannot download shard chunk-\d{{6}}/shard.00000.mds of the dataset at {uri}: still failing "
                    r"after 4 s of retries \(data.download_retry_s\) \(EndpointConnectionError")
    try:
        failed = launch_train(run, uri, overrides, env=s3.env, nproc=0)
    finally:
        if outage is not None:
            outage.end()
    assert failed.returncode == 2, ok(failed)
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(rf"^regscale train: error: {expected}", errors[0]), ok(failed)
    assert "Traceback" not in failed.stderr and "Exception in thread" not in failed.stderr, ok(failed)
