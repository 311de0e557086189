"""Health on the real 2-process loop: NaN steps skipped and counted, too many in a row roll back
to the last checkpoint; metrics.jsonl carries loss parts, grad norm, lr, images/s, memory, data wait."""

from __future__ import annotations

import json
import math
from pathlib import Path

from regscale.rundir import CHECKPOINTS, METRICS
from tests.fixtures.train import launch_train, ok


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
    assert manifest["health"] == {"nonfinite_total": 2, "rollbacks": 1}
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
