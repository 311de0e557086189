"""Submitting runs: the executor from profile + recipe, the training job and its evaluation chain,
sweeps as job arrays, resubmission of a stopped run, and the local executor chain.

`python -m regscale.launch.submit eval-at RUN_DIR STEP` is what a running training job calls to
submit an intermediate evaluation (see job.EvalWatcher).
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from regscale import checkpoints
from regscale.config import (RESUMABLE_KEYS, Config, ConfigError, check_paths_for_training, is_remote, load_config,
                             resumable, to_yaml)
from regscale.errors import UserError
from regscale.fsutil import write_atomic
from regscale.launch import runs
from regscale.launch.profile import Profile, check_value, load_profile, sbatch_parameters, sbatch_test_args
from regscale.paths import check_run_dir
from regscale.rundir import CHECKPOINTS, CONFIG, JOB_FOLDER, STOP_REPORT, step_name

# ---------------------------------------------------------------------------------------------
# where jobs run


def require_slurm_tools() -> None:
    """sbatch, squeue and scancel must be on PATH to use SLURM."""
    for tool in ("sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            raise UserError(f"slurm.cluster=slurm but '{tool}' is not on PATH: install the SLURM "
                            "client tools, or run here with --local (slurm.cluster=local)")


def slurm_answers() -> bool:
    """True when the SLURM tools are installed and the controller answers squeue."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return False
    try:
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def choose_cluster(cfg: Config, local: bool) -> str:
    """'slurm' or 'local' from --local and slurm.cluster (auto: SLURM when it answers)."""
    if local or cfg.slurm.cluster == "local":
        return "local"
    if cfg.slurm.cluster == "slurm":
        require_slurm_tools()
        return "slurm"
    if slurm_answers():
        return "slurm"
    print("no SLURM controller answers here: running on this machine (submitit's local executor)")
    return "local"


def preflight(params: dict[str, Any]) -> None:
    """`sbatch --test-only` with the run's request: SLURM's own refusal, before anything is submitted."""
    cmd = ["sbatch", "--test-only", *sbatch_test_args(params), "--wrap=true"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError("sbatch --test-only did not answer within 60 s: is slurmctld up?") from None
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise UserError(f"SLURM refused the job ({' '.join(cmd[2:-1])}): {message}; nothing was submitted")


class Launcher:
    """A submitit executor for one run (or sweep) on one cluster kind, with the sbatch parameters of
    its training jobs (one task per node: the node's agent) and evaluation jobs (one per GPU)."""

    def __init__(self, cfg: Config, cluster: str, folder: Path, profile: Optional[Profile] = None) -> None:
        import submitit

        self.cfg, self.cluster = cfg, cluster
        s = cfg.slurm
        check_value("job folder", str(folder))
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)  # requeues: launch.job
        # a training job's last lines: its exit status (SLURM's COMPLETED or FAILED, the afterok of its
        # evaluation) is the training's, not srun's (a job that went on after losing a node completes,
        # although the lost node's task was killed)
        self.exit_status = ["rc=$?", f"exec {shlex.quote(sys.executable)} -m regscale.launch.job exit-status "
                                     f"{shlex.quote(str(folder))} $rc"]
        if cluster == "slurm":
            profile = profile or load_profile(s.profile)
            self.params = sbatch_parameters(cfg, profile, str(cfg.run.name), per_node=True)
            self.eval_params = sbatch_parameters(cfg, profile, str(cfg.run.name))
        else:
            if s.nodes != 1:
                raise ConfigError(f"the local executor runs on one machine: slurm.nodes must be 1, got {s.nodes}")
            self.params = dict(name=str(cfg.run.name), nodes=1, tasks_per_node=1, timeout_min=s.time_limit_min)
            self.eval_params = dict(self.params, tasks_per_node=s.gpus_per_node)

    def check(self) -> None:
        """SLURM's verdict on the request (partition, account, qos, resources); nothing on local."""
        if self.cluster == "slurm":
            preflight(self.params)

    def submit(self, fn: Any, name: str, after: Optional[str] = None) -> Any:
        """Submit one job (a TrainJob one task per node, others one per GPU); `after`: start only
        when that job completed (and die if it cannot)."""
        import submitit

        from regscale.launch.job import TrainJob

        params = dict(self.params if isinstance(fn, TrainJob) else self.eval_params, name=name)
        if isinstance(fn, TrainJob) and self.cluster == "slurm":
            params["slurm_teardown"] = self.exit_status
        if after is not None and self.cluster == "slurm":
            extra = dict(params.get("slurm_additional_parameters", {}), **{"kill-on-invalid-dep": "yes"})
            params.update(slurm_dependency=f"afterok:{after}", slurm_additional_parameters=extra)
        self.executor.update_parameters(**params)
        try:
            return self.executor.submit(fn)
        except submitit.core.utils.FailedJobError as err:
            raise UserError(f"sbatch refused the job: {' '.join(str(err).split())}") from None

    def submit_array(self, fns: list[Any], name: str) -> list[Any]:
        """Submit training jobs as one SLURM job array (or, locally, one job per function)."""
        self.executor.update_parameters(**dict(self.params, name=name, slurm_teardown=self.exit_status))
        with self.executor.batch():
            jobs = [self.executor.submit(fn) for fn in fns]
        return jobs


