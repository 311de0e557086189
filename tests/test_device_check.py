"""The GPU check kit (bench/device_check.py) in its CPU smoke mode: every part runs through the real
code (training loop, engines, sampler, evaluator, checkpoints) at tiny sizes and its JSON holds sane
figures, so the kit is ready whenever a GPU is at hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_device_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/regscale/torch_extensions"))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "device_check.py"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    body = json.loads((out / "device_check.json").read_text())
    parts = body["parts"]
    failed = {name: part["error"] for name, part in {**parts, **parts["train"]}.items()
              if isinstance(part, dict) and "error" in part}
    assert not failed, failed
    assert body["machine"]["device"].startswith("CPU") and body["sizes"]["smoke"] is True

    parity = parts["parity"]
    assert parity["fp32_ok"] and parity["bf16_ok"] and parity["fp16_ok"], parity
    assert positive(parity["outputs_max_abs"]) and 0 < parity["bf16_rel_l2"] <= parity["bf16_bound"]
    assert 0 < parity["fp16_rel_l2"] < parity["bf16_rel_l2"]  # 11 significant bits against 8
    assert all(positive(parts["peak"][f"{p}_tflops"]) for p in ("bf16", "fp16", "fp32"))

    batch, steps = body["sizes"]["batch"], body["sizes"]["steps"]
    eager = parts["train"]["fsdp_eager"]
    assert eager["status"] == "measured" and len(eager["steps_s"]) == steps
    assert all(positive(s) for s in eager["steps_s"]) and math.isclose(eager["images_s"], batch / eager["step_s"])
    assert positive(eager["first_step_s"]) and positive(eager["tflops"]) and eager["data_wait_s"] >= 0
    assert positive(eager["mfu_measured_peak"])  # against the measured CPU peak
    ckpt = parts["checkpoint"]
    assert ckpt["status"] == "completed"  # ran on through its async and its final blocking save
    assert positive(ckpt["async_stall_s"]) and positive(ckpt["blocking_stall_s"]) and positive(ckpt["checkpoint_bytes"])
    assert positive(ckpt["step_with_async_save_s"]) and positive(ckpt["step_with_final_save_s"])
    fp16 = parts["train"]["fsdp_eager_fp16"]  # the paper's precision, beside the sizes' (fp32 in smoke)
    assert fp16["status"] == "measured" and fp16["precision"] == "fp16" and eager["precision"] == "fp32"
    assert len(fp16["steps_s"]) == steps and positive(fp16["speed_vs_fp32"]) and positive(fp16["mfu_measured_peak"])
    zero2 = parts["train"]["zero2_eager"]
    assert zero2["status"] == "measured" and len(zero2["steps_s"]) == steps and positive(zero2["step_s"])

    sampler = parts["sampler"]
    for key in ("fp32_unguided", "fp32_guided", "bf16_unguided", "bf16_guided"):
        assert positive(sampler[f"{key}_calls_s"]), key
    assert positive(sampler["fp32_50k_x_250_hours"]) and positive(sampler["bf16_speedup"])

    evaluator = parts["evaluator"]
    assert positive(evaluator["inception_images_s"]) and evaluator["frechet_method"] in ("sqrtm", "low-rank")
    assert positive(evaluator["metrics_total_s"])
    optimizer = parts["optimizer"]
    assert all(positive(optimizer[f"{impl}_step_s"]) for impl in ("fused", "foreach", "for-loop"))

    assert set(parts["skipped"]) == {"official", "compile"}
    mfu, speed, sampler_goal = body["goals"]  # no compile and no official step in the smoke run
    assert mfu["met"] is None and speed["met"] is None and sampler_goal["met"] in (True, False)
    table = (out / "device_check.md").read_text()
    assert "| parity | fp32_max_abs_diff |" in table and "| train | fsdp_eager: images_s |" in table
