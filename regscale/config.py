"""The typed run configuration: defaults <- recipe YAML <- dotlist overrides, validated, hashed.

Every section is a dataclass; OmegaConf merges a recipe and `key=value` overrides onto it and
checks keys and types. `validate` then refuses impossible values with the reason. All errors
raise `ConfigError`, whose message names the offending key or file; the CLI prints it and exits 2.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException,
                              ValidationError)

from regscale.errors import UserError, first_line, has_control_character


class ConfigError(UserError):
    """A recipe, override or value that cannot be run; the message says which and why."""


# Published SiT sizes: depth, hidden width, heads, patch. Encoder depth (1-based block whose output
# feeds the REPA projector) follows REG_SPEC: 4 for S and B, 8 for L and XL.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, encoder_depth=4),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, encoder_depth=4),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2, encoder_depth=8),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, encoder_depth=8),
}

ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")

CKPT_AUTO = "auto"  # train.ckpt_every: the interval regscale.reliability chooses

REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "az://", "hf://", "sftp://", "dbfs:/")

# Where each object store's client (streaming's) finds its credentials.
STORE_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login, or GCS_KEY + GCS_SECRET",
    "oci": "~/.oci/config",
    "azure": "AZURE_ACCOUNT_NAME + AZURE_ACCOUNT_ACCESS_KEY",
    "az": "AZURE_ACCOUNT_NAME + AZURE_ACCOUNT_ACCESS_KEY",
    "hf": "HF_TOKEN",
    "sftp": "SFTP_USERNAME + SFTP_PASSWORD or an SSH key",
}
MLFLOW_CREDENTIALS = "MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


@dataclass
class ModelConfig:
    """SiT + REG class token + REPA projector. depth/hidden_size/num_heads/encoder_depth
    override the published size when set (the smoke recipe uses a tiny custom width)."""

    size: str = "XL/2"
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    encoder_depth: Optional[int] = None
    patch_size: Optional[int] = None
    input_size: int = 32  # latent side: 256 px / 8
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    projector_dim: int = 2048
    cls_token_dim: int = 768  # DINOv2 ViT-B/14 width: the class token and REPA targets
    qk_norm: bool = False
    fused_attn: bool = True

    def resolved(self) -> dict[str, int]:
        """Depth, width, heads, patch and encoder depth after applying overrides to the size."""
        base = dict(MODEL_SIZES[self.size])
        for key in base:
            value = getattr(self, key)
            if value is not None:
                base[key] = value
        return base

    def check(self) -> None:
        """Refuse values this section cannot run with."""
        _choice("model.size", self.size, tuple(MODEL_SIZES))
        arch = self.resolved()
        for key in ("depth", "hidden_size", "num_heads", "patch_size", "encoder_depth"):
            _positive(f"model.{key}", arch[key])
        if arch["hidden_size"] % arch["num_heads"]:
            raise ConfigError(f"'model.hidden_size' ({arch['hidden_size']}) must be divisible by "
                              f"'model.num_heads' ({arch['num_heads']})")
        if arch["encoder_depth"] > arch["depth"]:
            raise ConfigError(f"'model.encoder_depth' ({arch['encoder_depth']}) must be <= "
                              f"'model.depth' ({arch['depth']}): the projector reads that block's output")
        if self.input_size % arch["patch_size"]:
            raise ConfigError(f"'model.input_size' ({self.input_size}) must be divisible by "
                              f"'model.patch_size' ({arch['patch_size']})")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"'model.class_dropout_prob' must be in [0, 1); got {self.class_dropout_prob}")
        for key in ("num_classes", "in_channels", "input_size", "projector_dim", "cls_token_dim", "mlp_ratio"):
            _positive(f"model.{key}", getattr(self, key))


@dataclass
class EncoderConfig:
    """Frozen representation encoder (DINOv2 ViT-B/14, no registers, via timm)."""

    name: str = "vit_base_patch14_dinov2"
    weights: Optional[str] = None  # local file/folder; None: the timm / Hugging Face cache
    random_init: bool = False  # smoke and tests only: no pretrained weights, results meaningless
    random_depth: int = 2  # random_init only: blocks of the small encoder (width: model.cls_token_dim)
    resolution: int = 224

    def check(self) -> None:
        _positive("encoder.random_depth", self.random_depth)
        if self.resolution <= 0 or self.resolution % 14:
            raise ConfigError(f"'encoder.resolution' must be a positive multiple of 14 (DINOv2's patch); "
                              f"got {self.resolution}")


@dataclass
class VAEConfig:
    """SD-VAE through diffusers: sd-vae-ft-mse encodes the data, sd-vae-ft-ema decodes samples."""

    encoder: str = "stabilityai/sd-vae-ft-mse"  # HF repo id in the local cache, or a local folder
    decoder: str = "stabilityai/sd-vae-ft-ema"
    scale: float = 0.18215
    random_init: bool = False  # smoke and tests only: a tiny randomly initialised AutoencoderKL

    def check(self) -> None:
        _positive("vae.scale", self.scale)


@dataclass
class TrainConfig:
    """Optimisation and loop. batch_size is global, whatever the number of GPUs."""

    batch_size: int = 256
    micro_batch_size: Optional[int] = None  # per GPU; None: batch_size / world (no accumulation)
    max_steps: int = 400_000
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ckpt_every: Union[int, str] = 10_000  # steps, or "auto": Young/Daly from the measured save cost
    keep_last: int = 2  # newest checkpoints kept
    keep_every: int = 100_000  # and every Nth step kept for evaluation (0: none)
    log_every: int = 100
    sample_every: int = 10_000  # sample grid to MLflow (0: never)
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    tf32: bool = True
    max_nonfinite_steps: int = 10  # consecutive skipped steps before rolling back (bf16, fp32)
    # fp16: a loss scale below min_loss_scale for max_low_scale_steps steps in a row has collapsed:
    # the run checkpoints and stops (below 1 the scale shrinks gradients instead of guarding them
    # from underflow; 0 never stops)
    min_loss_scale: float = 1.0
    max_low_scale_steps: int = 100
    # a rank silent for max(hang_timeout_s, 10 x p99 step time) is hung: its node's agent dumps every
    # rank's stack into the run directory and restarts the group (0: no hang detection)
    hang_timeout_s: float = 60.0
    first_step_timeout_s: float = 1800.0  # the same bound before a process's first step (build, data, compile)
    straggler_factor: float = 1.2  # a rank whose step is this much slower than the others' lags...
    straggler_windows: int = 3  # ...in this many log windows in a row: named in the log, MLflow, status

    def check(self) -> None:
        """Refuse values this section cannot run with (the batch against the world: `batch_plan`)."""
        _positive("train.batch_size", self.batch_size)
        if self.micro_batch_size is not None:
            _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.max_steps", self.max_steps)
        _positive("train.lr", self.lr)
        _positive("train.eps", self.eps)
        _seed("train.seed", self.seed)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"'train.betas' must be two numbers in [0, 1); got {list(self.betas)}")
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"'train.ema_decay' must be in [0, 1); got {self.ema_decay}")
        if self.ckpt_every != CKPT_AUTO and (isinstance(self.ckpt_every, str) or self.ckpt_every <= 0):
            raise ConfigError(f"'train.ckpt_every' must be a positive number of steps or {CKPT_AUTO}; "
                              f"got {self.ckpt_every!r}")
        _positive("train.keep_last", self.keep_last)
        _positive("train.keep_every", self.keep_every, allow_zero=True)
        _positive("train.log_every", self.log_every)
        _positive("train.sample_every", self.sample_every, allow_zero=True)
        _choice("train.precision", self.precision, ("bf16", "fp16", "fp32"))
        _positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        _positive("train.hang_timeout_s", self.hang_timeout_s, allow_zero=True)
        _positive("train.first_step_timeout_s", self.first_step_timeout_s)
        if not self.straggler_factor > 1.0:
            raise ConfigError(f"'train.straggler_factor' must be > 1 (a step time ratio); got {self.straggler_factor}")
        _positive("train.straggler_windows", self.straggler_windows)
        _positive("train.min_loss_scale", self.min_loss_scale, allow_zero=True)
        _positive("train.max_low_scale_steps", self.max_low_scale_steps)


@dataclass
class LossConfig:
    """L = L_img + proj_coeff * L_proj + cls_coeff * L_cls."""

    proj_coeff: float = 0.5
    cls_coeff: float = 0.03
    time_sampling: str = "uniform"  # uniform | lognormal

    def check(self) -> None:
        _choice("loss.time_sampling", self.time_sampling, ("uniform", "lognormal"))
        _positive("loss.proj_coeff", self.proj_coeff, allow_zero=True)
        _positive("loss.cls_coeff", self.cls_coeff, allow_zero=True)


@dataclass
class DataConfig:
    """MDS shards of (image, VAE moments, label), local or remote."""

    path: Optional[str] = None  # local directory or remote URI (s3://, gs://, ...)
    local_cache: Optional[str] = None  # where remote shards are cached (one per host); None: a temp dir
    cache_limit: Optional[str] = None  # bound on that cache ("50gb", "800mb", bytes); None: unbounded
    download_retry_s: float = 600.0  # a failing shard download is retried (backoff) this long, then training stops
    num_workers: int = 4
    shuffle: bool = True
    shuffle_block_size: Optional[int] = None
    synthetic: int = 0  # > 0: generate this many images + shards at data.path first (smoke only)

    def check(self) -> None:
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.synthetic", self.synthetic, allow_zero=True)
        _positive("data.download_retry_s", self.download_retry_s, allow_zero=True)
        if self.shuffle_block_size is not None:
            _positive("data.shuffle_block_size", self.shuffle_block_size)
        if self.cache_limit is not None:
            parse_size(self.cache_limit, "'data.cache_limit'")

    @property
    def cache_limit_bytes(self) -> Optional[int]:
        """data.cache_limit in bytes (None: unbounded)."""
        return None if self.cache_limit is None else parse_size(self.cache_limit, "'data.cache_limit'")


@dataclass
class EngineConfig:
    """How the plain model is parallelised, compiled and checkpointed."""

    kind: str = "fsdp"  # fsdp | deepspeed
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed only
    compile: bool = False
    activation_checkpointing: bool = False
    async_checkpoint: bool = True
    adamw: str = "fused"  # torch AdamW's implementation: fused | foreach | for-loop (bench/device_check.py)

    def check(self) -> None:
        _choice("engine.kind", self.kind, ("fsdp", "deepspeed"))
        _choice("engine.adamw", self.adamw, ADAMW_IMPLEMENTATIONS)
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"'engine.zero_stage' must be 1, 2 or 3; got {self.zero_stage}")
        if self.offload_optimizer and self.kind != "deepspeed":
            raise ConfigError("'engine.offload_optimizer' needs engine.kind=deepspeed")


@dataclass
class SlurmConfig:
    """Where and how the job runs. profile names slurm/<profile>.yaml (or a path to one)."""

    cluster: str = "auto"  # auto | slurm | local
    profile: str = "default"
    nodes: int = 1
    min_nodes: Optional[int] = None  # a job may (re)start on as few nodes as this, when no more are free
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_limit_min: int = 2880
    signal_lead_s: int = 300  # SIGUSR2 this long before the limit: one step + a checkpoint save
    max_requeues: int = 50
    max_restarts: int = 3  # in-job restarts of a failed or hung group, per job start (no trip through the queue)
    max_failures_at_step: int = 3  # attempts in a row failing from one checkpoint before the run stops
    # mean time between failures of one node, for train.ckpt_every=auto and the plan's expected
    # ratio: 6.50 failures per 1000 node-days, Meta's RSC-1 (arXiv 2410.21680) -> 24000/6.5 h
    node_mtbf_h: float = 3692.0

    def check(self) -> None:
        _choice("slurm.cluster", self.cluster, ("auto", "slurm", "local"))
        for key in ("nodes", "gpus_per_node", "cpus_per_task", "time_limit_min"):
            _positive(f"slurm.{key}", getattr(self, key))
        _positive("slurm.signal_lead_s", self.signal_lead_s, allow_zero=True)
        _positive("slurm.max_requeues", self.max_requeues, allow_zero=True)
        _positive("slurm.max_restarts", self.max_restarts, allow_zero=True)
        _positive("slurm.max_failures_at_step", self.max_failures_at_step)
        _positive("slurm.node_mtbf_h", self.node_mtbf_h)
        if self.mem_gb is not None:
            _positive("slurm.mem_gb", self.mem_gb)
        if self.signal_lead_s >= self.time_limit_min * 60:
            raise ConfigError(f"'slurm.signal_lead_s' ({self.signal_lead_s}) must be shorter than the "
                              f"time limit ({self.time_limit_min} min)")
        if self.min_nodes is not None and not 0 < self.min_nodes <= self.nodes:
            raise ConfigError(f"'slurm.min_nodes' must be in [1, slurm.nodes={self.nodes}]; "
                              f"got {self.min_nodes}")

    @property
    def node_counts(self) -> range:
        """The numbers of nodes the training job may run on: min_nodes..nodes."""
        return range(self.min_nodes or self.nodes, self.nodes + 1)

    @property
    def node_range(self) -> str:
        """sbatch's --nodes: 'N', or 'MIN-N' when the job may start on fewer nodes."""
        low = self.node_counts.start
        return f"{low}-{self.nodes}" if low < self.nodes else str(self.nodes)


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # None: sqlite:///<run.dir>/mlflow.db
    experiment: str = "regscale"

    def check(self) -> None:
        if self.tracking_uri is not None:
            check_tracking_uri(self.tracking_uri, "'mlflow.tracking_uri'")


