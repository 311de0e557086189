"""The frozen encoders REG trains against: DINOv2 ViT-B/14 (timm) and the SD-VAE (diffusers).

Weights come from a local path or the Hugging Face cache only; nothing is downloaded here. When a
file is missing, `MissingWeightsError` names it and the command that fetches it (`regscale
fetch-weights`, run on a machine with internet). `random_init` builds small random models of the
same classes for the smoke recipe and tests (their outputs are meaningless).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from regscale.errors import UserError, first_line

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from regscale.config import EncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LATENT_SCALE = 0.18215

# Where the pretrained weights live on the Hugging Face Hub (what `regscale fetch-weights` gets).
DINOV2_HUB = {"vit_base_patch14_dinov2": "timm/vit_base_patch14_dinov2.lvd142m"}
DINOV2_FILE = "model.safetensors"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
FETCH_HINT = "run `regscale fetch-weights` on a machine with internet (it fills the Hugging Face cache)"


class MissingWeightsError(UserError):
    """Pretrained weights that are not on this machine: names the file and how to fetch it."""

    def __init__(self, what: str, missing: str, hint: str = FETCH_HINT) -> None:
        super().__init__(f"{what}: weights not found: {missing}; {hint}, or give a local path")
        self.missing = missing


# ---------------------------------------------------------------------------------------------
# DINOv2


class DinoEncoder(nn.Module):
    """Frozen DINOv2: uint8 images [B,3,H,W] -> [B, 1 + 256, D] normalised class + patch tokens.

    REG preprocessing: /255, ImageNet mean/std, then bicubic resize to `resolution` (normalise
    first, then resize). The ViT runs under the caller's autocast (training: the model's
    precision on every device, as the official code does); the output is float32.
    """

    def __init__(self, vit: nn.Module, resolution: int = 224) -> None:
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.resolution = resolution
        self.embed_dim: int = vit.embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "DinoEncoder":
        """Stays in eval mode: the encoder is frozen."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> normalised float [B,3,res,res]."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DinoEncoder expects uint8 images [B,3,H,W]; got {images.dtype} {tuple(images.shape)}")
        x = (images.float() / 255.0 - self.mean) / self.std
        return F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        tokens = self.vit.forward_features(x)  # final LayerNorm applied: x_norm_{cls,patch}tokens
        return tokens.float()


def _dinov2_weights_file(cfg: "EncoderConfig") -> Path:
    """The DINOv2 weights file: cfg.weights (a timm or original torch.hub DINOv2 checkpoint, or a
    folder holding model.safetensors) or the Hugging Face cache."""
    if cfg.weights is not None:
        path = Path(cfg.weights)
        if path.is_dir():
            path = path / DINOV2_FILE
        if not path.is_file():
            raise MissingWeightsError(f"encoder '{cfg.name}'", f"{path} (encoder.weights: a weights file, or a "
                                      f"folder holding {DINOV2_FILE})")
        return path
    repo = DINOV2_HUB.get(cfg.name)
    if repo is None:
        raise UserError(f"encoder.name '{cfg.name}' has no known Hub location; set encoder.weights "
                        f"to a local weights file (known names: {', '.join(DINOV2_HUB)})")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, DINOV2_FILE)
    if not isinstance(found, str):
        raise MissingWeightsError(f"encoder '{cfg.name}'", f"{repo}/{DINOV2_FILE} in the Hugging Face cache")
    return Path(found)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def load_dinov2(cfg: "EncoderConfig", embed_dim: int = 768, seed: int = 0) -> DinoEncoder:
    """The frozen DINOv2 encoder (eval, no grad), position embedding resampled to the input grid.

    With cfg.random_init: a shallow random timm DINOv2 of width `embed_dim` and depth
    cfg.random_depth (same seed -> same weights), for smoke runs and tests.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if cfg.random_init:
        heads = max(1, embed_dim // 64)
        if embed_dim % heads:
            heads = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = timm.create_model(cfg.name, pretrained=False, img_size=cfg.resolution, num_classes=0,
                                    embed_dim=embed_dim, depth=cfg.random_depth, num_heads=heads)
        return DinoEncoder(vit, cfg.resolution)
    path = _dinov2_weights_file(cfg)
    vit = timm.create_model(cfg.name, pretrained=False, img_size=cfg.resolution, num_classes=0)
    if vit.embed_dim != embed_dim:
        raise UserError(f"encoder '{cfg.name}' has width {vit.embed_dim} but model.cls_token_dim is {embed_dim}")
    try:
        state = checkpoint_filter_fn(_load_state_dict(path), vit)  # also resamples pos_embed to 16x16
        vit.load_state_dict(state, strict=True)
    except Exception as err:  # unpickling, safetensors, key and shape errors alike: not this checkpoint
        raise UserError(f"{path}: not a {cfg.name} checkpoint: {first_line(err)}") from err
    return DinoEncoder(vit, cfg.resolution)


# ---------------------------------------------------------------------------------------------
# SD-VAE


def _tiny_vae(seed: int) -> "AutoencoderKL":
    """A small random AutoencoderKL: 8x downsampling (4 levels), 4 latent channels."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=256,
        )
    return vae


