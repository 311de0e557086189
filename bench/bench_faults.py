"""What a fault costs a run on the dev SLURM cluster: per fault kind, the time from the fault to the
first training step after it, and the steps lost (done again from the newest checkpoint).

Starts the cluster (slurm/start.sh, as root) and submits the smoke recipe on 2 fake nodes x 1
task with a checkpoint every 4 steps and steps slowed to >= 0.3 s (REGSCALE_FAULT_SLOW_STEP_S: time
to act between steps). Each fault hits one run once it is past step 10:

  rank0    rank 0's training process SIGKILLed     the node agent restarts the group in the job
  rank1    rank 1's training process SIGKILLed     the same, from the other node
  hang     rank 1 stopped (SIGSTOP)                noticed after max(train.hang_timeout_s, 10 x p99
                                                   step), stacks dumped, group restarted
  node     node n2 set DOWN (slurm.min_nodes=1)    the job goes on with n1 alone
  requeue  node n2 set DOWN (no slurm.min_nodes)   SLURM ends the job and requeues it (NODE_FAIL);
                                                   it restarts once n2 is back (here: at once)

and prints, for each: detected (fault -> the attempt's end recorded), restarted (-> the next
attempt's start), first step (-> its first step done), steps lost.

usage: python bench/bench_faults.py [--kinds rank0,rank1,hang,node,requeue] [--hang-timeout 60] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from regscale.launch import runs  # noqa: E402
from regscale.launch.worker import worker_pid  # noqa: E402
from regscale.metrics import LOSS  # noqa: E402
from regscale.rundir import METRICS  # noqa: E402

KINDS = ("rank0", "rank1", "hang", "node", "requeue")
FAULT_AFTER = 10  # the step a run passes before its fault


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout


def steps(run_dir: Path) -> list[tuple[int, float]]:
    """(step, time) of every logged step, in order (a step done again logs again)."""
    path = run_dir / METRICS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [(r["step"], r["time"]) for r in rows if LOSS in r]


def wait(predicate: Callable[[], bool], what: str, timeout_s: float = 1800) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit(f"bench_faults: still waiting after {timeout_s:.0f} s for {what}")
        time.sleep(0.2)


def inject(kind: str, run_dir: Path) -> None:
    if kind in ("node", "requeue"):
        sh("scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=bench_faults")
        return
    pid = worker_pid(run_dir, 0 if kind == "rank0" else 1)
    if pid is None:
        raise SystemExit(f"bench_faults: no training process of {run_dir} found")
    os.kill(pid, signal.SIGSTOP if kind == "hang" else signal.SIGKILL)


def measure(kind: str, root: Path, hang_timeout: float) -> dict[str, float]:
    extra = ["slurm.min_nodes=1"] if kind == "node" else []
    out = sh(sys.executable, "-m", "regscale.cli", "submit", str(REPO / "recipes" / "smoke.yaml"),
             f"run.dir={root}", f"run.name={kind}", f"data.path={root / 'data'}", "data.synthetic=32",
             "data.num_workers=1", "train.log_every=1", "train.ckpt_every=4", "train.max_steps=30",
             f"train.hang_timeout_s={hang_timeout}",
             "slurm.cluster=slurm", "slurm.profile=dev", "slurm.nodes=2", "slurm.gpus_per_node=1", *extra)
    job = re.search(r"^train job\s+(\S+)", out, re.M).group(1)
    sh("scancel", re.search(r"^eval job\s+(\S+)", out, re.M).group(1))
    run_dir = root / kind
    wait(lambda: max((s for s, _ in steps(run_dir)), default=0) > FAULT_AFTER, f"{kind}: step {FAULT_AFTER}")
    fault_at = time.time()
    inject(kind, run_dir)
    try:
        wait(lambda: len(runs.read_attempts(run_dir)) >= 2, f"{kind}: a restart")
        restarted = runs.read_attempts(run_dir)[1]
        wait(lambda: any(t > restarted.started_at for _, t in steps(run_dir)), f"{kind}: the first step after it")
    finally:
        if kind in ("node", "requeue"):  # back in service (SLURM may have brought it back already)
            subprocess.run(["scontrol", "update", "NodeName=n2", "State=RESUME"], capture_output=True, timeout=60)
    first = next(t for _, t in steps(run_dir) if t > restarted.started_at)
    reached = max(s for s, t in steps(run_dir) if t < restarted.started_at)  # done before the restart
    ended = runs.read_attempts(run_dir)[0].ended_at or restarted.started_at
    sh("scancel", job)
    return {"detected_s": ended - fault_at, "restarted_s": restarted.started_at - fault_at,
            "first_step_s": first - fault_at, "steps_lost": max(0, reached - restarted.start_step)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--hang-timeout", type=float, default=60.0, help="train.hang_timeout_s (the floor)")
    parser.add_argument("--keep", action="store_true", help="leave the runs in /tmp")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    sh("bash", str(REPO / "slurm" / "start.sh"))
    os.environ["REGSCALE_FAULT_SLOW_STEP_S"] = "0.3"
    root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    print(f"fault kind   detected  restarted  first step  steps lost   (seconds after the fault; "
          f"hang floor {args.hang_timeout:g} s)")
    try:
        for kind in kinds:
            m = measure(kind, root, args.hang_timeout)
            print(f"{kind:<10} {m['detected_s']:>9.1f} {m['restarted_s']:>10.1f} {m['first_step_s']:>11.1f} "
                  f"{m['steps_lost']:>11d}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"runs kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