@dataclass
class EvalConfig:
    """Sampling and ADM-protocol evaluation (defaults: the published XL/2 4M setting)."""

    num_samples: int = 50_000
    batch_size: int = 125  # per GPU
    sampler: str = "sde"  # sde (Euler-Maruyama, published) | ode (Heun)
    steps: int = 250
    cfg_scale: float = 1.0
    cls_cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    labels: str = "uniform"  # uniform | balanced
    seed: int = 0
    precision: str = "fp32"  # the model while sampling: fp32 (published) | bf16 (autocast)
    compile: bool = False  # torch.compile the model for sampling
    pr_distances: str = "float16"  # precision/recall distances: float16 (ADM) | float32
    ref_batch: Optional[str] = None  # VIRTUAL_imagenet256_labeled.npz
    inception: Optional[str] = None  # TF-ported Inception weights; None: the torch-fidelity cache
    random_inception: bool = False  # smoke only: metrics are tagged as not comparable
    at_steps: list[int] = field(default_factory=list)  # intermediate evaluations during training

    def check(self) -> None:
        """Refuse values this section cannot run with (at_steps against training: `validate`)."""
        _positive("eval.num_samples", self.num_samples)
        _positive("eval.batch_size", self.batch_size)
        _seed("eval.seed", self.seed)
        _choice("eval.sampler", self.sampler, ("sde", "ode"))
        if self.steps < 2:
            raise ConfigError(f"'eval.steps' must be >= 2; got {self.steps}")
        for key in ("cfg_scale", "cls_cfg_scale"):
            _positive(f"eval.{key}", getattr(self, key), allow_zero=True)
        for key in ("guidance_low", "guidance_high"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"'eval.{key}' must be in [0, 1] (a time on the interpolant); got {value}")
        if self.guidance_low > self.guidance_high:
            raise ConfigError(f"'eval.guidance_low' ({self.guidance_low}) must be <= 'eval.guidance_high' "
                              f"({self.guidance_high})")
        _choice("eval.labels", self.labels, ("uniform", "balanced"))
        _choice("eval.precision", self.precision, ("fp32", "bf16"))
        _choice("eval.pr_distances", self.pr_distances, ("float16", "float32"))


