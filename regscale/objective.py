"""The REG training objective (REG_SPEC "Objective").

Linear interpolant with t=0 data and t=1 noise: x_t = (1 - t) x + t eps, target velocity eps - x;
the class token uses the same t and its own noise. Loss = L_img + proj_coeff * L_proj +
cls_coeff * L_cls. The loss takes its random inputs as explicit `Draws` (one row per sample);
`draw` makes them from one torch.Generator in this order: label dropout, t, image noise,
class-token noise; so a step can be replayed bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from regscale.config import LossConfig

LATENT_SCALE = 0.18215


class LossParts(NamedTuple):
    """0-d tensors: total = img + proj_coeff * proj + cls_coeff * cls (parts unweighted)."""

    total: torch.Tensor
    img: torch.Tensor
    proj: torch.Tensor
    cls: torch.Tensor


def _device(generator: torch.Generator) -> torch.device:
    return generator.device


def sample_time(n: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """n times in (0, 1), float32: "uniform" U(0,1) or "lognormal" s/(1+s), s = exp(N(0,1))."""
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=_device(generator))
    if mode == "lognormal":
        s = torch.randn(n, generator=generator, device=_device(generator)).exp()
        return s / (1 + s)
    raise ValueError(f"time sampling must be 'uniform' or 'lognormal'; got {mode!r}")


def sample_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor,
                   scale: float = LATENT_SCALE) -> torch.Tensor:
    """A draw from the VAE posterior, scaled: (mean + std * eps) * scale, eps ~ N(0, 1)."""
    return (mean + std * eps) * scale


def drop_labels(y: torch.Tensor, prob: float, null_class: int, u: torch.Tensor) -> torch.Tensor:
    """Replace label i by `null_class` where u[i] < prob, u ~ U(0, 1) (for classifier-free guidance)."""
    return torch.where(u.to(y.device) < prob, torch.full_like(y, null_class), y)


class Draws(NamedTuple):
    """The random inputs of one batch's loss, one row per sample."""

    drop: torch.Tensor  # [B] U(0, 1): the label is dropped where drop < class_dropout_prob
    t: torch.Tensor  # [B] times in (0, 1)
    noise: torch.Tensor  # [B, C, H, W] N(0, 1), the image's
    noise_cls: torch.Tensor  # [B, D] N(0, 1), the class token's


def draw(n: int, image_shape: Sequence[int], cls_dim: int, time_sampling: str,
         generator: torch.Generator) -> Draws:
    """n samples' draws from `generator`, in the documented order (float32, on its device)."""
    device = _device(generator)
    drop = torch.rand(n, generator=generator, device=device)
    t = sample_time(n, time_sampling, generator)
    noise = torch.randn((n, *image_shape), generator=generator, device=device)
    noise_cls = torch.randn((n, cls_dim), generator=generator, device=device)
    return Draws(drop, t, noise, noise_cls)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) of the linear interpolant; t [B] broadcast over x's other dims."""
    tb = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - tb) * x + tb * noise, noise - x


def projection_loss(zs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Negative cosine similarity, averaged over tokens, batch and encoders."""
    if len(zs) != len(targets):
        raise ValueError(f"{len(zs)} projector outputs but {len(targets)} encoder targets")
    losses = [-(F.normalize(z.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1).mean()
              for z, target in zip(zs, targets)]
    return torch.stack(losses).mean()


def reg_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             tokens: Union[torch.Tensor, Sequence[torch.Tensor]], *, draws: Draws,
             loss_cfg: "LossConfig", class_dropout_prob: float, training: bool = True) -> LossParts:
    """The REG loss of one batch.

    x: clean scaled latents [B,C,H,W]; y: labels [B]; tokens: DINOv2 output [B, 1 + N, D]
    (token 0, the class token, is the class-token target; all tokens are the projection targets),
    or a list of such tensors, one per encoder (the class token comes from the first).
    draws: the batch's random inputs (`draw`), on x's device.
    training: apply label dropout with `class_dropout_prob` (False: validation).
    """
    targets = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
    cls = targets[0][:, 0].to(x.dtype)
    if training and class_dropout_prob > 0:
        y = drop_labels(y, class_dropout_prob, model.num_classes, draws.drop)
    t = draws.t.to(x.device)
    noise, noise_cls = draws.noise.to(x.dtype), draws.noise_cls.to(cls.dtype)
    x_t, v_target = interpolate(x, noise, t)
    cls_t, cls_target = interpolate(cls, noise_cls, t)
    v_img, zs, v_cls = model(x_t, t, y, cls_t)
    img = ((v_img.float() - v_target.float()) ** 2).mean()
    cls_loss = ((v_cls.float() - cls_target.float()) ** 2).mean()
    proj = projection_loss(zs, targets)
    total = img + loss_cfg.proj_coeff * proj + loss_cfg.cls_coeff * cls_loss
    return LossParts(total, img, proj, cls_loss)
