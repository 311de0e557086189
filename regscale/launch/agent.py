"""The node agent: one per node of a training job, starting and watching that node's training
processes (one per GPU) with torch's elastic agent, the one behind torchrun.

A process that dies (rank 0 included) or hangs restarts the whole group inside the allocation,
from the newest valid checkpoint: no trip through the queue. The agents meet in a c10d rendezvous
hosted by node 0's agent (the node that runs the batch script); a restart is a new rendezvous
round, which goes on with the nodes left when one is gone, down to slurm.min_nodes (the same
samples and noise on any world size). slurm.max_restarts bounds the restarts of one job start;
past it, or when the rendezvous cannot gather slurm.min_nodes, the agent fails and the job goes
back to SLURM (regscale.launch.job requeues it).

On top of torch's agent, this one
- detects a hung process: each one beats after every step (regscale.train.heartbeat); silence
  past its bound dumps every local process's stack into <run>/stacks/ (faulthandler on SIGUSR1;
  a stopped process is continued first so that it can), then kills the group: a restart;
- records every attempt: the agent that holds rank 0 (the rendezvous picks it, on any node) appends
  a start line to attempts.jsonl before each round and the end of a round that ended in order (rank
  0's outcome), or the nodes that left it; every agent appends an end line
  for each of its processes that failed or hung (rank, host, signal or first error line, log),
  marking as secondary the ones that only waited for a failed peer;
- writes one log per rank and round, <run>/logs/<job>.<requeue>.<round>/rank<R>.log (also copied,
  prefixed, to the job's log);
- forwards the stop signals (SIGUSR2, SIGTERM, SIGINT) to its processes, which save at the next
  step boundary and end in order (SLURM also signals them directly; one more is harmless). After
  one, the job is ending (a preemption, the time limit): a group that then fails is not restarted
  inside it, the job goes back to SLURM at once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry

from regscale.config import Config
from regscale.launch import runs
from regscale.launch.worker import STACK_SIGNAL, stack_file
from regscale.outcome import Outcome
from regscale.rundir import LOGS
from regscale.train.heartbeat import ENV as HEARTBEAT_ENV
from regscale.train.heartbeat import beat_path, read_beat

log = logging.getLogger("regscale.agent")

MONITOR_S = 0.5  # how often the agent looks at its processes and their beats
STACK_WAIT_S = 3.0  # time given to the processes to write their stacks before they are killed
JOIN_TIMEOUT_S = 600  # a rendezvous round waits this long for slurm.min_nodes agents
LAST_CALL_S = 10  # once min_nodes are in, this long for the others
BEATS_PREFIX = "regscale-beats-"  # + the agent's pid: the node-local folder of its processes' beats
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# the error of a process that only waited for a failed peer (regscale.dist.waiting, gloo, NCCL)
_PEER_FAILURE = re.compile(r"waited for every rank|Connection closed by peer|Connection reset by peer|"
                           r"Broken pipe|NCCL communicator was aborted|remote process exited", re.I)


@dataclass
class NodeJob:
    """This node's place in a training job: the job, its start (requeue count), this node's index
    among the job's nodes, and where node 0's agent hosts the rendezvous."""

    job_id: str
    restart: int
    node_rank: int
    nodes: int
    master: str
    port: int

    def round_logs(self, round_: int) -> str:
        """The per-rank log folder of one round, relative to the run directory."""
        return f"{LOGS}/{self.job_id}.{self.restart}.{round_}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RunLogs(LogsSpecs):
    """One stderr log per rank and round under the run directory, teed into the agent's stderr
    (stdout is stderr in the worker)."""

    def __init__(self, run_dir: Path, node: NodeJob, current_round: Callable[[], int]) -> None:
        super().__init__(log_dir=str(run_dir / LOGS), redirects=Std.ERR, tee=Std.ERR)
        self.run_dir, self.node, self.current_round = run_dir, node, current_round

    @property
    def root_log_dir(self) -> str:
        return str(self.run_dir / LOGS)

    def path(self, rank: int, round_: int) -> Path:
        return self.run_dir / self.node.round_logs(round_) / f"rank{rank:05d}.log"

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        stderrs = {}
        for local_rank, env in envs.items():
            path = self.path(int(env["RANK"]), self.current_round())
            path.parent.mkdir(parents=True, exist_ok=True)
            stderrs[local_rank] = str(path)
        return LogsDest(stdouts=dict.fromkeys(envs, ""), stderrs=stderrs, tee_stdouts={},  # "": the agent's stdout
                        tee_stderrs=dict(stderrs), error_files=dict.fromkeys(envs, os.devnull))


class NodeAgent(LocalElasticAgent):
    """torch's LocalElasticAgent with hang detection, attempt records and signal forwarding."""

    def __init__(self, spec: WorkerSpec, cfg: Config, run_dir: Path, node: NodeJob, beats: Path,
                 check_start: Callable[[int, int], None]) -> None:
        self.cfg, self.run_dir, self.node, self.beats = cfg, run_dir, node, beats
        self.check_start = check_start
        self.round = -1
        self.host = socket.gethostname()
        self.logs = RunLogs(run_dir, node, lambda: self.round)
        self._reported: set[int] = set()  # ranks whose end this round is recorded
        self._pending: list[int] = []  # stop signals that came before the processes existed
        self.stop_signal: Optional[str] = None  # the first stop signal this agent got
        self._nodes = node.nodes  # in the last round
        super().__init__(spec, self.logs, start_method="spawn", exit_barrier_timeout=300,
                         log_line_prefix_template="[rank${rank}]:")

    # -- signals ---------------------------------------------------------------------------------

    def install_signals(self) -> None:
        """Forward the stop signals to this node's processes (pending until they exist)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._forward)

    def _forward(self, signum: int, frame: object) -> None:
        self.stop_signal = self.stop_signal or signal.Signals(signum).name
        self._remaining_restarts = 0  # the job is ending: a restart would not have the time to save
        pids = self._worker_pids()
        if not pids:
            self._pending.append(signum)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _worker_pids(self) -> list[int]:
        context = getattr(self, "_pcontext", None)
        return list(context.pids().values()) if context is not None else []

    # -- a round starts --------------------------------------------------------------------------

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        self.round += 1
        self._reported = set()
        for old in self.beats.glob("*.json"):
            old.unlink()
        step = runs.latest_step(self.run_dir)
        if worker_group.group_rank == 0 and 0 < worker_group.group_world_size < self._nodes:
            self._record_lost_nodes(self._nodes, worker_group.group_world_size)
        self._nodes = worker_group.group_world_size
        self.check_start(step, self.round)  # every agent: raises when the run must stop (a halt, repeated failures)
        if worker_group.group_rank == 0:
            runs.record_start(self.run_dir, self.node.job_id, self.node.restart, step, round=self.round,
                              world_size=worker_group.spec.local_world_size * worker_group.group_world_size,
                              nodes=worker_group.group_world_size, logs=self.node.round_logs(self.round))
        self._started_at = time.time()
        pids = super()._start_workers(worker_group)
        self.install_signals()  # torch's process context installs its own handlers on start
        for signum in self._pending:
            self._forward(signum, None)
        self._pending.clear()
        return pids

    # -- watching --------------------------------------------------------------------------------

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        # the processes dead before torch's poll: torch stops the rest of the group as soon as it sees
        # one failure, and their failures are consequences
        dead = {w.global_rank for w in worker_group.workers if _process_state(w.id) in ("Z", "?")}
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.HEALTHY:
            hung = self._hung(worker_group)
            if hung:
                return self._kill_hung(worker_group, hung)
        elif result.state == WorkerState.FAILED:
            self._record_failures(worker_group, result.failures, dead)
        elif result.state == WorkerState.SUCCEEDED and worker_group.group_rank == 0:
            self._record_outcome(worker_group)
        return result

    def _hung(self, worker_group: WorkerGroup) -> list[tuple[Any, str]]:
        """The local processes silent past their bound, with what their beat said."""
        if self.cfg.train.hang_timeout_s <= 0:
            return []
        now = time.time()
        first_bound = self.cfg.train.first_step_timeout_s
        hung = []
        for worker in worker_group.workers:
            beat = read_beat(beat_path(self.beats, worker.local_rank))
            if beat is None:
                if now > self._started_at + first_bound:
                    hung.append((worker, f"no heartbeat since its start {now - self._started_at:.0f} s ago "
                                         f"(train.first_step_timeout_s={first_bound:g})"))
            elif now > beat.silent_until:
                where = "before its first step" if beat.phase == "start" else f"after step {beat.step}"
                hung.append((worker, f"no heartbeat for {now - beat.time:.0f} s {where} (bound {beat.bound_s:.0f} s)"))
        return hung

    def _kill_hung(self, worker_group: WorkerGroup, hung: list[tuple[Any, str]]) -> RunResult:
        """Dump every local process's stack, record why each was silent, kill the group."""
        self._dump_and_record(worker_group, {w.global_rank: reason for w, reason in hung},
                              "the group hung")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = super()._monitor_workers(worker_group)
            if result.state != WorkerState.HEALTHY:
                break
            time.sleep(0.1)
        log.warning("rank(s) %s hung: stacks in %s; restarting the group", ", ".join(str(w.global_rank) for w, _ in hung),
                    stack_file(self.run_dir, 0).parent)
        return RunResult(state=WorkerState.FAILED, failures=result.failures)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        if worker_group.state == WorkerState.HEALTHY:  # another node restarts the group: ours still run
            self._dump_and_record(worker_group, {}, "another node restarted the group")
        super()._restart_workers(worker_group)

    def _dump_and_record(self, worker_group: WorkerGroup, expired: dict[int, str], what: str) -> None:
        """Every local process writes its stack (a stopped one is continued to), then all are
        killed; each gets an end line saying where it was. Primary: a stopped process, or one past
        its bound (`expired`) that was not waiting in a collective for another rank."""
        beats = {w.global_rank: read_beat(beat_path(self.beats, w.local_rank)) for w in worker_group.workers}
        stopped, sizes = {}, {}
        for worker in worker_group.workers:
            path = stack_file(self.run_dir, worker.global_rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = _process_state(worker.id)
            stopped[worker.global_rank] = state == "T"
            with open(path, "a") as f:
                f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {self.node.job_id} round {self.round} "
                        f"rank {worker.global_rank} on {self.host}: {what}; process state {state}\n")
            sizes[path] = path.stat().st_size
            _signal(worker.id, STACK_SIGNAL)
            if state == "T":
                _signal(worker.id, signal.SIGCONT)  # a stopped process writes its stack once continued
        _wait_for_dumps(sizes)
        for worker in worker_group.workers:
            _killpg(worker.id)
        now = time.time()
        for worker in worker_group.workers:
            rank, beat = worker.global_rank, beats[worker.global_rank]
            if not (rank in expired or stopped[rank] or expired):
                self._reported.add(rank)  # stopped with a group restarted elsewhere: that node says why
                continue
            waited = _waited_in_collective(stack_file(self.run_dir, rank))
            reason = expired.get(rank) or (f"no heartbeat for {now - beat.time:.0f} s after step {beat.step}" if beat
                                           else "no heartbeat since its start")
            if stopped[rank]:
                reason = f"stopped (SIGSTOP), {reason}"
            elif waited:
                reason += "; it waited in a collective for another rank"
            self._record(rank, "hung", reason, reached=beat.step if beat else None,
                         secondary=not stopped[rank] and (waited or rank not in expired))

    # -- records ---------------------------------------------------------------------------------

    def _record_failures(self, worker_group: WorkerGroup, failures: dict[int, ProcessFailure], dead: set[int]) -> None:
        """One end line per failed local process; `dead`: the ranks that ended by themselves (the
        others were stopped with their group: a consequence)."""
        for worker in worker_group.workers:
            rank, failure = worker.global_rank, failures.get(worker.global_rank)
            if failure is None or rank in self._reported:
                continue
            beat = read_beat(beat_path(self.beats, worker.local_rank))
            signal_name = failure.signal_name() if failure.exitcode < 0 else None
            if rank not in dead:
                error, secondary = "stopped with its group after another process failed", True
            elif beat is not None and beat.error:
                error, secondary = beat.error, bool(_PEER_FAILURE.search(beat.error))
            elif signal_name:
                error, secondary = f"killed by {signal_name}", False
            else:
                error, secondary = f"exit code {failure.exitcode}", False
            self._record(rank, "failed", error, signal=signal_name, secondary=secondary,
                         reached=beat.step if beat else None)

    def _record(self, rank: int, end: str, error: str, *, signal: Optional[str] = None,
                secondary: bool = False, reached: Optional[int] = None) -> None:
        self._reported.add(rank)
        log_path = self.logs.path(rank, self.round)
        runs.record_end(self.run_dir, end, runs.latest_step(self.run_dir), error, rank=rank, host=self.host,
                        signal=signal, log=str(log_path.relative_to(self.run_dir)), reached_step=reached,
                        secondary=secondary)

    def _record_lost_nodes(self, before: int, now: int) -> None:
        """Node 0, at a restart with fewer nodes: the previous round ended because nodes left (their
        agents could record nothing); SLURM says which."""
        gone = sorted(set(_slurm_hostnames(os.environ.get("SLURM_JOB_NODELIST", "")))
                      - set(_slurm_hostnames(_job_nodes(self.node.job_id))))
        which = ", ".join(gone) or f"{before - now} node(s)"
        runs.record_end(self.run_dir, "lost", runs.latest_step(self.run_dir),
                        f"{which} left the job ({before} -> {now} nodes); it goes on with the nodes left",
                        host=", ".join(gone) or None)

    def _record_outcome(self, worker_group: WorkerGroup) -> None:
        """The agent with rank 0's process: the group ended in order; rank 0's beat says how."""
        rank0 = next(w for w in worker_group.workers if w.global_rank == 0)
        beat = read_beat(beat_path(self.beats, rank0.local_rank))
        outcome = Outcome(beat.outcome) if beat and beat.outcome else Outcome.COMPLETED
        end_step = beat.end_step if beat and beat.end_step is not None else runs.latest_step(self.run_dir)
        runs.record_end(self.run_dir, outcome.value, end_step, rank=0, host=self.host,
                        log=str(self.logs.path(0, self.round).relative_to(self.run_dir)),
                        reached_step=beat.step if beat else None)


