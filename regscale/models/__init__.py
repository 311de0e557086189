"""The REG SiT model, its frozen encoders (DINOv2, SD-VAE) and official checkpoint import.

Python API (stable):
    from regscale.models import build_model, load_official
    model = build_model("XL/2")                       # or build_model("S/2", depth=4, hidden_size=64, ...)
    model = load_official("REG_XL_4M.pt", size="XL/2")  # the `ema` weights of an official checkpoint
    v_img, zs, v_cls = model(x_t, t, y, cls_t)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regscale.models.build import build_model, build_model_from_config
    from regscale.models.official import export_official, load_official
    from regscale.models.sit import SiT

__all__ = ["SiT", "build_model", "build_model_from_config", "load_official", "export_official"]

# Lazy: `regscale.models.commands` is imported by the CLI, which must start without torch.
_WHERE = {"SiT": "sit", "build_model": "build", "build_model_from_config": "build",
          "load_official": "official", "export_official": "official"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'regscale.models' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"regscale.models.{_WHERE[name]}"), name)