def check_vae_files(name_or_path: str) -> None:
    """The files of an SD-VAE are on this machine (a local folder, or a Hub id in the cache),
    without loading it; MissingWeightsError names the first one missing."""
    local = Path(name_or_path)
    if local.exists():
        weights = [local / "diffusion_pytorch_model.safetensors", local / "diffusion_pytorch_model.bin"]
        for needed in ([local / "config.json"], weights):
            if not any(f.is_file() for f in needed):
                raise MissingWeightsError(f"VAE '{name_or_path}'", str(needed[0]))
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    for name in VAE_FILES:
        try:
            found = try_to_load_from_cache(name_or_path, name)
        except HFValidationError:  # neither a folder here nor a Hub id
            raise MissingWeightsError(f"VAE '{name_or_path}'", f"{name_or_path} (no such folder)") from None
        if not isinstance(found, str):
            raise MissingWeightsError(f"VAE '{name_or_path}'", f"{name_or_path} in the Hugging Face cache (no {name})")


def load_vae(name_or_path: str, *, random_init: bool = False, seed: int = 0) -> "AutoencoderKL":
    """An SD-VAE (eval, frozen) from a local folder or a Hub id already in the cache.

    random_init: a tiny random AutoencoderKL with the same interface (same seed -> same weights).
    """
    if random_init:
        vae = _tiny_vae(seed)
    else:
        from diffusers import AutoencoderKL

        local = Path(name_or_path)
        check_vae_files(name_or_path)
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            where = name_or_path if local.exists() else f"{name_or_path} in the Hugging Face cache"
            raise MissingWeightsError(f"VAE '{name_or_path}'", f"{where} ({first_line(err, 160)})") from None
    return vae.eval().requires_grad_(False)


def _vae_dtype_device(vae: "AutoencoderKL") -> tuple[torch.dtype, torch.device]:
    p = next(vae.parameters())
    return p.dtype, p.device


@torch.no_grad()
def encode_moments(vae: "AutoencoderKL", images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B,3,256,256] -> posterior (mean, std), each float32 [B,4,32,32]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_moments expects uint8 images [B,3,H,W]; got {images.dtype} {tuple(images.shape)}")
    dtype, device = _vae_dtype_device(vae)
    x = images.to(device=device).to(dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def decode_latents(vae: "AutoencoderKL", latents: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Scaled latents [B,4,32,32] (already x0.18215) -> uint8 images [B,3,256,256].

    As the ADM/REPA samplers do: decode latent/scale, map [-1,1] to [0,255], clamp, truncate.
    """
    dtype, device = _vae_dtype_device(vae)
    x = vae.decode(latents.to(device=device, dtype=dtype) / scale).sample
    return torch.clamp(255.0 * (x.float() + 1.0) / 2.0, 0, 255).to(torch.uint8)
