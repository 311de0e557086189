"""Health on the real loop: NaN steps skipped and counted, too many in a row roll back to the last
checkpoint (2 processes); metrics.jsonl carries loss parts, grad norm, lr, images/s, memory, data
wait. fp16 (one process): an overflowed step leaves the weights but, as upstream, not the EMA; a
loss scale that stays below its floor checkpoints and stops the run, and the job's stop report
says why, with the skipped steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

from regscale.rundir import CHECKPOINTS, METRICS, STOP_REPORT
from tests.fixtures.train import launch_train, ok

FP16_COLLAPSE = ["train.precision=fp16", "train.max_steps=8", "train.ckpt_every=1", "train.keep_last=8",
                 "slurm.gpus_per_node=1", "train.min_loss_scale=65536", "train.max_low_scale_steps=2"]
# (with that floor one overflow is a collapse)


def test_nonfinite_steps_roll_back_to_the_last_checkpoint(smoke_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = launch_train(run, smoke_data, ["train.max_steps=6", "train.ckpt_every=2",
                                            "train.max_nonfinite_steps=2"],
                          env={"REGSCALE_FAULT_NAN": "3,4"})
    assert result.returncode == 0, ok(result)
    assert "step 5: non-finite gradient norm, step skipped (2 in a row, 2 in total)" in result.stderr
    assert "2 non-finite steps in a row: rolled back to" in result.stderr
    assert "step_00000004 (rollback 1)" in result.stderr
    manifest = json.loads((run / CHECKPOINTS / "step_00000006" / "manifest.json").read_text())
    assert manifest["health"] == {"nonfinite_total": 2, "rollbacks": 1, "low_scale_steps": 0}
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]  # 5 only once: rolled back first
    assert math.isnan(logged[3]["loss"]) and math.isnan(logged[3]["grad_norm"])
    last = logged[-1]
    for key in ("loss/img", "loss/proj", "loss/cls", "grad_norm", "lr", "images_per_s",
                "data_wait_s", "mem/host_rss_gb"):
        assert key in last, key
    assert last["nonfinite_total"] == 2 and last["images"] == 48
    assert any("time/first_step_s" in r for r in rows) and any("ckpt/stall_s" in r for r in rows)


def test_a_collapsed_fp16_loss_scale_checkpoints_and_stops_the_run(smoke_data: Path, tmp_path: Path) -> None:
    import torch

    from regscale.engine.export import load_consolidated
    from regscale.errors import RunHalted
    from regscale.launch import runs
    from regscale.launch.job import halted_reason, write_stop_report
    from regscale.launch.status import format_run, run_status

    run = tmp_path / "run"
    halted = launch_train(run, smoke_data, FP16_COLLAPSE, nproc=0, env={"REGSCALE_FAULT_OVERFLOW": "1"})
    assert halted.returncode == 2 and "Traceback" not in halted.stderr, ok(halted)
    message = ("step 4: the fp16 loss scale collapsed: below train.min_loss_scale=65536 for 2 steps in a row "
               "(train.max_low_scale_steps=2; now 32768; skipped steps in total: 1); checkpoint step 4 is saved")
    assert f"regscale train: error: {message}" in halted.stderr, ok(halted)
    assert "step 2: gradients overflowed at loss scale 65536: step skipped, scale halved" in halted.stderr
    manifest = json.loads((run / CHECKPOINTS / "step_00000004" / "manifest.json").read_text())
    assert manifest["health"] == {"nonfinite_total": 1, "rollbacks": 0, "low_scale_steps": 2}
    assert manifest["loss_scaler"]["scale"] == 32768.0
    last = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if "loss" in line][-1]
    assert last["step"] == 4 and last["loss_scale"] == 32768 and last["nonfinite_total"] == 1
    model, ema = ({step: load_consolidated(run, step, weights)[0] for step in (1, 2, 3)}
                  for weights in ("model", "ema"))
    assert not [k for k in model[1] if not torch.equal(model[2][k], model[1][k])], "the skipped step changed weights"
    assert any(not torch.equal(ema[2][k], ema[1][k]) for k in ema[1]), "the EMA skipped the step (upstream does not)"
    assert any(not torch.equal(model[3][k], model[2][k]) for k in model[1]), "the run did not recover"

    # what a job does with it: its rank 0 writes the stop report (regscale.launch.worker), and the
    # agents start no other round (halted_reason: no restart, no requeue); `regscale status` shows it
    runs.record_start(run, "7", 0, 0)
    error = RunHalted(halted.stderr.split("regscale train: error: ")[1].strip())
    write_stop_report(run, str(error), 4)
    assert halted_reason(run, runs.read_attempts(run)).startswith(message)
    report = json.loads((run / STOP_REPORT).read_text())
    assert report["reason"].startswith(message) and report["step"] == 4 and report["skipped_steps"] == 1
    assert "skipped steps: 1): step 4: the fp16 loss scale collapsed" in "\n".join(format_run(run_status(run), True))

    # going on regardless, from a checkpoint as old ones are (no loss scale in it): a fresh one
    path = run / CHECKPOINTS / "step_00000004" / "manifest.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "loss_scaler"}))
    going_on = launch_train(run, smoke_data, FP16_COLLAPSE + ["train.min_loss_scale=0"], nproc=0)
    assert going_on.returncode == 0, ok(going_on)
    assert ("written without the fp16 loss scale: continued with fp32 weights under autocast and a fresh loss "
            "scale (65536): NOT bit-exact") in going_on.stderr, ok(going_on)
    rows = {r["step"]: r for r in map(json.loads, (run / METRICS).read_text().splitlines()) if "loss" in r}
    assert rows[5]["loss_scale"] == 65536 and rows[8]["nonfinite_total"] == 1