@dataclass
class RunConfig:
    name: Optional[str] = None  # None: the recipe's file name
    dir: str = "runs"  # run directories live in <dir>/<name>

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"'run.name' must be a plain directory name; got {self.name!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def world_size(self) -> int:
        """GPUs (processes) the job asks for."""
        return self.slurm.nodes * self.slurm.gpus_per_node


# ---------------------------------------------------------------------------------------------
# loading and merging


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        value = getattr(node, f.name)
        name = f"{prefix}{f.name}"
        keys.append(name)
        if is_dataclass(value):
            keys += _valid_keys(value, name + ".")
    return keys


def _closest(key: str) -> str:
    """' (did you mean: ...?)' naming valid keys close to an unknown one, or ''."""
    valid = _valid_keys(Config())
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not near:  # a right leaf in the wrong section, or a typo in the leaf alone
        leaf = key.rsplit(".", 1)[-1]
        by_leaf: dict[str, list[str]] = {}
        for v in valid:
            by_leaf.setdefault(v.rsplit(".", 1)[-1], []).append(v)
        for match in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6):
            near += by_leaf[match]
    return f" (did you mean: {', '.join(near[:3])}?)" if near else ""


def _expected_type(key: str) -> str:
    node: Any = Config()
    for part in key.split("."):
        if not is_dataclass(node):
            return "?"
        hints = {f.name: f.type for f in fields(node)}
        if part not in hints:
            return "?"
        last_type = hints[part]
        node = getattr(node, part)
    return str(last_type).replace("typing.", "").replace("Union[int, str]", "int or str")


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, InterpolationResolutionError):
        return ConfigError(f"{source}: '{key}' cannot be resolved: {first_line(err)}")
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        return ConfigError(f"{source}: unknown key '{key}'{_closest(key)}")
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None) if hasattr(err, "value") else None
        msg = first_line(err)
        return ConfigError(
            f"{source}: '{key}' expects {_expected_type(key)}"
            + (f", got {value!r}" if value is not None else "")
            + f" ({msg})"
        )
    return ConfigError(f"{source}: {first_line(err)}")