# ---------------------------------------------------------------------------------------------
# run directories


def check_new_run_dir(cfg: Config) -> Path:
    """<run.dir>/<run.name>, if a new run can start there: not a run already, a usable name for the
    batch script, a folder (or a path to one) that this user can write."""
    run_dir = runs.run_dir_of(cfg)
    check_value("run.name", str(cfg.run.name))
    check_value("run directory", str(run_dir))
    check_run_dir(run_dir, cfg.data.path)
    if runs.read_jobs(run_dir) or (run_dir / CHECKPOINTS).exists():
        raise UserError(f"run directory {run_dir} already holds a run: continue it with "
                        f"`regscale resume {run_dir}`, or choose another run.name")
    return run_dir


def prepare_run_dir(cfg: Config) -> Path:
    """Create <run.dir>/<run.name> with config.yaml; refuse to reuse one that already ran."""
    run_dir = check_new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG, to_yaml(cfg))
    return run_dir


def mlflow_run_id(cfg: Config, run_dir: Path) -> str:
    """Register the run's MLflow run now (SCHEDULED until its job starts), so submit can print its id."""
    from regscale.track.mlflow import register_run

    return register_run(cfg, run_dir) or "(tracking server unreachable: the job will create the run)"


@dataclass
class Submitted:
    run_dir: Path
    train: str
    evals: list[str]
    mlflow: str


def _chain_evals(launcher: Launcher, cfg: Config, run_dir: Path, train_id: str) -> list[str]:
    """The final evaluation job, afterok on training (intermediate ones are submitted by the job)."""
    from regscale.launch.job import EvalJob

    job = launcher.submit(EvalJob(str(run_dir)), f"{cfg.run.name}-eval", after=train_id)
    runs.add_jobs(run_dir, [runs.JobRecord(job.job_id, "eval", "slurm", depends_on=train_id)])
    return [job.job_id]


def submit_slurm(cfg: Config, launcher: Launcher, run_dir: Path) -> Submitted:
    """Training job + chained evaluation on SLURM; returns at once."""
    from regscale.launch.job import TrainJob

    mlflow = mlflow_run_id(cfg, run_dir)
    job = launcher.submit(TrainJob(str(run_dir)), str(cfg.run.name))
    runs.add_jobs(run_dir, [runs.JobRecord(job.job_id, "train", "slurm")])
    return Submitted(run_dir, job.job_id, _chain_evals(launcher, cfg, run_dir, job.job_id), mlflow)


def _wait_local(job: Any, what: str, run_dir: Path, updates: Callable[[], Any]) -> bool:
    """Wait for a local job, showing its progress; print where its log is and how it ended."""
    import submitit

    from regscale.launch.follow import follow

    print(f"{what}: local job {job.job_id}, log {job.paths.stdout.parent}", flush=True)
    try:
        follow(job, updates)
        result = job.results()[0]
    except KeyboardInterrupt:
        job.cancel(check=False)  # the local processes must not outlive the command
        raise
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
        lines = str(err).strip().splitlines()
        print(f"{what} failed: {lines[-1] if lines else err}", file=sys.stderr)
        report = run_dir / STOP_REPORT
        if report.is_file():
            print(f"stop report: {report}", file=sys.stderr)
        return False
    if isinstance(result, str):
        print(f"{what}: {result}", flush=True)
    return True


