"""One training process of a node agent (regscale.launch.agent):

    python -m regscale.launch.worker RUN_DIR

The agent starts one per GPU with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and REGSCALE_HEARTBEAT_DIR. The process takes over the stop signals first (a
preemption during start-up counts), beats from its start (the first-step bound applies), lets the
agent dump its stack on SIGUSR1 (into <run>/stacks/rank<R>.txt, also while it is stuck in C code),
trains, and leaves how it ended in its last beat. Rank 0 tracks the run in MLflow.

Exit status: 0 whenever the loop ended in order (completed, preempted, deadline, interrupted: the
agent reads the outcome from the beat), 1 on an error (the agent restarts the group).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import IO, Optional

from regscale.errors import RunHalted, expected_failure, first_line
from regscale.rundir import STACKS

STACK_SIGNAL = signal.SIGUSR1  # the agent asks for every thread's stack with it


def stack_file(run_dir: Path, rank: int) -> Path:
    """Where rank `rank`'s stacks go when its agent asks (appended, one dump per hang)."""
    return run_dir / STACKS / f"rank{rank:05d}.txt"


def dump_stacks_on_request(run_dir: Path, rank: int) -> IO[str]:
    """faulthandler writes every thread's stack on STACK_SIGNAL, from C: it works while the process
    waits in a collective. Returns the open file (it must stay open)."""
    path = stack_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    faulthandler.register(STACK_SIGNAL, file=f, all_threads=True, chain=False)
    return f


def worker_pid(run_dir: Path, rank: int) -> Optional[int]:
    """The pid of the training process of global rank `rank` that a node agent on this host runs for
    run_dir (not its DataLoader workers, which share its command line), or None (tests, benches)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "regscale.launch.worker" in cmd and str(run_dir) in cmd and proc.environ().get("RANK") == str(rank):
                found[proc.pid] = proc.info["ppid"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return next((pid for pid, ppid in found.items() if ppid not in found), None)


def main(run_dir: Path) -> int:
    from regscale.train.preempt import StopFlag

    stop = StopFlag().install()  # before the heavy imports: a preemption while they run counts

    from regscale.launch import runs
    from regscale.launch.goodput import log_goodput
    from regscale.launch.job import open_tracker, write_stop_report
    from regscale.train.heartbeat import Heartbeat
    from regscale.train.loop import train

    sys.stdout = sys.stderr  # one log per rank (the agent keeps stderr per rank)
    rank = int(os.environ.get("RANK", "0"))
    cfg = runs.load_run_config(run_dir)
    heartbeat = Heartbeat.from_env(cfg.train.hang_timeout_s, cfg.train.first_step_timeout_s)
    heartbeat.starting()
    stacks = dump_stacks_on_request(run_dir, rank)  # noqa: F841 (kept open until the process exits)
    tracker = open_tracker(cfg, run_dir) if rank == 0 else None
    if tracker is not None:  # the lineage's goodput so far, the breakdown of every earlier attempt
        log_goodput(tracker, run_dir, int(os.environ.get("WORLD_SIZE", "1")), runs.latest_step(run_dir))
    try:
        outcome = train(cfg, run_dir, tracker, stop=stop, heartbeat=heartbeat)
    except BaseException as err:
        message = expected_failure(err)
        heartbeat.failed(f"{type(err).__name__}: {message or first_line(err)}")
        if isinstance(err, RunHalted) and rank == 0:  # no restart, no requeue: a retry would stop again
            write_stop_report(run_dir, str(err), runs.latest_step(run_dir))
        if message is None:
            traceback.print_exc()
        else:
            print(f"regscale: rank {rank}: {message}", file=sys.stderr, flush=True)
        return 1
    heartbeat.ended(outcome.value, runs.latest_step(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