def _read_yaml_file(path: Path, what: str) -> str:
    """The text of a YAML file; a ConfigError naming it when it is absent or unreadable."""
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (expected a {what})")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err})") from None


def _load_yaml(path: Path) -> DictConfig:
    return _parse_yaml(_read_yaml_file(path, "recipe file"), str(path))


def _parse_yaml(text: str, source: str) -> DictConfig:
    """A YAML mapping of sections; anything else (a syntax error, a scalar, a list, nothing) is a
    ConfigError naming `source`."""
    try:
        top = yaml.safe_load(text)
        loaded = OmegaConf.create(text) if isinstance(top, dict) else None
    except Exception as err:  # yaml.YAMLError and friends: name the file, keep the parser's line
        raise ConfigError(f"{source}: not valid YAML: {first_line(err)}") from None
    if top is None:
        raise ConfigError(f"{source}: empty (no sections); expected a mapping of sections such as train:, model:")
    if loaded is None:
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(top).__name__}")
    return loaded


BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _check_bool(key: str, value: Any, source: str) -> None:
    """A bool key holds a bool or one of BOOL_WORDS: OmegaConf would read any other number (2, -1)
    as true, silently."""
    text = str(value).strip()
    if isinstance(value, bool) or text.lower() in BOOL_WORDS or text.startswith("${"):
        return
    raise ConfigError(f"{source}: '{key}' is a bool (true or false); got {text!r}")