def run_local(cfg: Config, launcher: Launcher, run_dir: Path) -> Submitted:
    """The same chain on this machine, one job after the other: train, intermediate evals, final eval."""
    from regscale.launch.follow import EvaluationFollower, TrainingFollower, format_result
    from regscale.launch.job import EvalJob, TrainJob
    from regscale.launch.status import eval_record_path

    mlflow = mlflow_run_id(cfg, run_dir)
    print(f"run dir    {run_dir}\nMLflow run {mlflow}", flush=True)
    job = launcher.submit(TrainJob(str(run_dir)), str(cfg.run.name))
    train_id = job.job_id
    runs.add_jobs(run_dir, [runs.JobRecord(train_id, "train", "local")])
    if not _wait_local(job, "training", run_dir, TrainingFollower(run_dir, cfg)):
        raise UserError(f"training failed; logs under {job.paths.stdout.parent}; nothing evaluated")
    evals = []
    for step in [*cfg.eval.at_steps, None]:
        if step is not None and not (run_dir / CHECKPOINTS / step_name(step)).is_dir():
            print(f"eval @ step {step}: no checkpoint kept for that step (train.keep_every), skipped")
            continue
        evaluated = cfg.train.max_steps if step is None else step
        record = eval_record_path(run_dir, evaluated)
        follower = EvaluationFollower(record.parent)  # before the job starts writing its progress
        job = launcher.submit(EvalJob(str(run_dir), step), f"{cfg.run.name}-eval")
        runs.add_jobs(run_dir, [runs.JobRecord(job.job_id, "eval", "local", step=step)])
        evals.append(job.job_id)
        if not _wait_local(job, f"evaluation @ step {evaluated}", run_dir, follower):
            raise UserError(f"evaluation failed; logs under {job.paths.stdout.parent}")
        print(format_result(record), flush=True)
    return Submitted(run_dir, train_id, evals, mlflow)


def report(sub: Submitted, cluster: str) -> None:
    print(f"run dir     {sub.run_dir}")
    print(f"train job   {sub.train} ({cluster})" if cluster == "slurm" else "train       completed")
    for job_id in sub.evals:
        print(f"eval job    {job_id}" + (f" (afterok:{sub.train}, kill on invalid dependency)"
                                         if cluster == "slurm" else ""))
    print(f"MLflow run  {sub.mlflow}")
    print(f"next        regscale status {sub.run_dir}   |   regscale compare   |   regscale ui")


# ---------------------------------------------------------------------------------------------
# the verbs


