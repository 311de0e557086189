"""The launcher without a cluster: profiles, unsafe values, sweeps, the requeue policy, bookkeeping,
and the CLI's refusals (nothing is submitted in any of these)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from regscale.cli import main
from regscale.config import load_config
from regscale.errors import UserError
from regscale.launch import runs
from regscale.launch.job import stop_reason
from regscale.launch.profile import Profile, load_profile, sbatch_parameters, sbatch_test_args
from regscale.launch.submit import parse_sweep
from regscale.rundir import CHECKPOINTS, JOBS, METRICS, PROGRESS

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")


def smoke_cfg(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"run.dir={tmp_path / 'runs'}", f"data.path={tmp_path / 'data'}", *overrides])


def test_profiles_shipped_load() -> None:
    assert load_profile("default").partition is None
    dev = load_profile("dev")
    assert dev.partition == "debug" and dev.gpus_as_gres


def test_unknown_profile_names_known_ones() -> None:
    with pytest.raises(UserError, match=r"unknown cluster profile 'nope'.*known: .*dev"):
        load_profile("nope")


@pytest.mark.parametrize("body, message", [
    ("partition: gpu\nbogus: 1\n", "unknown key 'bogus'"),
    ("partition: 'gpu\n  #SBATCH --x'\n", "not allowed in a batch script"),
    ("account: 'a;rm -rf /'\n", "not allowed in a batch script"),
    ("qos: '$(reboot)'\n", "not allowed in a batch script"),
    ("extra_sbatch: ['--reservation=x y']\n", "must look like --option"),
    ("extra_sbatch: ['--time=5']\n", "regscale sets from the recipe"),
    ("exclusive: maybe\n", "must be true or false"),
])
def test_profile_refuses_bad_or_unsafe_values(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(body)
    with pytest.raises(UserError, match=message):
        load_profile(str(path))


def test_parameters_one_task_per_gpu_recipe_over_profile(tmp_path: Path) -> None:
    cfg = smoke_cfg(tmp_path, "slurm.nodes=2", "slurm.gpus_per_node=4", "train.batch_size=16",
                    "slurm.partition=big", "slurm.time_limit_min=90", "slurm.signal_lead_s=120")
    profile = Profile(name="p", partition="small", account="acct", constraint="a100&ib", exclusive=True,
                      extra_sbatch=["--reservation=r1", "--requeue-on-fail"])
    params = sbatch_parameters(cfg, profile, "smoke")
    assert params["nodes"] == 2 and params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["slurm_partition"] == "big" and params["slurm_account"] == "acct"
    assert params["timeout_min"] == 90 and params["slurm_signal_delay_s"] == 120
    args = sbatch_test_args(params)
    assert "--partition=big" in args and "--constraint=a100&ib" in args and "--exclusive" in args
    assert "--reservation=r1" in args and "--requeue-on-fail" in args
    no_gres = sbatch_parameters(cfg, Profile(name="p", gpus_as_gres=False), "smoke")
    assert "gpus_per_node" not in no_gres and no_gres["tasks_per_node"] == 4
    assert "nodes" not in params["slurm_additional_parameters"]


def test_min_nodes_asks_slurm_for_a_node_range(tmp_path: Path) -> None:
    """slurm.min_nodes: the job starts (and restarts after a requeue) on what is free in the range."""
    cfg = smoke_cfg(tmp_path, "slurm.nodes=2", "slurm.min_nodes=1", "slurm.gpus_per_node=4", "train.batch_size=16")
    params = sbatch_parameters(cfg, Profile(name="p"), "smoke")
    assert params["nodes"] == 2 and params["slurm_additional_parameters"]["nodes"] == "1-2"
    args = sbatch_test_args(params)
    assert [a for a in args if a.startswith("--nodes=")][-1] == "--nodes=1-2"  # the last one counts
    # no --ntasks-per-node for sbatch (SLURM would then take the range's minimum); srun starts one
    # task per GPU on every node SLURM gave, and each node keeps the CPUs of its 4 tasks
    assert "tasks_per_node" not in params and not any(a.startswith("--ntasks") for a in args)
    assert "--ntasks-per-node=4" in params["slurm_srun_args"] and "--mincpus=4" in args


def test_recipe_values_are_checked_for_shell(tmp_path: Path) -> None:
    cfg = smoke_cfg(tmp_path, "slurm.partition='gpu`id`'")
    with pytest.raises(UserError, match="slurm.partition.*not allowed"):
        sbatch_parameters(cfg, Profile(name="p"), "smoke")


def test_sweep_grid() -> None:
    assert parse_sweep(["train.lr=1e-4,2e-4", "train.seed=0,1"]) == [
        ["train.lr=1e-4", "train.seed=0"], ["train.lr=1e-4", "train.seed=1"],
        ["train.lr=2e-4", "train.seed=0"], ["train.lr=2e-4", "train.seed=1"]]
    for bad in ("train.lr", "train.lr=", "=1,2", "train.lr=1,,2"):
        with pytest.raises(UserError, match="key=value1,value2"):
            parse_sweep([bad])


def attempt(start: int, end: str | None, end_step: int | None = None, error: str | None = None) -> runs.Attempt:
    ends = [runs.End(end, end_step, time.time(), error)] if end else []
    return runs.Attempt("7", 0, start, time.time(), ends=ends)


def test_stop_reason_bounds_requeues_and_repeated_failures(tmp_path: Path) -> None:
    cfg = smoke_cfg(tmp_path, "slurm.max_requeues=3", "slurm.max_failures_at_step=2")
    assert stop_reason([], 0, 3, cfg) is None
    assert "requeued 4 times" in stop_reason([], 0, 4, cfg)
    # progress between failures: go on
    history = [attempt(0, "failed", 0, "boom"), attempt(20, "preempted", 20), attempt(20, "failed", 20, "boom")]
    assert stop_reason(history, 20, 1, cfg) is None
    # two in a row from step 20 (one killed without an end record): stop, naming the last error
    history.append(attempt(20, None))
    reason = stop_reason(history, 20, 2, cfg)
    assert "2 attempts in a row failed from the checkpoint at step 20" in reason and "boom" in reason
    # `regscale resume` starts a fresh streak
    history.append(runs.Attempt("resume", 0, 20, time.time(), ends=[runs.End("resumed", 20, time.time())]))
    assert stop_reason(history, 20, 0, cfg) is None
    # a preemption that saved at the same step is not a failure
    assert stop_reason([attempt(20, "failed", 20, "x"), attempt(20, "preempted", 20)], 20, 1, cfg) is None


def test_bookkeeping_roundtrip(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert runs.read_jobs(run_dir) == [] and runs.latest_step(run_dir) == 0
    runs.add_jobs(run_dir, [runs.JobRecord("5", "train", "slurm")])
    runs.add_jobs(run_dir, [runs.JobRecord("6", "eval", "slurm", depends_on="5")])
    assert [(j.id, j.kind, j.depends_on) for j in runs.read_jobs(run_dir)] == [("5", "train", None), ("6", "eval", "5")]
    runs.record_start(run_dir, "5", 0, 0)
    runs.record_end(run_dir, "preempted", 20)
    runs.record_start(run_dir, "5", 1, 20)
    runs.record_resume(run_dir, 20)
    got = runs.read_attempts(run_dir)
    assert [(a.start_step, a.end, a.end_step) for a in got] == [(0, "preempted", 20), (20, None, None),
                                                                  (20, "resumed", 20)]
    (run_dir / CHECKPOINTS / "step_00000020").mkdir(parents=True)
    (run_dir / CHECKPOINTS / "step_00000030.broken-1").mkdir()
    (run_dir / CHECKPOINTS / "latest").write_text("garbage\n")  # a pointer only: the directories tell
    assert runs.latest_step(run_dir) == 20
    (run_dir / JOBS).write_text("{not json")
    with pytest.raises(UserError, match=f"{JOBS}: unreadable"):
        runs.read_jobs(run_dir)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_submit_unknown_profile_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = run_cli(capsys, "submit", SMOKE, f"run.dir={tmp_path}", "slurm.cluster=slurm",
                        "slurm.profile=nope")
    assert code == 2 and "unknown cluster profile 'nope'" in out
    assert not (tmp_path / "smoke").exists()


def test_submit_without_sbatch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, out = run_cli(capsys, "submit", SMOKE, f"run.dir={tmp_path}", "slurm.cluster=slurm")
    assert code == 2 and "'sbatch' is not on PATH" in out and "--local" in out
    assert not (tmp_path / "smoke").exists()


def test_resume_refuses_unsafe_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = smoke_cfg(tmp_path)
    from regscale.launch.submit import prepare_run_dir

    run_dir = prepare_run_dir(cfg)
    code, out = run_cli(capsys, "resume", str(run_dir), "train.lr=1")
    assert code == 2 and "'train.lr=1' cannot change" in out and "slurm.*" in out and "train.max_steps" in out
    code, out = run_cli(capsys, "resume", str(tmp_path / "nowhere"))
    assert code == 2 and "not a run directory" in out


def test_status_of_a_submitted_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from regscale.launch.submit import prepare_run_dir

    run_dir = prepare_run_dir(smoke_cfg(tmp_path))
    runs.add_jobs(run_dir, [runs.JobRecord("4242", "train", "local")])
    runs.record_start(run_dir, "4242", 0, 0)
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(smoke_cfg(tmp_path))
    code, out = run_cli(capsys, "status", str(tmp_path / "runs"))
    assert code == 0 and "smoke" in out and "RUNNING" in out and "0/40" in out
    code, out = run_cli(capsys, "cancel", str(run_dir))
    assert code == 2 and "no SLURM jobs recorded" in out


def test_status_shows_evaluations_checkpoints_attempts_and_the_stop_report(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from regscale.eval.job import write_record
    from regscale.launch.job import write_stop_report
    from regscale.launch.status import eval_record_path
    from regscale.launch.submit import prepare_run_dir

    run_dir = prepare_run_dir(smoke_cfg(tmp_path))
    runs.add_jobs(run_dir, [runs.JobRecord("4242", "train", "local"),
                            runs.JobRecord("4243", "eval", "local", step=20),
                            runs.JobRecord("4244", "eval", "local")])
    runs.record_start(run_dir, "4242", 0, 0)
    runs.record_end(run_dir, "failed", 20, error="RuntimeError: boom")
    runs.record_start(run_dir, "4242", 1, 20)
    for step in (20, 40):
        (run_dir / CHECKPOINTS / f"step_{step:08d}").mkdir(parents=True)
    (run_dir / CHECKPOINTS / ".tmp_step_00000060").mkdir()  # being written: not kept yet
    (run_dir / CHECKPOINTS / "latest").write_text("step_00000040\n")
    write_record(eval_record_path(run_dir, 20), {"step": 20, "metrics": {"fid_not_comparable": 31.25}})
    write_stop_report(run_dir, "2 attempts in a row failed from the checkpoint at step 40", 40)
    capsys.readouterr()

    code, out = run_cli(capsys, "status", str(run_dir))
    assert code == 0
    assert "step 20 COMPLETED 31.25*, final PENDING -" in out  # the summary line: each evaluation
    assert "checkpoints      20, 40 (newest: step 40)" in out
    assert "job 4242 restart 0, from step 0 -> failed at step 20" in out and "RuntimeError: boom" in out
    assert "job 4242 restart 1, from step 20 -> running (or killed without a record)" in out
    assert "eval job 4243     step 20      COMPLETED  FID 31.25*" in out
    assert str(eval_record_path(run_dir, 20)) in out
    assert "eval job 4244     final        PENDING    FID -" in out
    assert "STOPPED at step 40" in out and "2 attempts in a row failed" in out
    assert f"to continue      fix the cause, then: regscale resume {run_dir}" in out
    assert "* FID from a random Inception network" in out


def test_followers_read_what_the_jobs_write(tmp_path: Path) -> None:
    from regscale.launch.follow import EvaluationFollower, TrainingFollower, Update
    from regscale.track import progress
    from regscale.train.health import MetricsLog

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    training = TrainingFollower(run_dir, smoke_cfg(tmp_path))  # batch 8, 40 steps
    assert training() == Update("training", 0, 40, "steps", "starting: model, data, first step")
    log = MetricsLog(run_dir / METRICS)
    log.log({"time/first_step_s": 3.0}, 1)
    log.log({"loss": 0.5, "images_per_s": 16.0}, 10)
    assert training() == Update("training", 10, 40, "steps", "loss 0.5000  16.0 img/s", 30 * 8 / 16.0)
    with open(run_dir / METRICS, "a") as f:
        f.write('{"step": 20, "loss": 0.25')  # a line being written
    assert training().done == 10
    with open(run_dir / METRICS, "a") as f:
        f.write(', "images_per_s": 20.0}\n')
    assert training().done == 20

    out_dir = tmp_path / "eval" / "step_00000040"
    evaluation = EvaluationFollower(out_dir)
    assert evaluation().stage == "starting" and evaluation().count() == ""
    progress.record_to(out_dir / PROGRESS)
    try:
        progress.report("sampling", 4, 4, "batches (rank 0)")
        assert evaluation() == Update("sampling", 4, 4, "batches (rank 0)")
        progress.report("sample features", 64, 64, "images")
        assert evaluation().count() == "64/64 images"
    finally:
        progress.record_to(None)
    assert EvaluationFollower(out_dir)().stage == "starting"  # a new attempt starts afresh