def _check_sections(node: DictConfig, schema: Any, source: str, prefix: str = "") -> None:
    """A section given as something other than a mapping, or a bool key given another value: name
    it before OmegaConf's merge does not."""
    for key, value in node.items_ex(resolve=False):
        if f"{prefix}{key}" in RETIRED_KEYS:
            raise ConfigError(f"{source}: '{prefix}{key}' was retired; use {RETIRED_KEYS[f'{prefix}{key}']}")
        sub = getattr(schema, str(key), None)
        if isinstance(sub, bool):
            _check_bool(f"{prefix}{key}", value, source)
        if is_dataclass(sub):
            if not isinstance(value, DictConfig):
                raise ConfigError(f"{source}: '{prefix}{key}' is a section and must be a mapping of "
                                  f"keys, got {type(value).__name__}: {value}")
            _check_sections(value, sub, source, f"{prefix}{key}.")


def _check_override(item: str) -> None:
    """One `key=value` as text: a dotted key the schema knows, a value that is there, no control
    character (refused, never cut or folded), a mapping for a whole section."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not key=value (for example train.lr=2e-4)")
    if has_control_character(item):
        raise ConfigError(f"override '{key}': the value {value!r} holds a control character (a newline, a tab, ...)")
    if not all(part.strip() == part and part for part in key.split(".")):
        raise ConfigError(f"override '{item}': '{key}' is not a dotted key like train.lr")
    if key in RETIRED_KEYS:
        raise ConfigError(f"override: '{key}' was retired; use {RETIRED_KEYS[key]}")
    if key not in _valid_keys(Config()):
        raise ConfigError(f"override: unknown key '{key}'{_closest(key)}")
    if not value.strip():
        raise ConfigError(f"override '{item}': no value for '{key}' (write {key}=null to unset it)")
    node = _schema_node(key)
    if isinstance(node, bool):
        _check_bool(key, value, f"override '{item}'")
    if is_dataclass(node) and not value.lstrip().startswith("{"):
        raise ConfigError(f"override '{item}': '{key}' is a section; set its keys ({key}.KEY=VALUE)")


def _schema_node(key: str) -> Any:
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _apply_overrides(merged: DictConfig, overrides: list[str]) -> DictConfig:
    """`merged` with every override applied in order; an error names the override."""
    for item in overrides:
        _check_override(item)
    for item in overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
        except Exception as err:  # YAML's errors on the value: name the override
            raise ConfigError(f"override '{item}': {first_line(err)}") from None
    return merged


def _resolve(recipe: Optional[DictConfig], source: str, overrides: list[str], default_name: Optional[str]
             ) -> Config:
    """defaults <- recipe <- overrides, interpolations resolved, every value validated."""
    merged = OmegaConf.structured(Config)
    if recipe is not None:
        _check_sections(recipe, Config(), source)
        try:
            merged = OmegaConf.merge(merged, recipe)
        except OmegaConfBaseException as err:
            raise _explain(err, source) from None
    try:
        merged = _apply_overrides(merged, list(overrides))
        if default_name is not None and merged.run.name is None:
            merged.run.name = default_name
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err, f"{source} + overrides" if overrides else source) from None
    validate(cfg)
    return cfg


def load_config(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Merge defaults <- recipe <- overrides into a validated `Config` (a frozen typed object)."""
    if recipe is None:
        return _resolve(None, "defaults", list(overrides), None)
    path = Path(recipe)
    return _resolve(_load_yaml(path), str(path), list(overrides), path.stem)


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML, keys in schema order."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """A short stable hash of the resolved configuration."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:12]