def parse_sweep(specs: list[str]) -> list[list[str]]:
    """['train.lr=1e-4,2e-4', 'train.seed=0,1'] -> the cartesian product as lists of overrides."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values or any(not v for v in values.split(",")):
            raise UserError(f"--sweep '{spec}' must look like key=value1,value2 (for example "
                            "train.lr=1e-4,2e-4)")
        if key in (axis[0].partition("=")[0] for axis in axes):
            raise UserError(f"--sweep {key} is given twice: give all its values in one --sweep {key}=V1,V2")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def _point_name(base: str, point: list[str]) -> str:
    return base + "-" + "-".join(f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}={o.split('=', 1)[1]}" for o in point)


def check_inputs(cfg: Config, run_dir: Optional[Path] = None) -> None:
    """The files a run reads, before anything is submitted: the data (index.json and every local
    shard's size; a remote index), the MLflow store, the encoder weights, and the evaluation's VAE
    decoder, reference batch and Inception weights (read the way the jobs read them, so a broken
    one fails now, not after training)."""
    from regscale.data.shards import check_dataset
    from regscale.track.lineage import tracking_uri
    from regscale.track.store import check_store

    check_paths_for_training(cfg)
    check_dataset(cfg.data.path, cfg.data.synthetic)
    check_store(tracking_uri(cfg, run_dir or runs.run_dir_of(cfg)), "the MLflow store (mlflow.tracking_uri)",
                reading=False)
    if cfg.encoder.weights is not None and not cfg.encoder.random_init:
        from regscale.models.encoders import load_dinov2

        load_dinov2(cfg.encoder, cfg.model.cls_token_dim)
    if not cfg.vae.random_init:  # the evaluation decodes its samples with it
        from regscale.models.encoders import check_vae_files

        check_vae_files(cfg.vae.decoder)
    ev = cfg.eval
    if ev.ref_batch is not None and not is_remote(ev.ref_batch):
        from regscale.eval.job import check_reference

        check_reference(ev.ref_batch, cfg, ev.random_inception)
    if ev.inception is not None and not ev.random_inception:
        from regscale.eval.inception import load_inception

        load_inception(ev.inception)


@dataclass
class Request:
    """A checked submission: the configuration as given and one per run (per sweep point)."""

    base: Config
    runs: list[Config]


def check_request(recipe: str, overrides: list[str], *, local: bool = False,
                  sweep: Optional[list[str]] = None) -> Request:
    """Every check of a submission that does not depend on the machine it is made from (the same
    for `--dry-run` and a real submit): each run's configuration (one per sweep point), a new run
    directory for each, the cluster profile and every value that goes into the batch script, the
    local executor's single node, the SLURM tools when slurm.cluster=slurm."""
    base = load_config(recipe, overrides)
    points = parse_sweep(sweep) if sweep else []
    cfgs = [load_config(recipe, [*overrides, *point, f"run.name={_point_name(str(base.run.name), point)}"])
            for point in points] or [base]
    on_slurm_only = base.slurm.cluster == "slurm"
    profile = None if local or base.slurm.cluster == "local" else load_profile(base.slurm.profile)
    for cfg in cfgs:
        check_new_run_dir(cfg)
        if profile is None and cfg.slurm.nodes != 1:
            raise ConfigError(f"the local executor runs on one machine: slurm.nodes must be 1, got {cfg.slurm.nodes}")
        if profile is not None:
            sbatch_parameters(cfg, profile, str(cfg.run.name), per_node=True)
    if on_slurm_only:
        require_slurm_tools()
    if len({c.run.name for c in cfgs}) != len(cfgs):
        raise UserError(f"--sweep gives {len(cfgs)} points but only {len({c.run.name for c in cfgs})} "
                        "distinct run names; repeat no value")
    return Request(base, cfgs)


def submit(recipe: str, overrides: list[str], *, local: bool = False, sweep: Optional[list[str]] = None) -> int:
    """`regscale submit`: one run, or one run per sweep point (a SLURM job array)."""
    request = check_request(recipe, overrides, local=local, sweep=sweep)
    for one in request.runs:
        check_inputs(one)
    cfg = request.base
    profile = None if local or cfg.slurm.cluster == "local" else load_profile(cfg.slurm.profile)
    cluster = choose_cluster(cfg, local)
    if sweep:
        return _submit_sweep(cfg, request.runs, cluster)
    run_dir = runs.run_dir_of(cfg)
    launcher = Launcher(cfg, cluster, run_dir / JOB_FOLDER, profile)
    launcher.check()
    run_dir = prepare_run_dir(cfg)
    if cluster == "slurm":
        report(submit_slurm(cfg, launcher, run_dir), cluster)
    else:
        report(run_local(cfg, launcher, run_dir), cluster)
    return 0


def _submit_sweep(base: Config, cfgs: list[Config], cluster: str) -> int:
    from regscale.launch.job import TrainJob

    folder = Path(base.run.dir).resolve() / f"{base.run.name}.sweep"
    launcher = Launcher(cfgs[0], cluster, folder / JOB_FOLDER)
    launcher.check()
    run_dirs = [prepare_run_dir(cfg) for cfg in cfgs]
    if cluster == "local":
        for cfg, run_dir in zip(cfgs, run_dirs):
            print(f"--- sweep point {cfg.run.name}")
            report(run_local(cfg, Launcher(cfg, cluster, run_dir / JOB_FOLDER), run_dir), cluster)
        return 0
    mlflow = [mlflow_run_id(cfg, d) for cfg, d in zip(cfgs, run_dirs)]
    jobs = launcher.submit_array([TrainJob(str(d)) for d in run_dirs], f"{base.run.name}-sweep")
    for cfg, run_dir, job, run_id in zip(cfgs, run_dirs, jobs, mlflow):
        runs.add_jobs(run_dir, [runs.JobRecord(job.job_id, "train", "slurm")])
        report(Submitted(run_dir, job.job_id, _chain_evals(launcher, cfg, run_dir, job.job_id), run_id), cluster)
    print(f"sweep       job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} runs")
    return 0


def _active_jobs(run_dir: Path) -> list[str]:
    """Job ids of this run that SLURM still holds (pending, running, requeued)."""
    ids = [j.id for j in runs.read_jobs(run_dir) if j.cluster == "slurm"]
    if not ids or shutil.which("squeue") is None:
        return []
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.split()


def resume(run_dir: Path, overrides: list[str], *, local: bool = False) -> int:
    """`regscale resume`: resubmit a stopped or failed run from its newest checkpoint."""
    run_dir = run_dir.resolve()
    runs.load_run_config(run_dir)
    for item in overrides:
        if not resumable(item.partition("=")[0]):
            raise UserError(f"resume: '{item}' cannot change for a run that has started; allowed: "
                            f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_KEYS)}")
    cfg = load_config(run_dir / CONFIG, overrides)
    check_inputs(cfg, run_dir)
    active = _active_jobs(run_dir)
    if active:
        raise UserError(f"{run_dir} still has jobs in SLURM ({', '.join(active)}): wait, or "
                        f"`regscale cancel {run_dir}` first")
    step = _resume_step(run_dir)
    if step >= cfg.train.max_steps:
        raise UserError(f"{run_dir} finished training (step {step}); nothing to resume")
    cluster = choose_cluster(cfg, local)
    launcher = Launcher(cfg, cluster, run_dir / JOB_FOLDER)
    launcher.check()
    stop = run_dir / STOP_REPORT
    if stop.is_file():
        stop.rename(stop.with_name(f"{stop.stem}.{int(time.time())}{stop.suffix}"))
    write_atomic(run_dir / CONFIG, to_yaml(cfg))
    runs.record_resume(run_dir, step)
    print(f"resuming {run_dir} from step {step}")
    if cluster == "slurm":
        report(submit_slurm(cfg, launcher, run_dir), cluster)
    else:
        report(run_local(cfg, launcher, run_dir), cluster)
    return 0