def _job_nodes(job_id: str) -> str:
    """The nodes SLURM holds for the job now (a failed node leaves a --no-kill job), '' when unknown."""
    try:
        return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _slurm_hostnames(nodelist: str) -> list[str]:
    """'n[1-2]' -> ['n1', 'n2'] (scontrol's expansion), [] when empty or unknown."""
    if not nodelist:
        return []
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []


def _process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (R, S, D, T, Z), or '?'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _killpg(pid: int) -> None:
    """SIGKILL a process and its DataLoader workers (torch starts each in its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        _signal(pid, signal.SIGKILL)


def _wait_for_dumps(sizes: dict[Path, int]) -> None:
    """Until every stack file grew and has stopped growing (faulthandler writes the dump at once),
    STACK_WAIT_S at most."""
    end = time.monotonic() + STACK_WAIT_S
    seen = dict(sizes)
    while time.monotonic() < end:
        time.sleep(0.2)
        now = {path: path.stat().st_size for path in sizes}
        if all(now[p] > sizes[p] and now[p] == seen[p] for p in sizes):
            return
        seen = now


def _waited_in_collective(path: Path) -> bool:
    """True when the last stack dump in `path` shows the main thread waiting in a collective (the
    process waited for another rank rather than hung by itself)."""
    try:
        dump = path.read_text(errors="replace").rsplit("\n=== ", 1)[-1]
    except OSError:
        return False
    for block in dump.split("\n\n"):
        if "regscale/launch/worker.py" in block and "<module>" in block:  # the main thread
            return "regscale/dist.py" in block or "distributed_c10d.py" in block
    return False


def run_agent(cfg: Config, run_dir: Path, node: NodeJob, check_start: Callable[[int, int], None]) -> Optional[str]:
    """Start this node's processes and watch them until the group ends in order (None: how is in
    attempts.jsonl, written by the agent that holds rank 0, whichever node the rendezvous made it)
    or fails for good (why)."""
    nproc = cfg.slurm.gpus_per_node
    _remove_dead_beats(Path(_node_memory() or tempfile.gettempdir()))
    beats = Path(tempfile.mkdtemp(prefix=f"{BEATS_PREFIX}{os.getpid()}-", dir=_node_memory()))
    os.environ[HEARTBEAT_ENV] = str(beats)
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGHUP,SIGQUIT")  # ours: regscale's forwarding
    # each round's rank 0 hosts a fresh store for its process group: the agent's shared one would keep
    # the previous round's keys (gloo's peer addresses), and a restarted group would read those
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    params = RendezvousParameters(
        backend="c10d", endpoint=f"{node.master}:{node.port}", run_id=f"regscale-{node.job_id}-{node.restart}",
        min_nodes=min(cfg.slurm.min_nodes or node.nodes, node.nodes), max_nodes=node.nodes,
        is_host=node.node_rank == 0, join_timeout=JOIN_TIMEOUT_S, last_call_timeout=LAST_CALL_S)
    spec = WorkerSpec(role="train", local_world_size=nproc, entrypoint=sys.executable,
                      args=("-u", "-m", "regscale.launch.worker", str(run_dir)),
                      rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
                      max_restarts=cfg.slurm.max_restarts, monitor_interval=MONITOR_S)
    agent = NodeAgent(spec, cfg, run_dir, node, beats, check_start)
    agent.install_signals()
    close_rendezvous = True
    try:
        result = agent.run()
    except Exception as err:
        close_rendezvous = "Signal" not in type(err).__name__
        raise
    finally:
        if close_rendezvous:
            spec.rdzv_handler.shutdown()
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for beat in beats.glob("*"):
            beat.unlink()
        beats.rmdir()
    if result.is_failed() and agent.stop_signal:
        return f"the processes failed after {agent.stop_signal} (the job is ending: no restart inside it)"
    if result.is_failed():
        return (f"the processes failed {cfg.slurm.max_restarts + 1} times in this job start "
                f"(slurm.max_restarts={cfg.slurm.max_restarts})")
    return None


def _remove_dead_beats(folder: Path) -> None:
    """The beat folders of agents that died without removing theirs (SIGKILL, a node reboot)."""
    for beats in folder.glob(f"{BEATS_PREFIX}*"):
        pid = beats.name[len(BEATS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(beats, ignore_errors=True)


def _node_memory() -> Optional[str]:
    """/dev/shm when writable (beats never touch a shared file system), else the temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
