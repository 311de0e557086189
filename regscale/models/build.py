"""Building our SiT from a size name or a `model` config section."""

from __future__ import annotations

import dataclasses
from typing import Any

from regscale.config import MODEL_SIZES, ConfigError, ModelConfig
from regscale.models.sit import SiT

_OPTIONS = {f.name for f in dataclasses.fields(ModelConfig)} - {"size"}


def _check(cfg: ModelConfig) -> dict[str, int]:
    """The resolved architecture, or a ConfigError naming the impossible key."""
    if cfg.size not in MODEL_SIZES:
        raise ConfigError(f"'model.size' must be one of {', '.join(MODEL_SIZES)}; got {cfg.size!r}")
    arch = cfg.resolved()
    if arch["hidden_size"] % arch["num_heads"]:
        raise ConfigError(f"'model.hidden_size' ({arch['hidden_size']}) must be divisible by 'model.num_heads' "
                          f"({arch['num_heads']})")
    if arch["hidden_size"] % 4:
        raise ConfigError(f"'model.hidden_size' ({arch['hidden_size']}) must be divisible by 4 (2-D sin-cos position embedding)")
    if not 1 <= arch["encoder_depth"] <= arch["depth"]:
        raise ConfigError(f"'model.encoder_depth' ({arch['encoder_depth']}) must be in [1, model.depth={arch['depth']}]")
    if cfg.input_size % arch["patch_size"]:
        raise ConfigError(f"'model.input_size' ({cfg.input_size}) must be divisible by 'model.patch_size' ({arch['patch_size']})")
    return arch


def build_model_from_config(cfg: ModelConfig) -> SiT:
    """Our SiT for a `model` config section (size plus any depth/width/heads overrides)."""
    arch = _check(cfg)
    return SiT(
        input_size=cfg.input_size,
        patch_size=arch["patch_size"],
        in_channels=cfg.in_channels,
        hidden_size=arch["hidden_size"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=cfg.mlp_ratio,
        encoder_depth=arch["encoder_depth"],
        num_classes=cfg.num_classes,
        projector_dim=cfg.projector_dim,
        cls_token_dim=cfg.cls_token_dim,
        qk_norm=cfg.qk_norm,
        fused_attn=cfg.fused_attn,
    )


def model_config(size: str = "XL/2", **options: Any) -> ModelConfig:
    """A ModelConfig from a size name and keyword overrides (any `model.*` key but size)."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigError(f"build_model: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTIONS))}")
    return ModelConfig(size=size, **options)


def build_model(size: str = "XL/2", **options: Any) -> SiT:
    """Our REG SiT of a published size ("S/2", "B/2", "L/2", "XL/2"), freshly initialised.

    Options are the `model.*` config keys: depth, hidden_size, num_heads, encoder_depth,
    patch_size, input_size, in_channels, num_classes, mlp_ratio, projector_dim, cls_token_dim,
    qk_norm, fused_attn. Build under `torch.device("meta")` to inspect a big size for free.
    """
    return build_model_from_config(model_config(size, **options))
