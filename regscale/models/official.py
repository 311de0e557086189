"""Import and export of the official REG checkpoints (their `SiT` state dict / the `ema` entry of their .pt).

Our parameter names follow upstream except for three renames (below); shapes must match the chosen
size exactly, otherwise one error says what the checkpoint holds and what the size expects.
Upstream's S/2 has a 768-wide final layer (a bug); such a checkpoint does not fit our S/2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch

from regscale.config import MODEL_SIZES
from regscale.errors import UserError, first_line
from regscale.fsutil import atomic_path

if TYPE_CHECKING:
    from regscale.models.sit import SiT

# ours -> official, by name prefix
RENAMES = {
    "y_embedder.weight": "y_embedder.embedding_table.weight",
    "cls_embed.": "cls_projectors2.",
    "cls_norm.": "wg_norm.",
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def to_official_key(key: str) -> str:
    """Our parameter name -> the official REG name."""
    for ours, theirs in RENAMES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def from_official_key(key: str) -> str:
    """The official REG parameter name -> ours."""
    for ours, theirs in RENAMES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def _read(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"official checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # upstream stores its args
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of all kinds: name the file
        raise UserError(f"{path}: not a readable torch checkpoint ({first_line(err, 200)})") from None


def _select(obj: Mapping[str, Any], entry: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint: obj[entry] when obj is a training .pt."""
    if entry in obj and isinstance(obj[entry], Mapping):
        obj = obj[entry]
    elif any(isinstance(v, Mapping) for v in obj.values()):
        raise UserError(f"{source}: no '{entry}' entry (has: {', '.join(map(str, obj))})")
    state = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _shape_facts(state: Mapping[str, torch.Tensor]) -> tuple[int, Optional[int], Optional[int]]:
    """(depth, hidden width, final layer width) read off an official state dict's shapes."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = state["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in state else None
    final = state["final_layer.linear.weight"].shape[1] if "final_layer.linear.weight" in state else None
    return depth, hidden, final


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    depth, hidden, final = _shape_facts(state)
    return f"depth {depth}, hidden {hidden}, final layer width {final}"


def _infer_size(state: Mapping[str, torch.Tensor], source: str) -> str:
    depth, hidden, _ = _shape_facts(state)
    for name, arch in MODEL_SIZES.items():
        if arch["depth"] == depth and arch["hidden_size"] == hidden:
            return name
    raise UserError(f"{source}: {_describe(state)} matches no published size; pass size= and the overrides")


def load_official(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]], size: Optional[str] = "XL/2",
                  *, entry: str = "ema", **options: Any) -> "SiT":
    """Our SiT holding the weights of an official REG checkpoint.

    path_or_state_dict: an upstream .pt (its `entry`, default "ema", is used), a .safetensors
    file, or a state dict in upstream names. size=None infers the published size from shapes.
    options: the same overrides `build_model` takes (they must match the checkpoint too).
    """
    from regscale.models.build import build_model

    if isinstance(path_or_state_dict, Mapping):
        source = "state dict"
        state = _select(path_or_state_dict, entry, source)
    else:
        source = str(path_or_state_dict)
        state = _select(_read(Path(path_or_state_dict)), entry, source)
    if size is None:
        size = _infer_size(state, source)
    if "num_classes" not in options and "y_embedder.embedding_table.weight" in state:
        options["num_classes"] = state["y_embedder.embedding_table.weight"].shape[0] - 1
    if "qk_norm" not in options:
        options["qk_norm"] = any(".attn.q_norm." in k for k in state)
    with torch.device("meta"):  # shapes only: a mismatch costs nothing to find
        expected = {to_official_key(k): v for k, v in build_model(size, **options).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        details = []
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} vs "
                           f"{tuple(expected[k].shape)}")
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise UserError(f"{source}: does not fit size {size} ({'; '.join(details)}); the checkpoint has "
                        f"{_describe(state)}, size {size} expects {_describe(expected)}")
    model = build_model(size, **options)
    model.load_state_dict({from_official_key(k): v for k, v in state.items()}, strict=True)
    return model


def export_official(model: torch.nn.Module, path: Optional[Union[str, os.PathLike]] = None) -> dict[str, torch.Tensor]:
    """Our model's weights in official REG names; with `path`, also written as {"ema": ..., "model": ...}.

    Loads into upstream's `SiT` (same size; their S/2 needs decoder_hidden_size=384).
    """
    state = {to_official_key(k): v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save({"ema": state, "model": state}, tmp)
    return state
