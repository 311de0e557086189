"""Typed configuration: merging, published recipes, and the catalogue of wrong input."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from regscale.config import config_hash, flatten, from_yaml_text, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regscale.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_published_xl_recipe_values(recipes):
    cfg = load_config(recipes / "sit_xl_4m.yaml")
    assert cfg.model.size == "XL/2"
    assert cfg.model.resolved() == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, encoder_depth=8)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.max_steps) == (256, 1e-4, 4_000_000)
    assert cfg.train.betas == [0.9, 0.999] and cfg.train.weight_decay == 0.0 and cfg.train.grad_clip == 1.0
    assert cfg.train.ema_decay == 0.9999 and cfg.train.precision == "fp16"  # the official --mixed-precision
    assert (cfg.loss.proj_coeff, cfg.loss.cls_coeff, cfg.loss.time_sampling) == (0.5, 0.03, "uniform")
    e = cfg.eval
    assert (e.num_samples, e.sampler, e.steps, e.cfg_scale, e.cls_cfg_scale) == (50_000, "sde", 250, 2.3, 2.3)
    assert (e.guidance_low, e.guidance_high) == (0.0, 0.85)
    assert cfg.run.name == "sit_xl_4m"


@pytest.mark.parametrize("name,size,steps", [("sit_l_400k", "L/2", 400_000), ("sit_b_400k", "B/2", 400_000),
                                             ("smoke", "S/2", None)])
def test_every_recipe_loads(recipes, name, size, steps):
    cfg = load_config(recipes / f"{name}.yaml")
    assert cfg.model.size == size
    if steps:
        assert cfg.train.max_steps == steps and cfg.eval.cfg_scale == 1.0 and cfg.train.precision == "fp16"


def test_overrides_win_and_hash_changes(recipes):
    base = load_config(recipes / "sit_xl_4m.yaml")
    cfg = load_config(recipes / "sit_xl_4m.yaml", ["train.lr=2e-4", "model.size=L/2", "slurm.nodes=4"])
    assert cfg.train.lr == 2e-4 and cfg.model.size == "L/2" and cfg.world_size == 32
    assert config_hash(cfg) != config_hash(base)
    assert config_hash(load_config(recipes / "sit_xl_4m.yaml")) == config_hash(base)


def test_yaml_round_trip_and_flatten(recipes):
    cfg = load_config(recipes / "smoke.yaml", ["train.seed=7"])
    again = from_yaml_text(to_yaml(cfg))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    flat = flatten(cfg)
    assert flat["train.seed"] == 7 and flat["model.hidden_size"] == 64


BAD_OVERRIDES = [
    (["train.lrr=1e-4"], "train.lrr", "train.lr"),
    (["modle.size=XL/2"], "modle", "model"),
    (["train.batch_sise=3"], "train.batch_sise", "train.batch_size"),
    (["train.max_steps=many"], "train.max_steps", "int"),
    (["engine.compile=perhaps"], "engine.compile", "bool"),
    (["train.tf32=2"], "train.tf32", "bool"),  # OmegaConf alone reads any number as true
    (["engine.async_checkpoint=-1"], "engine.async_checkpoint", "true or false"),
    (["train.lr=fast"], "train.lr", "float"),
    (["engine.zero_stage=4"], "engine.zero_stage", "1, 2 or 3"),
    (["engine.kind=megatron"], "engine.kind", "fsdp, deepspeed"),
    (["model.size=XXL/2"], "model.size", "S/2"),
    (["train.batch_size=100"], "train.batch_size", "world size"),
    (["eval.guidance_high=1.5"], "eval.guidance_high", "[0, 1]"),
    (["eval.guidance_low=-0.1"], "eval.guidance_low", "[0, 1]"),
    (["eval.guidance_low=0.9"], "eval.guidance_low", "guidance_high"),
    (["train.precision=fp8"], "train.precision", "bf16"),
    (["train.micro_batch_size=3"], "train.micro_batch_size", "per-GPU batch"),
    (["model.num_heads=7"], "model.hidden_size", "divisible"),
    (["model.encoder_depth=40"], "model.encoder_depth", "model.depth"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.min_loss_scale=-1"], "train.min_loss_scale", ">= 0"),
    (["train.max_low_scale_steps=0"], "train.max_low_scale_steps", "> 0"),
    (["slurm.signal_lead_s=999999"], "slurm.signal_lead_s", "time limit"),
    (["slurm.min_nodes=3"], "slurm.min_nodes", "[1, slurm.nodes=2]"),
    (["slurm.nodes=4", "slurm.min_nodes=3"], "slurm.min_nodes", "(24 = "),  # 256 on 3 x 8 GPUs
    (["train.lr"], "train.lr", "key=value"),
    (["engine.offload_optimizer=true"], "engine.offload_optimizer", "deepspeed"),
    (["train.ckpt_every=often"], "train.ckpt_every", "positive number of steps or auto"),
    (["train.ckpt_every=2.5"], "train.ckpt_every", "int or str"),
    (["slurm.node_mtbf_h=0"], "slurm.node_mtbf_h", "> 0"),
    (["train.straggler_factor=0.9"], "train.straggler_factor", "> 1"),
]


@pytest.mark.parametrize("overrides,names,hint", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_overrides_exit_2_with_named_key(overrides, names, hint):
    proc = run_cli("config", "recipes/sit_xl_4m.yaml", *overrides)
    assert proc.returncode == 2, proc.stderr
    assert names in proc.stderr and hint in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1  # one clear line
    assert proc.stdout == ""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BAD_RECIPES = [
    ("train:\n  lr: 1e-4\n  warmup: 5000\n", "train.warmup", "unknown key"),
    ("training:\n  lr: 1e-4\n", "training", "train"),
    ("model:\n  size: [XL, 2]\n", "model.size", "str"),
    ("train:\n  betas: [0.9]\n", "train.betas", "two numbers"),
    ("train: [1, 2]\n", "train", ""),
    ("train:\n  tf32: 2\n", "train.tf32", "bool"),
    ("- a\n- b\n", "recipe.yaml", "mapping"),
    ("model:\n  size: XL/2\n bad: indent\n", "recipe.yaml", "YAML"),
]


@pytest.mark.parametrize("text,names,hint", BAD_RECIPES, ids=[str(i) for i in range(len(BAD_RECIPES))])
def test_bad_recipes_exit_2_with_named_key(tmp_path, text, names, hint):
    proc = run_cli("config", str(write(tmp_path, text)))
    assert proc.returncode == 2, proc.stderr
    assert names in proc.stderr and hint in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_recipe_file(tmp_path):
    proc = run_cli("config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr and "nope.yaml" in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    ([], "'data.path' is required"),
    (["data.path={tmp}/absent"], "'data.path' does not exist: {tmp}/absent"),
    (["data.path={tmp}"], "'data.path' has no index.json: {tmp}"),
    (["data.path=s3://b/in", "eval.ref_batch=/no/ref.npz"], "'eval.ref_batch' does not exist: /no/ref.npz"),
], ids=["no-data", "absent", "no-index", "no-ref"])
def test_missing_files_warn_in_the_plan_and_stop_a_submit(tmp_path, capsys, overrides, message):
    from regscale.cli import main

    overrides = [o.format(tmp=tmp_path) for o in overrides] + [f"run.dir={tmp_path}/runs"]
    message = message.format(tmp=tmp_path)
    assert main(["submit", "recipes/sit_xl_4m.yaml", *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING        {message}" in out and "(a submit without --dry-run refuses this)" in out
    assert "global 256 = 16 x 16 per GPU" in out and out.endswith("dry run: nothing submitted\n")
    assert main(["submit", "recipes/sit_xl_4m.yaml", *overrides]) == 2  # before anything is submitted
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_config_verb_prints_published_values():
    proc = run_cli("config", "recipes/sit_xl_4m.yaml")
    assert proc.returncode == 0, proc.stderr
    for line in ("size: XL/2", "batch_size: 256", "max_steps: 4000000", "cfg_scale: 2.3",
                 "cls_cfg_scale: 2.3", "guidance_high: 0.85", "ema_decay: 0.9999", "steps: 250"):
        assert line in proc.stdout
    assert "# config hash: " in proc.stdout


def test_dry_run_plan():
    # the user's own command with --dry-run anywhere among the overrides
    proc = run_cli("submit", "recipes/sit_xl_4m.yaml", "data.path=s3://bucket/imagenet", "--dry-run",
                   "slurm.nodes=4")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "32 = 4 node(s) x 8 GPU(s)" in out and "global 256 = 32 x 8 per GPU" in out
    assert "4,000,000 steps = 1,024,000,000 images = 799.3 epochs" in out
    assert "afterok" in out and "nothing submitted" in out
    # the expected ratio at this scale, for the recipe's interval and for auto (regscale.reliability)
    assert "failures       node MTBF 3692 h (slurm.node_mtbf_h) / 4 node(s): one every 923 h" in out
    assert re.search(r"^expected ratio every 10,000 steps \([\d.]+ min\) 9\d\.\d\d% \| auto every [\d,]+ steps", out, re.M)
    # the only warning: this machine cannot read the bucket's index (a real submit refuses that)
    assert [line for line in out.splitlines() if line.startswith("WARNING")] in (
        [], [line for line in out.splitlines() if line.startswith("WARNING") and "s3://bucket/imagenet" in line])
    proc = run_cli("submit", "recipes/sit_xl_4m.yaml", "slurm.nodes=4", "--dry-run", "--nodes=4")
    assert proc.returncode == 2 and "unrecognized arguments: --nodes=4" in proc.stderr