def _resume_step(run_dir: Path) -> int:
    """The step a resumed job starts from: that of the newest checkpoint whose files verify (sizes
    and hashes, read here in parallel, so that no job is queued only to find them broken), 0 when
    none was published. Newer broken ones are named in a warning: the job skips them too."""
    root = run_dir / CHECKPOINTS
    broken: list[str] = []
    found = checkpoints.find_valid(root, skipped=lambda path, reason: broken.append(f"{path.name} ({reason})"))
    if found is not None:
        for problem in broken:
            print(f"regscale resume: warning: checkpoint {problem} is broken; starting from {found[0].name}",
                  file=sys.stderr)
        return int(found[1]["step"])
    if broken:
        raise UserError(f"resume: every checkpoint in {root} is broken: {'; '.join(broken)}. Restore one, "
                        f"or start a new run")
    return 0


def submit_eval_at(run_dir: Path, step: int) -> str:
    """Submit the evaluation of one intermediate checkpoint (called from inside the training job)."""
    from regscale.launch.job import EvalJob

    cfg = runs.load_run_config(run_dir)
    launcher = Launcher(cfg, "slurm", run_dir / JOB_FOLDER)
    job = launcher.submit(EvalJob(str(run_dir), step), f"{cfg.run.name}-eval{step}")
    runs.add_jobs(run_dir, [runs.JobRecord(job.job_id, "eval", "slurm", step=step)])
    return job.job_id


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "eval-at":
        print("usage: python -m regscale.launch.submit eval-at RUN_DIR STEP", file=sys.stderr)
        return 2
    job_id = submit_eval_at(Path(argv[1]), int(argv[2]))
    print(f"regscale: submitted evaluation of step {argv[2]} as job {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
