"""Sampling to ADM .npz: per-sample seeds make the result independent of world size (2 gloo
processes, bitwise) and of batch size (to float rounding); labels; resume after a failure."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from regscale.errors import UserError
from regscale.eval.sample import make_labels, pending_chunks
from regscale.rundir import EVAL_SAMPLES, EVAL_SHARDS
from tests.fixtures.eval import tiny_eval_config, tiny_state


def _generate(cfg, state, out: Path, decode=None, log=None) -> Path:
    from regscale.eval.job import build_sampling_model
    from regscale.eval.sample import generate
    from regscale.models.encoders import decode_latents, load_vae

    model = build_sampling_model(cfg, state, torch.device("cpu"))
    vae = load_vae(cfg.vae.decoder, random_init=True)
    return generate(model, decode or (lambda z: decode_latents(vae, z)), cfg, out, "test-weights", log=log)


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = tiny_eval_config(*overrides)
        _generate(cfg, tiny_state(cfg), Path(out))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arrays(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(npz) as f:
        return f["arr_0"], f["arr_1"]


@pytest.mark.timeout(300)
def test_two_gloo_processes_give_the_single_process_samples(tmp_path, one_thread):
    cfg = tiny_eval_config()
    single = _generate(cfg, tiny_state(cfg), tmp_path / "one")
    # fork: the children inherit the imports (spawn costs ~20 s of imports each on a loaded box);
    # the parent runs torch with one thread, so no OpenMP pool is forked mid-flight
    mp.start_processes(_worker, args=(2, _free_port(), [], str(tmp_path / "two")), nprocs=2,
                       start_method="fork")
    a, la = _arrays(single)
    b, lb = _arrays(tmp_path / "two" / EVAL_SAMPLES)
    assert a.shape == (7, 64, 64, 3) and a.dtype == np.uint8  # ADM layout: uint8 NHWC in arr_0
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a, b)  # same chunks whatever the world size: bitwise equal
    assert not list((tmp_path / "two" / EVAL_SHARDS).glob("*_*.npz"))  # shards removed once assembled
    # another batch size: other GEMM shapes, the same samples up to float rounding
    c, lc = _arrays(_generate(tiny_eval_config("eval.batch_size=2"), tiny_state(cfg), tmp_path / "bs2"))
    np.testing.assert_array_equal(la, lc)
    diff = np.abs(a.astype(int) - c.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert a.std() > 5  # real images, not a constant


def test_labels_uniform_and_balanced_are_seeded():
    u = make_labels(1000, 10, "uniform", seed=3)
    np.testing.assert_array_equal(u, make_labels(1000, 10, "uniform", seed=3))
    assert not np.array_equal(u, make_labels(1000, 10, "uniform", seed=4))
    b = make_labels(1005, 10, "balanced", seed=3)
    counts = np.bincount(b, minlength=10)
    assert counts.min() == 100 and counts.max() == 101
    assert not np.array_equal(b[:20], np.arange(20) % 10)  # shuffled, so a prefix is balanced too


def test_pending_chunks_fill_the_gaps_between_shards():
    assert pending_chunks([], 7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert pending_chunks([(0, 3), (5, 6)], 10, 4) == [(3, 5), (6, 10)]
    assert pending_chunks([(0, 4), (4, 10)], 10, 4) == []


def test_preempted_sampling_resumes_from_its_shards(tmp_path, one_thread):
    from regscale.models.encoders import decode_latents, load_vae

    cfg = tiny_eval_config()
    state = tiny_state(cfg)
    reference, _ = _arrays(_generate(cfg, state, tmp_path / "ref"))
    vae = load_vae(cfg.vae.decoder, random_init=True)
    calls = []

    def dies_on_second_batch(z):
        calls.append(len(z))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed mid-way
        return decode_latents(vae, z)

    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _generate(cfg, state, tmp_path / "run", decode=dies_on_second_batch, log=said.append)
    assert said[-1] == (f"sampling: interrupted; 3 of {cfg.eval.num_samples} samples are kept in "
                        f"{tmp_path / 'run' / EVAL_SHARDS}: the same command goes on from them")
    shards = sorted(p.name for p in (tmp_path / "run" / EVAL_SHARDS).glob("*_*.npz"))
    assert shards == ["00000000_00000003.npz"]
    (tmp_path / "run" / EVAL_SHARDS / "00000003_00000006.npz").write_bytes(b"torn write")  # a broken shard
    calls.clear()
    resumed, _ = _arrays(_generate(cfg, state, tmp_path / "run", decode=lambda z: (calls.append(len(z)),
                                                                                    decode_latents(vae, z))[1]))
    assert calls == [3, 1]  # only the missing samples were drawn
    np.testing.assert_array_equal(resumed, reference)
    with pytest.raises(UserError, match="other settings \\(cfg_scale: 1.5 -> 2.0\\)"):
        _generate(tiny_eval_config("eval.cfg_scale=2.0"), state, tmp_path / "run")
    with pytest.raises(UserError, match="other settings \\(precision: 'fp32' -> 'bf16'\\)"):
        _generate(tiny_eval_config("eval.precision=bf16"), state, tmp_path / "run")


@pytest.mark.parametrize("override,message", [
    ("eval.precision=fp16", "'eval.precision' must be one of fp32, bf16; got 'fp16'"),
    ("eval.pr_distances=float64", "'eval.pr_distances' must be one of float16, float32; got 'float64'"),
])
def test_eval_precision_settings_are_checked_when_loaded(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tiny_eval_config(override)
