"""Data area: prepare (ImageFolder and REG layout, resumable, parts, bad input), verify, TrainStream
(2 ranks x 2 workers exactly once, mid-epoch and elastic resume, the same global batch per step on
1 or 2 ranks, bad shards, stale shared memory), and the smoke recipe's synthetic dataset. All data is generated here; the VAE is tiny and random."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from regscale.cli import main
from regscale.config import load_config
from regscale.data.images import center_crop_arr, load_image
from regscale.data.prepare import PrepareOptions, prepare
from regscale.data.stream import ShardError, TrainStream
from regscale.train.preempt import StopFlag
from tests.fixtures.data import REG_SAMPLES, make_imagefolder, make_reg_layout

REPO = Path(__file__).resolve().parents[1]
REG_INDICES = sorted(set(range(REG_SAMPLES + 1)) - {REG_SAMPLES // 2})  # the truncated image is skipped


def _cfg(path: Path | str, workers: int = 2, seed: int = 0, shuffle: bool = True, batch: int = 8,
         overrides: tuple[str, ...] = ()):
    """A stream's config sections (data, train); `batch` is the global batch (an epoch is whole
    global batches)."""
    cfg = load_config(None, [f"data.path={path}", f"data.num_workers={workers}", f"train.seed={seed}",
                             f"data.shuffle={shuffle}", f"train.batch_size={batch}", "slurm.gpus_per_node=1",
                             "run.name=t", *overrides])
    return cfg.data, cfg.train


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def _read_all(out: Path | str, *overrides: str) -> list[dict]:
    """Every sample of a prepared dataset, in order (one process, no shuffle)."""
    stream = TrainStream(*_cfg(out, workers=0, shuffle=False, batch=1, overrides=overrides), 0, 1, 1)
    samples = _take(iter(stream), stream.num_samples)
    stream.close()
    return samples


# ---------------------------------------------------------------------------------------------
# prepare


def test_adm_center_crop():
    from PIL import Image

    wide = Image.fromarray(np.full((700, 1100, 3), 77, np.uint8))
    assert center_crop_arr(wide).shape == (256, 256, 3) and (center_crop_arr(wide) == 77).all()
    exact = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(exact)), exact)  # already 256: untouched


def test_prepare_imagefolder_round_trip(tmp_path, tiny_vae_dir, capsys):
    from regscale.models.encoders import encode_moments, load_vae

    torch.set_num_threads(1)
    src = make_imagefolder(tmp_path / "src", classes=3, per_class=6)
    (src / "cls_1" / "zz_truncated.png").write_bytes((src / "cls_1" / "000.png").read_bytes()[:200])
    (src / "cls_2" / "zz_garbage.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert main(["prepare", str(src), str(out), "--vae", str(tiny_vae_dir), "--chunk-size", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "18 samples in 3 classes" in printed and "skipped 2 unreadable" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["path"] for s in summary["skipped"]) == ["cls_1/zz_truncated.png", "cls_2/zz_garbage.jpg"]
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["cls_0", "cls_1", "cls_2"], "count": [6, 6, 6]}

    files = sorted(p for p in src.rglob("*") if p.is_file())  # the source order prepare uses
    vae = load_vae(str(tiny_vae_dir))
    samples = _read_all(out)
    assert len(samples) == 18
    for s in samples:
        path = files[int(s["index"])]
        image = load_image(path)
        assert np.array_equal(s["image"][0].numpy(), image)
        assert int(s["label"]) == int(path.parent.name[-1])
        mean, std = encode_moments(vae, torch.from_numpy(image)[None])
        torch.testing.assert_close(s["moments"][0], torch.cat([mean, std], 1)[0], rtol=1e-5, atol=1e-6)

    webp = tmp_path / "webp"  # the lossless alternative decodes to the very same pixels
    assert main(["prepare", str(src), str(webp), "--random-vae", "--image-encoding", "webp", "--quiet"]) == 0
    for a, b in zip(samples, _read_all(webp)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert main(["prepare", "--verify", str(out)]) == 0


def test_prepare_reg_layout_keeps_moments_and_labels(reg_dataset):
    src = reg_dataset.parent / "src"
    labels = dict(json.loads((src / "vae-sd" / "dataset.json").read_text())["labels"])
    samples = _read_all(reg_dataset)
    assert [int(s["index"]) for s in samples] == REG_INDICES
    for s in samples[::37]:
        i = int(s["index"])
        npy = np.load(src / "vae-sd" / "00000" / f"img-mean-std-{i:08d}.npy")[0]
        assert np.array_equal(s["moments"][0].numpy(), npy)
        assert int(s["label"]) == labels[f"00000/img-mean-std-{i:08d}.npy"]


def test_parts_merge_into_one_dataset(tmp_path):
    src = make_reg_layout(tmp_path / "src", 40, 2)
    out = tmp_path / "out"
    opts = dict(chunk_size=8, progress=False)
    first = prepare(str(src), str(out), PrepareOptions(part=(1, 2), **opts))
    assert not first.complete and first.chunks_done == 2 and not (out / "index.json").exists()
    done = prepare(str(src), str(out), PrepareOptions(part=(0, 2), **opts))
    assert done.complete and done.samples == 40 and done.chunks == 5
    assert [int(s["index"]) for s in _read_all(out)] == list(range(40))


def _in_own_group(fn, *args) -> None:
    """Child process body: its own process group (so the test can kill it and its children)."""
    os.setpgid(0, 0)
    torch.set_num_threads(1)
    fn(*args)


def test_killed_prepare_resumes_without_duplicates_or_holes(tmp_path):
    src = make_imagefolder(tmp_path / "src", classes=2, per_class=24)
    out = tmp_path / "out"
    argv = ["prepare", str(src), str(out), "--random-vae", "--chunk-size", "8", "--batch-size", "4", "--quiet"]
    proc = mp.get_context("fork").Process(target=_in_own_group, args=(main, argv))
    proc.start()
    deadline = time.monotonic() + 120
    while not (out / "chunk-000001" / "chunk.json").exists():
        assert proc.is_alive() and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.join()
    assert not (out / "index.json").exists() and len(list(out.glob("chunk-*"))) < 6
    assert main(argv) == 0
    assert [int(s["index"]) for s in _read_all(out)] == list(range(48))
    assert not (out / ".tmp").exists()


def test_prepare_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "cls_a").mkdir(parents=True)
    (empty / "cls_a" / "readme.txt").write_text("no images here")
    assert main(["prepare", str(empty), str(tmp_path / "o1")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "o1")]) == 2
    assert "source not found" in capsys.readouterr().err

    a, b = make_reg_layout(tmp_path / "a", 8, 2, seed=1), make_reg_layout(tmp_path / "b", 9, 2, seed=2)
    out = tmp_path / "out"
    assert main(["prepare", str(a), str(out), "--quiet"]) == 0
    assert main(["prepare", str(a), str(out), "--quiet"]) == 0  # the same dataset again: nothing to do
    assert main(["prepare", str(b), str(out), "--quiet"]) == 2
    assert "already holds a different dataset" in capsys.readouterr().err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.pdf").write_text("x")
    assert main(["prepare", str(a), str(stranger), "--quiet"]) == 2
    assert "not empty and was not written by `regscale prepare`" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the training stream


def _rank_main(rank: int, world: int, port: int, data: str, result: str, *overrides: str) -> None:
    """One training rank: 2 workers, 3 batches, save the stream state, then the rest of the epoch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stream = TrainStream(*_cfg(data, workers=2, seed=7, batch=world * 8, overrides=overrides), rank, world, 8)
    it = iter(stream)
    first = _take(it, 3)
    state = stream.state_dict()
    rest = _take(it, REG_SAMPLES // (world * 8) - 3)
    assert all(b["image"].dtype == torch.uint8 and b["moments"].dtype == torch.float32 and
               b["label"].dtype == torch.int64 and b["image"].shape == (8, 3, 256, 256) for b in first + rest)
    Path(result).write_text(json.dumps({"first": _indices(first), "rest": _indices(rest), "state": state}))
    dist.barrier()
    dist.destroy_process_group()


def _run_ranks(target, world: int, data: Path | str, out: Path, *extra) -> list[dict]:
    """target(rank, world, port, data, out/r{rank}.json, *extra) in `world` forked processes (real
    gloo ranks, without re-importing torch); returns what each rank wrote."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=(r, world, port, str(data), str(out / f"r{r}.json"), *extra))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * world
    return [json.loads((out / f"r{r}.json").read_text()) for r in range(world)]


def test_two_ranks_two_workers_exactly_once_then_elastic_resume(reg_dataset, tmp_path):
    ranks = _run_ranks(_rank_main, 2, reg_dataset, tmp_path)
    epoch = [i for r in ranks for i in r["first"] + r["rest"]]
    assert sorted(epoch) == REG_INDICES  # 2 ranks x 2 workers: every sample exactly once
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["streaming"]["sample_in_epoch"] == 48

    # elastic: the same position resumed by one rank gives exactly the samples the two had not seen
    stream = TrainStream(*_cfg(reg_dataset, workers=2, seed=7), 0, 1, 8)
    stream.load_state_dict(ranks[0]["state"])
    assert "world size 2 -> 1" in stream.resume_note
    rest = _indices(_take(iter(stream), (REG_SAMPLES - 48) // 8))
    stream.close()
    seen = [i for r in ranks for i in r["first"]]
    assert sorted(seen + rest) == REG_INDICES


def test_dataloader_workers_outlive_stop_signals_from_their_birth(reg_dataset):
    """SLURM signals every process of a job: a preemption (SIGUSR2, SIGTERM) that reaches the
    DataLoader workers while they start (a spawned worker imports torch for seconds) must leave
    them to their training process, which saves at a step boundary."""
    flag = StopFlag().install()
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    hit: set[int] = set()
    done = False

    def signal_new_workers() -> None:
        while not done:
            for child in me.children():
                if child.pid not in before and "resource_tracker" not in " ".join(child.cmdline()):
                    for sig in (signal.SIGUSR2, signal.SIGTERM):
                        os.kill(child.pid, sig)
                    hit.add(child.pid)
            time.sleep(0.005)

    stream = TrainStream(*_cfg(reg_dataset, workers=2, seed=7), 0, 1, 8)
    signaller = threading.Thread(target=signal_new_workers, daemon=True)
    signaller.start()
    try:
        batches = _take(iter(stream), 4)
        time.sleep(0.5)  # a last round of signals to the running workers
    finally:
        done = True
        signaller.join()
        flag.restore()
    alive = {p.pid for p in me.children() if p.status() != psutil.STATUS_ZOMBIE}
    assert len(hit) >= 2 and hit <= alive, (hit, alive)
    assert len(_indices(batches)) == 32 and not flag.raised  # the training process saw no signal
    stream.close()


ODD_SAMPLES = 31  # 31 % 8 = 7 > 8 - 2: streaming gives 2 ranks 16 samples each (one repeated)


def _steps_main(rank: int, world: int, port: int, data: str, result: str) -> None:
    """One rank's two epochs at global batch 8, as lists of sample indices per batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stream = TrainStream(*_cfg(Path(data), workers=1, seed=5, batch=8), rank, world, 8 // world)
    batches = _take(iter(stream), 2 * (ODD_SAMPLES // 8))
    Path(result).write_text(json.dumps([b["index"].tolist() for b in batches]))
    dist.barrier()
    dist.destroy_process_group()


def test_each_step_is_the_same_global_batch_on_one_or_two_ranks(tmp_path):
    """Streaming's canonical nodes fix the global order; epochs of whole global batches keep the
    steps aligned where streaming would give 2 ranks a 4th, padded step."""
    src = make_reg_layout(tmp_path / "src", ODD_SAMPLES, 4)
    prepare(str(src), str(tmp_path / "out"), PrepareOptions(chunk_size=16, progress=False))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    [one] = _run_ranks(_steps_main, 1, tmp_path / "out", tmp_path / "one")
    two = _run_ranks(_steps_main, 2, tmp_path / "out", tmp_path / "two")
    steps_two = [sorted(a + b) for a, b in zip(*two)]
    assert steps_two == [sorted(step) for step in one]
    for epoch in (one[:3], one[3:]):
        assert len({i for step in epoch for i in step}) == 24  # each sample at most once an epoch


def test_mid_epoch_resume_is_exact_and_order_follows_the_seed(reg_dataset):
    torch.set_num_threads(1)
    stream = TrainStream(*_cfg(reg_dataset, workers=2, seed=3), 0, 1, 8)
    it = iter(stream)
    head = _indices(_take(it, 5))
    state = stream.state_dict()
    tail = _indices(_take(it, REG_SAMPLES // 8 - 5))
    assert sorted(head + tail) == REG_INDICES
    stream.close()

    resumed = TrainStream(*_cfg(reg_dataset, workers=2, seed=3), 0, 1, 8)
    resumed.load_state_dict(state)
    assert _indices(_take(iter(resumed), REG_SAMPLES // 8 - 5)) == tail  # same samples, same order
    resumed.close()
    other = TrainStream(*_cfg(reg_dataset, workers=2, seed=4), 0, 1, 8)
    assert _indices(_take(iter(other), 5)) != head
    other.close()


def test_missing_or_corrupted_shard_is_named(reg_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(reg_dataset, data)
    shard = data / "chunk-000002" / "shard.00000.mds"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-100])
    with pytest.raises(ShardError, match=r"chunk-000002/shard.00000.mds .* corrupted.*regscale prepare --verify"):
        TrainStream(*_cfg(data), 0, 1, 8)
    shard.unlink()
    with pytest.raises(ShardError, match=r"chunk-000002/shard.00000.mds .* missing.*regscale prepare --verify"):
        TrainStream(*_cfg(data), 0, 1, 8)
    assert main(["prepare", "--verify", str(data)]) == 1
    assert "BAD chunk-000002/shard.00000.mds: missing" in capsys.readouterr().out
    shard.write_bytes(blob[:5000] + bytes([blob[5000] ^ 1]) + blob[5001:])  # same size, one bit flipped
    assert main(["prepare", "--verify", str(data)]) == 1
    assert "sha1 hash mismatch" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["bytes changed in place", "wrong hash in index.json"])
def test_a_changed_shard_stops_training_before_its_samples_are_used(reg_dataset, tmp_path, fault):
    """Same size, other bytes (or an index whose hash is wrong): the first open of the shard in a
    DataLoader worker checks its xxh64 and stops the stream naming it; no sample of it comes out."""
    data = tmp_path / "data"
    shutil.copytree(reg_dataset, data)
    victim = "chunk-000002/shard.00000.mds"
    if fault == "bytes changed in place":
        blob = bytearray((data / victim).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (data / victim).write_bytes(bytes(blob))
    else:
        index = json.loads((data / "index.json").read_text())
        entry = next(s for s in index["shards"] if s["raw_data"]["basename"] == victim)
        entry["raw_data"]["hashes"]["xxh64"] = "0" * 16
        (data / "index.json").write_text(json.dumps(index))
    chunk = json.loads((data / "chunk-000002" / "chunk.json").read_text())
    stream = TrainStream(*_cfg(data, workers=1), 0, 1, 8)
    used: list[int] = []
    with pytest.raises(ShardError, match=rf"shard {victim} of the dataset at {data} does not match its index.json "
                                         r"\(.*xxh64 hash mismatch\).*no sample of it was used"):
        for batch in stream:
            used += batch["index"].tolist()
    stream.close()
    assert not set(used) & set(range(chunk["first"], chunk["stop"]))


def _victim(data: str, conn) -> None:
    """A training process that uses the stream (1 worker) and then hangs until killed."""
    stream = TrainStream(*_cfg(Path(data), workers=1), 0, 1, 8)
    next(iter(stream))
    conn.send(stream.dataset._shm_prefix_int)
    time.sleep(600)


def test_stale_shared_memory_of_a_killed_run_is_cleaned(reg_dataset):
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    victim = ctx.Process(target=_in_own_group, args=(_victim, str(reg_dataset), theirs))
    victim.start()
    assert ours.poll(120), "the victim never started streaming"
    prefix = ours.recv()
    os.killpg(victim.pid, signal.SIGKILL)  # the process and its DataLoader worker, as SLURM would
    victim.join()
    assert list(Path("/dev/shm").glob(f"{prefix:06d}_*")), "kill -9 should leave streaming's shared memory behind"
    stream = TrainStream(*_cfg(reg_dataset, workers=1), 0, 1, 8)
    # the dead run's shared memory is gone; its number is not reused (its filelocks stay: a late
    # unlink by the dead run's resource tracker must never hit a new run's segment of that name)
    assert not list(Path("/dev/shm").glob(f"{prefix:06d}_*")), "the dead run's shared memory is left"
    assert stream.dataset._shm_prefix_int != prefix
    assert len(_indices(_take(iter(stream), 4))) == 32
    stream.close()


# ---------------------------------------------------------------------------------------------
# synthetic data for the smoke recipe


def _as_rank(rank: int, fn, *args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # a launcher sets both, or neither
    fn(*args)


def test_streaming_is_loaded_without_its_nlp_and_video_datasets():
    """Every rank, DataLoader worker and prepare imports streaming: its core only (the same
    classes), not the text datasets that pull in transformers' generation utilities and sklearn."""
    code = ("import sys, regscale.data.stream, streaming\n"
            "from streaming.base import MDSWriter, StreamingDataset\n"
            "assert 'streaming.text' not in sys.modules and 'sklearn' not in sys.modules\n"
            "assert streaming.StreamingDataset is StreamingDataset and streaming.MDSWriter is MDSWriter\n"
            "print(streaming.text.__name__, streaming.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("streaming.text "), done.stderr


def test_synthetic_dataset_rank_safe_and_idempotent(tmp_path):
    from regscale.data.synthetic import ensure_synthetic_dataset

    torch.set_num_threads(1)
    path = tmp_path / "smoke-data"
    cfg = load_config(REPO / "recipes" / "smoke.yaml", [f"data.path={path}", "data.synthetic=24"])
    args = (cfg.data, cfg.model.num_classes)
    waiter = mp.get_context("fork").Process(target=_as_rank, args=(1, ensure_synthetic_dataset, *args))
    waiter.start()  # rank 1 waits for rank 0's dataset
    ensure_synthetic_dataset(*args)  # this process is rank 0 (no RANK in the environment)
    waiter.join(timeout=120)
    assert waiter.exitcode == 0
    summary = json.loads((path / "summary.json").read_text())
    assert summary["samples"] == 24 and len(summary["per_class"]) == 10
    stamp = (path / "index.json").stat().st_mtime_ns
    ensure_synthetic_dataset(*args)
    assert (path / "index.json").stat().st_mtime_ns == stamp
    labels = [int(s["label"]) for s in _read_all(path)]
    assert max(labels) < cfg.model.num_classes
