"""Time from a preemption signal to the first resumed training step, on the dev SLURM cluster.

Starts the cluster (slurm/start.sh, as root), submits the smoke recipe on 2 fake nodes x 1 task,
sends `scancel --signal=USR2` once training logs step 3, and prints where the time goes:

  signal -> checkpoint saved      the loop finishes its step, agrees to stop, saves (attempt end)
  saved  -> requeued job starts   submitit's requeue + SLURM holding and rescheduling the job
  start  -> job callable runs     srun launch, Python + torch + submitit imports (attempt start)
  callable -> first step done     dist init, model/encoder/data set-up, checkpoint load, one step

usage: python bench/bench_requeue.py [--keep]   (--keep: leave the run directory in /tmp)
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from regscale.launch import runs  # noqa: E402
from regscale.rundir import METRICS  # noqa: E402


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def slurm_start(job: str) -> float:
    """When SLURM (re)started the job: sacct's Start of the allocation (local ISO time)."""
    start = sh("sacct", "-n", "-P", "-X", "-j", job, "-o", "Start").strip()
    return datetime.datetime.fromisoformat(start).timestamp()


def main() -> int:
    keep = "--keep" in sys.argv
    sh("bash", str(REPO / "slurm" / "start.sh"))
    root = Path(tempfile.mkdtemp(prefix="bench-requeue-"))
    out = sh(sys.executable, "-m", "regscale.cli", "submit", str(REPO / "recipes" / "smoke.yaml"),
             f"run.dir={root}", f"data.path={root / 'data'}", "data.synthetic=32", "train.log_every=1",
             "slurm.cluster=slurm", "slurm.profile=dev", "slurm.nodes=2", "slurm.gpus_per_node=1")
    job = re.search(r"^train job\s+(\S+)", out, re.M).group(1)
    evaluation = re.search(r"^eval job\s+(\S+)", out, re.M).group(1)
    sh("scancel", evaluation)
    run_dir = root / "smoke"
    while max((m["step"] for m in metrics(run_dir)), default=0) < 3:
        time.sleep(0.2)
    signal_at = time.time()
    sh("scancel", "--signal=USR2", job)
    while len(runs.read_attempts(run_dir)) < 2:
        time.sleep(0.2)
    first, second = runs.read_attempts(run_dir)[:2]
    while not [m for m in metrics(run_dir) if m["step"] > second.start_step and m["time"] > second.started_at]:
        time.sleep(0.2)
    resumed = [m for m in metrics(run_dir) if m["step"] > second.start_step and m["time"] > second.started_at][0]
    restarted = slurm_start(job)
    parts = [
        ("signal -> checkpoint saved", first.ended_at - signal_at),
        ("saved -> requeued job starts", restarted - first.ended_at),
        ("start -> job callable runs", second.started_at - restarted),
        ("callable -> first step done", resumed["time"] - second.started_at),
    ]
    print(f"preempted at step {first.end_step}, resumed from step {second.start_step}, first resumed "
          f"step logged: {resumed['step']}")
    for name, seconds in parts:
        print(f"  {name:<32} {seconds:7.1f} s")
    print(f"  {'signal -> first resumed step':<32} {resumed['time'] - signal_at:7.1f} s")
    print("  (sacct Start has 1 s resolution; the machine's load is "
          f"{open('/proc/loadavg').read().split()[0]})")
    sh("scancel", job)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
