"""The evaluator's network: InceptionV3 with the TF 2015-12-05 weights (torch-fidelity's port).

One forward gives what the ADM evaluator reads off its TF graph: pool_3 (2048, FID and
precision/recall), mixed_6/conv (sFID: `Mixed_6d.branch1x1`, first 7 channels, HWC) and the
bias-free logits (1008, Inception Score). The TF-1 bilinear resize to 299 and the (x-128)/128
scaling happen inside torch-fidelity's module, as in the TF graph.

Weights are never downloaded here: `eval.inception` names the file, else torch-fidelity's cache
file under `torch.hub.get_dir()/checkpoints/`. A randomly initialised network (smoke recipe
only, `eval.random_inception=true`) gives numbers that are comparable to nothing.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from regscale.errors import UserError, first_line
from regscale.eval.metrics import exact_float32, spatial_features

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 17 * 17 * 7, 1008


class MissingInceptionWeights(UserError):
    """The TF-ported Inception weights are not on this machine."""

    def __init__(self, path: Path, configured: bool) -> None:
        where = "'eval.inception' points to" if configured else "not in the torch-fidelity cache:"
        super().__init__(
            f"Inception weights {where} {path} (no such file). Fetch them on a machine with "
            f"internet: curl -L -o {path} {WEIGHTS_URL} (or set eval.inception=PATH); only the "
            f"smoke recipe may use eval.random_inception=true, whose metrics compare to nothing")


def default_weights_path() -> Path:
    """Where torch-fidelity keeps the weights it downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(path: Optional[str]) -> Path:
    """The weights file to load: `path`, else the torch-fidelity cache; raises when absent."""
    resolved = Path(path).expanduser() if path else default_weights_path()
    if not resolved.is_file():
        raise MissingInceptionWeights(resolved, configured=path is not None)
    return resolved


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """He-normal convolutions, identity batch norms: activations stay O(1) through the network."""
    from torchvision.models.inception import Inception3  # the same parameter names and shapes

    with torch.device("meta"):
        shapes = Inception3(num_classes=LOGITS_DIM, aux_logits=False, init_weights=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in shapes.items():
        if name.endswith("conv.weight"):
            out[name] = torch.randn(meta.shape, generator=g) * math.sqrt(2.0 / meta[0].numel())
        elif name == "fc.weight":
            out[name] = torch.randn(meta.shape, generator=g) / math.sqrt(meta.shape[1])
        elif name.endswith(("bn.weight", "running_var")):
            out[name] = torch.ones(meta.shape)
        else:  # biases, running means, num_batches_tracked
            out[name] = torch.zeros(meta.shape, dtype=meta.dtype)
    return out


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures(nn.Module):
    """uint8 images [B,3,H,W] -> (pool3 [B,2048], sFID features [B,2023], logits [B,1008]).

    `description` says which weights are loaded (file + sha256, or random + seed);
    `comparable` is False for random weights.
    """

    def __init__(self, net: nn.Module, description: str, comparable: bool) -> None:
        super().__init__()
        self.net = net
        self.description = description
        self.comparable = comparable
        self._spatial: Optional[torch.Tensor] = None
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects uint8 images [B,3,H,W]; got {images.dtype} {tuple(images.shape)}")
        with exact_float32():
            pool, logits = self.net(images)
            spatial = spatial_features(self._spatial).float()
        self._spatial = None
        return pool, spatial, logits


def load_inception(path: Optional[str] = None, *, random_init: bool = False, seed: int = 0,
                   device: torch.device | str = "cpu") -> InceptionFeatures:
    """The evaluator network on `device`. random_init only where a recipe asks for it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if random_init:
        buf = io.BytesIO()
        torch.save(_random_state_dict(seed), buf)
        buf.seek(0)
        source, description, comparable = buf, f"InceptionV3, RANDOM weights (seed {seed})", False
    else:
        weights = resolve_weights(path)
        source, comparable = str(weights), True
        description = f"InceptionV3 TF-2015-12-05 port (torch-fidelity) {weights.name} sha256:{file_sha256(weights)[:16]}"
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=source)
    except Exception as err:  # not a state dict, or one with other tensors: name the file
        raise UserError(f"Inception weights {source}: not the TF-ported InceptionV3 state dict "
                        f"({first_line(err)})") from None
    return InceptionFeatures(net, description, comparable).to(device)
