"""Cluster profiles (slurm/<name>.yaml) and the sbatch parameters of a run, checked for safety.

A profile says what every job on one cluster needs (partition, account, qos, constraint, mail,
further #SBATCH lines, whether GPUs are requested as gres); the recipe's slurm section says what
this run needs (nodes, GPUs per node, time limit) and may override partition/account/qos/constraint.
Every value that ends up in the batch script is checked here: a newline, a quote or a shell
metacharacter in a value could run commands from the #SBATCH header, so such values are refused
before anything is written or submitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from regscale.config import Config
from regscale.errors import UserError, first_line

PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm"

# Plain SLURM names (partition, account, qos, mail type, job name) and paths: no whitespace, no
# quotes, no shell metacharacters.
_NAME = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-]+$")
# Constraints may also use SLURM's feature operators.
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-&|\[\]*()!]+$")
# An extra line: --option or --option=value with a plain value.
_EXTRA = re.compile(r"^--([a-z][a-z0-9-]*)(?:=([A-Za-z0-9_.,:@%+=/\-&|\[\]*()!]+))?$")
# Options the launcher sets itself: a profile line must not silently fight them.
_RESERVED = {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "signal", "output",
             "error", "array", "dependency", "job-name", "open-mode", "requeue", "no-requeue", "no-kill"}


@dataclass
class Profile:
    """The contents of one slurm/<name>.yaml (see slurm/default.yaml for the meaning of each key)."""

    name: str
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    mail_user: Optional[str] = None
    mail_type: Optional[str] = None
    gpus_as_gres: bool = True
    extra_sbatch: list[str] = field(default_factory=list)


def profile_path(name: str) -> Path:
    """slurm/<name>.yaml in the current directory or in the project, or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"slurm.profile: file not found: {name}")
        return path
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise UserError(f"slurm.profile: '{name}' is not a profile name (letters, digits, _ . -)")
    for folder in (Path.cwd() / "slurm", PROFILE_DIR):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    raise UserError(f"slurm.profile: unknown cluster profile '{name}' (no slurm/{name}.yaml; "
                    f"known: {', '.join(known)})")


def load_profile(name: str) -> Profile:
    """Read and check a cluster profile; unknown keys and unsafe values are refused with their name."""
    path = profile_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a cluster profile must be a mapping of keys")
    allowed = {f.name for f in fields(Profile)} - {"name"}
    for key in data:
        if key not in allowed:
            raise UserError(f"{path}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
    extra = data.get("extra_sbatch") or []
    if not isinstance(extra, list):
        raise UserError(f"{path}: 'extra_sbatch' must be a list of '--option=value' strings")
    for key in ("exclusive", "gpus_as_gres"):
        if key in data and not isinstance(data[key], bool):
            raise UserError(f"{path}: '{key}' must be true or false; got {data[key]!r}")
    profile = Profile(name=str(path), **{**data, "extra_sbatch": [str(x) for x in extra]})
    for key in ("partition", "account", "qos", "constraint", "mail_user", "mail_type"):
        value = getattr(profile, key)
        if value is not None:
            setattr(profile, key, str(value))
            check_value(f"{path}: '{key}'", str(value), _CONSTRAINT if key == "constraint" else _NAME)
    for line in profile.extra_sbatch:
        match = _EXTRA.match(line)
        if not match:
            raise UserError(f"{path}: extra_sbatch line {line!r} must look like --option or "
                            "--option=value with no spaces, quotes or shell characters")
        if match.group(1) in _RESERVED:
            raise UserError(f"{path}: extra_sbatch line {line!r} sets --{match.group(1)}, which "
                            "regscale sets from the recipe (slurm.* keys)")
    return profile


def check_value(what: str, value: str, pattern: re.Pattern = _NAME) -> None:
    """Refuse a value that could escape its #SBATCH line or its quoting in the batch script."""
    if not pattern.match(value):
        bad = sorted({c for c in value if not pattern.match(c)})
        shown = ", ".join(repr(c) for c in bad) or "empty"
        raise UserError(f"{what} = {value!r} contains characters not allowed in a batch script "
                        f"({shown}); nothing was submitted")


def sbatch_parameters(cfg: Config, profile: Profile, job_name: str, *, per_node: bool = False) -> dict[str, Any]:
    """submitit AutoExecutor parameters, recipe values over profile values: one task per GPU
    (evaluation), or with `per_node` one task per node holding the node's GPUs and their CPUs
    (training: the node's agent starts a process per GPU). A training job is requeueable; when it
    may run on fewer nodes (slurm.min_nodes), SLURM does not end it when one of its nodes fails
    (--no-kill): its agents go on with the nodes left."""
    s = cfg.slurm
    check_value("run.name", job_name)
    tasks = 1 if per_node else s.gpus_per_node
    params: dict[str, Any] = dict(
        name=job_name,
        nodes=s.nodes,
        cpus_per_task=s.cpus_per_task * (s.gpus_per_node if per_node else 1),
        timeout_min=s.time_limit_min,
        slurm_signal_delay_s=s.signal_lead_s,
        slurm_srun_args=[] if per_node else ["--kill-on-bad-exit=1"],
    )
    elastic = per_node and s.node_counts.start < s.nodes
    if elastic:
        params["slurm_srun_args"].append("--no-kill")
    if profile.gpus_as_gres:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key) or getattr(profile, key)
        if value is not None:
            check_value(f"slurm.{key}", value, _CONSTRAINT if key == "constraint" else _NAME)
            params[f"slurm_{key}"] = value
    if profile.exclusive:
        params["slurm_exclusive"] = True
    for key in ("mail_user", "mail_type"):
        if getattr(profile, key):
            params[f"slurm_{key}"] = getattr(profile, key)
    extra: dict[str, Any] = {"requeue": True, **({"no-kill": True} if elastic else {})} if per_node else {}
    for line in profile.extra_sbatch:
        option, _, value = line[2:].partition("=")
        extra[option] = value if value else True
    if s.node_range == str(s.nodes):
        params["tasks_per_node"] = tasks
    else:
        # SLURM sizes an allocation with a node range by its task count: with --ntasks-per-node it
        # takes the range's minimum even when more nodes are free. Without it, the allocation takes
        # as many nodes of the range as are free (--mincpus: the CPUs of a node's tasks), and srun
        # starts the tasks on each (submitit's `nodes` is a count: the range goes in as is).
        extra.update(nodes=s.node_range, mincpus=s.gpus_per_node * s.cpus_per_task)
        params["slurm_srun_args"].append(f"--ntasks-per-node={tasks}")
    params["slurm_additional_parameters"] = extra  # always: submitit keeps a key not given again
    return params


def sbatch_test_args(params: dict[str, Any]) -> list[str]:
    """The same request as `sbatch --test-only` arguments: SLURM's own verdict before submitting."""
    args = [f"--nodes={params['nodes']}", f"--cpus-per-task={params['cpus_per_task']}",
            f"--time={params['timeout_min']}"]
    if "tasks_per_node" in params:
        args.append(f"--ntasks-per-node={params['tasks_per_node']}")
    if "gpus_per_node" in params:
        args.append(f"--gpus-per-node={params['gpus_per_node']}")
    if "mem_gb" in params:
        args.append(f"--mem={params['mem_gb']}G")
    for key in ("partition", "account", "qos", "constraint"):
        if f"slurm_{key}" in params:
            args.append(f"--{key}={params[f'slurm_{key}']}")
    if params.get("slurm_exclusive"):
        args.append("--exclusive")
    for option, value in params.get("slurm_additional_parameters", {}).items():
        args.append(f"--{option}" if value is True else f"--{option}={value}")
    return args