def load_saved_config(path: Path) -> Config:
    """The resolved configuration saved by `to_yaml` in a file (a run directory's config.yaml)."""
    return from_yaml_text(_read_yaml_file(path, "saved configuration"), str(path))


def from_yaml_text(text: str, source: str = "saved config", overrides: list[str] = ()) -> Config:
    """Load a resolved configuration saved by `to_yaml` (a run directory's config.yaml, an
    export's metadata), with overrides; `source` names it in errors. Retired keys are dropped."""
    saved = _parse_yaml(text, source)
    for key in RETIRED_KEYS:
        section, _, leaf = key.rpartition(".")
        node = OmegaConf.select(saved, section)
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    return _resolve(saved, source, list(overrides), None)


def flatten(cfg: Config) -> dict[str, Any]:
    """`a.b.c -> value` for every leaf (MLflow params, recipe diffs)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


# ---------------------------------------------------------------------------------------------
# validation of values


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"'{key}' must be one of {', '.join(map(str, options))}; got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def _seed(key: str, value: int) -> None:
    if not 0 <= value < 2**31:
        raise ConfigError(f"'{key}' must be in [0, 2^31); got {value}")


def parse_size(text: Any, what: str) -> int:
    """A size in bytes from an integer or a number with a unit (b, kb, mb, gb, tb; powers of 1024,
    as streaming counts): "50gb", "1.5tb", "800mb", "1048576"."""
    spec = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if spec.endswith(u)), "b")
    number = spec[:-len(unit)] if spec.endswith(unit) else spec
    try:
        size = float(number)
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size <= 0 or (unit == "b" and not size.is_integer()):
        raise ConfigError(f"{what} must be a size such as 50gb, 800mb or a number of bytes; got {text!r}")
    return int(size * SIZE_UNITS[unit])


def embedded_credentials(text: str) -> Optional[str]:
    """`text` with the secret masked when it is a URI that carries credentials (a password in
    scheme://user:password@host, or any user part of an object store's URI: its access key); None
    when it carries none."""
    from urllib.parse import urlsplit

    if "://" not in text:
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if "@" not in parts.netloc:
        return None
    user, _, password = parts.netloc.rpartition("@")[0].partition(":")
    if not password and not is_remote(text):
        return None  # a user name alone is no secret
    masked = "***" if is_remote(text) else f"{user}:***"  # an object store's user part is its key id
    return text.replace(parts.netloc, f"{masked}@{parts.netloc.rpartition('@')[2]}", 1)


def check_no_credentials(text: str, what: str) -> None:
    """Refuse a URI that embeds credentials (they would be written into configs, checkpoints,
    MLflow and logs), naming the variables that carry them instead."""
    masked = embedded_credentials(text)
    if masked is None:
        return
    scheme = text.split("://", 1)[0].lower()
    where = STORE_CREDENTIALS.get(scheme, MLFLOW_CREDENTIALS if scheme.startswith("http") else None)
    hint = f"set {where} in the environment instead" if where else "pass them through the environment instead"
    raise ConfigError(f"{what} {masked!r} holds credentials; they would be written down (config, checkpoints, "
                      f"MLflow, logs): remove them from the URI and {hint}")


def _check_leaves(cfg: Config) -> None:
    """What no key may hold: a non-finite number, an empty string, a control character (a newline
    would be cut in a batch script or a log line, so it is refused rather than passed on), a URI
    with credentials."""
    for key, value in flatten(cfg).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (list, dict)):
                raise ConfigError(f"'{key}' must be a list of numbers; got {value}")
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"'{key}' must be a finite number; got {value}")
            if isinstance(item, str) and (not item or has_control_character(item)):
                raise ConfigError(f"'{key}' must be a non-empty string without control characters "
                                  f"(newlines, tabs, ...); got {item!r}")
            if isinstance(item, str):
                check_no_credentials(item, f"'{key}'")
            if isinstance(item, str) and is_remote(item) and not item.partition(":/")[2].strip("/"):
                raise ConfigError(f"'{key}' {item!r}: a remote URI needs a bucket or host and a path")


TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")


def check_tracking_uri(uri: str, what: str) -> None:
    """An MLflow tracking URI that MLflow can use: a known scheme, a host and a port in range, no
    credentials in it."""
    from urllib.parse import urlsplit

    check_no_credentials(uri, what)
    try:
        parts = urlsplit(uri)
    except ValueError as err:  # an unclosed [IPv6] host
        raise ConfigError(f"{what} {uri!r}: {err}") from None
    scheme = parts.scheme.split("+", 1)[0]  # postgresql+psycopg2://...
    if "://" not in uri or scheme not in TRACKING_SCHEMES:
        if "://" in uri or ":" in uri.split("/", 1)[0]:
            raise ConfigError(f"{what} {uri!r}: unknown scheme (expected one of "
                              f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a local path)")
        return  # a local path: MLflow's file store
    try:
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"{what} {uri!r}: {err}") from None
    if scheme in ("http", "https") and (not parts.hostname or port == 0):
        raise ConfigError(f"{what} {uri!r}: expected http(s)://HOST[:PORT] with a port in 1..65535")
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or not uri[len("sqlite:///"):].strip("/")):
        raise ConfigError(f"{what} {uri!r}: expected sqlite:///PATH/TO/mlflow.db")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def validate(cfg: Config) -> None:
    """Refuse values that cannot run, naming the key and the reason: each section's own checks,
    then the ones across sections."""
    _check_leaves(cfg)
    for section in (cfg.model, cfg.encoder, cfg.vae, cfg.train, cfg.loss, cfg.data, cfg.engine, cfg.slurm,
                    cfg.mlflow, cfg.eval, cfg.run):
        section.check()
    s = cfg.slurm
    for nodes in s.node_counts:  # every world size the job may get must keep the global batch
        world = nodes * s.gpus_per_node
        source = "slurm.nodes" if nodes == s.nodes else "slurm.min_nodes..slurm.nodes allows"
        batch_plan(cfg.train, world, f"{world} = {source} {nodes} x slurm.gpus_per_node {s.gpus_per_node}")
    for step in cfg.eval.at_steps:
        if not 0 < step <= cfg.train.max_steps:
            raise ConfigError(f"'eval.at_steps' entry {step} is outside (0, train.max_steps="
                              f"{cfg.train.max_steps}]")


@dataclass(frozen=True)
class BatchPlan:
    """Global batch = world_size x micro_batch x accumulation, whatever the world size."""

    global_batch: int
    per_rank: int
    micro: int
    accumulation: int


def batch_plan(train: TrainConfig, world_size: int, world: str = "") -> BatchPlan:
    """Per-GPU batch and gradient accumulation that keep `train.batch_size` global over
    `world_size` processes (`world` says where that number comes from, for the error)."""
    total = train.batch_size
    world = world or f"{world_size} processes"
    if total % world_size:
        raise ConfigError(f"'train.batch_size' ({total}) must be divisible by the world size ({world})")
    per_rank = total // world_size
    micro = train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"'train.micro_batch_size' ({micro}) must divide the per-GPU batch "
                          f"({per_rank} = {total} / {world_size} GPUs)")
    return BatchPlan(global_batch=total, per_rank=per_rank, micro=micro, accumulation=per_rank // micro)


# ---------------------------------------------------------------------------------------------
# what may change when a run resumes


# How and where a run executes, how long, how often it logs and saves: these may change when a
# run is resumed (`regscale resume k=v`, a new recipe for the same run.name). Every other key
# defines the experiment: changing it on resume is refused, tracked or not. A trailing "." names
# a whole section.
RESUMABLE_KEYS = (
    "slurm.", "engine.", "mlflow.", "eval.", "run.dir",
    "data.path", "data.local_cache", "data.cache_limit", "data.download_retry_s", "data.num_workers",
    "encoder.weights", "vae.encoder", "vae.decoder",
    "train.max_steps", "train.micro_batch_size", "train.ckpt_every", "train.keep_last",
    "train.keep_every", "train.log_every", "train.sample_every", "train.max_nonfinite_steps",
    "train.min_loss_scale", "train.max_low_scale_steps", "train.tf32", "train.hang_timeout_s",
    "train.first_step_timeout_s", "train.straggler_factor", "train.straggler_windows",
)

# Keys of earlier versions: dropped from saved configurations (old run directories still load),
# refused with their replacement anywhere else.
RETIRED_KEYS = {"train.watchdog_s": "train.hang_timeout_s and train.first_step_timeout_s (a hung rank is "
                                    "detected and restarted by its node's agent)"}


# The resumable keys that can change the numbers a step computes: a resume that changes one is
# not bit-exact (slurm.cpus_per_task counts through the pinned thread count, the world size
# through resharding; the others only change where, how long and how often).
NUMERIC_KEYS = ("engine.", "train.micro_batch_size", "train.tf32", "encoder.weights")


def _listed(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def resumable(key: str) -> bool:
    """True when `key` may change on resume (see RESUMABLE_KEYS)."""
    return _listed(key, RESUMABLE_KEYS)


def changes_numbers(key: str) -> bool:
    """True when a change of `key` on resume can change the numbers a step computes (NUMERIC_KEYS)."""
    return _listed(key, NUMERIC_KEYS)


def resume_changes(before: dict[str, Any], now: dict[str, Any], where: str) -> dict[str, str]:
    """The keys whose value changed between a run's first configuration and this one (flattened,
    compared as strings), as {key: new value}. Raises ConfigError naming every key that defines the
    experiment and changed."""
    changed = {k: str(v) for k, v in now.items() if k in before and str(before[k]) != str(v)}
    refused = sorted(k for k in changed if not resumable(k))
    if refused:
        detail = "; ".join(f"'{k}' was {str(before[k])!r}, now {changed[k]!r}" for k in refused)
        raise ConfigError(f"{where}: resuming would change what defines the experiment: {detail}. "
                          "Start a new run (another run.name) to change them.")
    return changed


def check_paths_for_training(cfg: Config) -> None:
    """Files the training job needs, checked before anything is submitted."""
    path = cfg.data.path
    if path is None:
        raise ConfigError("'data.path' is required to train: a directory of MDS shards or a remote "
                          "URI (s3://, gs://, ...); see `regscale prepare`")
    if not cfg.data.synthetic and not is_remote(path):
        if not Path(path).is_dir():
            raise ConfigError(f"'data.path' does not exist: {path} (expected a directory of MDS "
                              "shards with index.json; see `regscale prepare`)")
        if not (Path(path) / "index.json").is_file():
            raise ConfigError(f"'data.path' has no index.json: {path} (expected MDS shards "
                              "written by `regscale prepare`)")
    for key in ("encoder.weights", "eval.ref_batch", "eval.inception"):
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value is not None and not is_remote(value) and not Path(value).exists():
            raise ConfigError(f"'{key}' does not exist: {value}")
