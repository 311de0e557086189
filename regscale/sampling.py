"""Sampling REG models (REG_SPEC "Sampling"): the paper's Euler-Maruyama SDE and a Heun ODE.

The image latent and the class token are integrated jointly from t=1 (noise) to t=0 (data), the
state in float64. Classifier-free guidance acts on both streams (separate scales) only for
guidance_low <= t <= guidance_high; there the conditional and unconditional branches run as one
batched forward, elsewhere only the conditional branch runs. Sample i's noise comes only from
seeds[i] (its own generator), so results do not depend on the batch size or the number of GPUs.
The model runs in float32 (published) or under bfloat16 autocast (`precision="bf16"`).
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Sequence

import torch
from torch import nn


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the model's compute dtype while sampling


def model_precision(precision: str, device: torch.device) -> ContextManager:
    """The context the model's forward runs in: nothing for fp32, autocast for bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}; got {precision!r}")
    if PRECISIONS[precision] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def compile_for_sampling(model: nn.Module) -> nn.Module:
    """torch.compile of the whole model with static shapes: one graph per batch size met (the
    batch, its guided double and a shorter last batch), no dynamic-shape kernels."""
    return torch.compile(model, dynamic=False)


def sde_time_grid(steps: int) -> torch.Tensor:
    """linspace(1, 0.04, steps) then 0: steps-1 stochastic steps and a final noise-free one."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs steps >= 2; got {steps}")
    return torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(steps: int) -> torch.Tensor:
    """linspace(1, 0, steps + 1): `steps` Heun steps (2 * steps - 1 model calls)."""
    if steps < 1:
        raise ValueError(f"the ODE sampler needs steps >= 1; got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """Score of the linear interpolant x_t = (1-t) x0 + t eps: s = -((1-t) v + x) / t."""
    return -((1 - t) * v + x) / t


class _PerSampleNoise:
    """One generator per sample: row i of every draw comes from seeds[i] alone.

    Each call draws N(0, 1) noise for the image and the class token of every sample, one draw per
    sample (the image's values first), in float64.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device, image_shape: tuple[int, ...], cls_dim: int) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device, self.image_shape, self.cls_dim = device, image_shape, cls_dim
        self.image_numel = math.prod(image_shape)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.image_numel + self.cls_dim
        draws = torch.stack([torch.randn(n, generator=g, device=self.device, dtype=torch.float64)
                             for g in self.generators])
        return draws[:, :self.image_numel].reshape(-1, *self.image_shape), draws[:, self.image_numel:]


class _Guided:
    """The model's (image, class-token) velocity at one time, with CFG inside the interval."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, cfg_scale: float, cls_cfg_scale: float,
                 guidance_low: float, guidance_high: float, precision: str) -> None:
        self.model, self.labels = model, labels
        self.autocast = model_precision(precision, labels.device)  # re-entered at every call
        self.null = torch.full_like(labels, model.num_classes)
        self.cfg_scale, self.cls_cfg_scale = cfg_scale, cls_cfg_scale
        self.low, self.high = guidance_low, guidance_high
        self.dtype = next(model.parameters()).dtype
        guides_cls = cls_cfg_scale > 0 and cls_cfg_scale != 1.0  # <= 0: conditional, as upstream
        self.enabled = cfg_scale != 1.0 or guides_cls

    def guided_at(self, t: float) -> bool:
        return self.enabled and self.low <= t <= self.high

    def __call__(self, x: torch.Tensor, cls: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if not self.guided_at(t):
            time = torch.full((n,), t, device=x.device, dtype=self.dtype)
            with self.autocast:
                v, _, v_cls = self.model(x.to(self.dtype), time, self.labels, cls.to(self.dtype))
            return v.double(), v_cls.double()
        time = torch.full((2 * n,), t, device=x.device, dtype=self.dtype)
        with self.autocast:
            v, _, v_cls = self.model(torch.cat([x, x]).to(self.dtype), time, torch.cat([self.labels, self.null]),
                                     torch.cat([cls, cls]).to(self.dtype))
        v_c, v_u = v.double().chunk(2)
        c_c, c_u = v_cls.double().chunk(2)
        v = v_u + self.cfg_scale * (v_c - v_u)
        # upstream: a class-token scale <= 0 means the conditional class-token drift, unguided
        v_cls = c_u + self.cls_cfg_scale * (c_c - c_u) if self.cls_cfg_scale > 0 else c_c
        return v, v_cls


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, seeds: Sequence[int], *, sampler: str = "sde",
           steps: int = 250, cfg_scale: float = 1.0, cls_cfg_scale: float = 1.0, guidance_low: float = 0.0,
           guidance_high: float = 1.0, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [B,C,H,W] (scaled, as the model sees them) and class tokens [B,D], float32.

    sampler "sde": Euler-Maruyama with w(t) = 2t, `steps` model calls (published: 250).
    sampler "ode": Heun on the probability-flow ODE, 2 * steps - 1 model calls.
    Guidance (when a scale is not 1, for guidance_low <= t <= guidance_high) gives
    uncond + scale * (cond - uncond), with cfg_scale for the image and cls_cfg_scale for the class
    token; as upstream, cls_cfg_scale <= 0 keeps the class token's conditional drift.
    precision "fp32" (published) runs the model as it is; "bf16" under bfloat16 autocast.
    """
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but {len(seeds)} seeds: one seed per sample")
    device = labels.device
    noise = _PerSampleNoise(seeds, device, (model.in_channels, model.input_size, model.input_size), model.cls_token_dim)
    x, cls = noise()
    velocity = _Guided(model, labels, cfg_scale, cls_cfg_scale, guidance_low, guidance_high, precision)
    if sampler == "sde":
        x, cls = _euler_maruyama(velocity, x, cls, sde_time_grid(steps).tolist(), noise)
    elif sampler == "ode":
        x, cls = _heun(velocity, x, cls, ode_time_grid(steps).tolist())
    else:
        raise ValueError(f"sampler must be 'sde' or 'ode'; got {sampler!r}")
    return x.float(), cls.float()


def _drifts(velocity: _Guided, x: torch.Tensor, cls: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDE drifts v - w(t)/2 * score, w(t) = 2t, for both streams."""
    v, v_cls = velocity(x, cls, t)
    return v - t * score_from_velocity(v, x, t), v_cls - t * score_from_velocity(v_cls, cls, t)


def _euler_maruyama(velocity: _Guided, x: torch.Tensor, cls: torch.Tensor, grid: list[float],
                    noise: _PerSampleNoise) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = [v - w(t)/2 s] dt + sqrt(w(t)) dW on both streams; the last step is the drift alone."""
    for t, t_next in zip(grid[:-2], grid[1:-1]):
        dt = t_next - t
        drift, drift_cls = _drifts(velocity, x, cls, t)
        diffusion = (2.0 * t * abs(dt)) ** 0.5
        dw, dw_cls = noise()
        x = x + drift * dt + diffusion * dw
        cls = cls + drift_cls * dt + diffusion * dw_cls
    t, t_next = grid[-2], grid[-1]
    drift, drift_cls = _drifts(velocity, x, cls, t)
    return x + drift * (t_next - t), cls + drift_cls * (t_next - t)


def _heun(velocity: _Guided, x: torch.Tensor, cls: torch.Tensor,
          grid: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun (2nd order) on dx/dt = v; the last step (to t = 0) is a plain Euler step."""
    for t, t_next in zip(grid[:-2], grid[1:-1]):
        dt = t_next - t
        v, v_cls = velocity(x, cls, t)
        v2, v2_cls = velocity(x + dt * v, cls + dt * v_cls, t_next)
        x, cls = x + dt * 0.5 * (v + v2), cls + dt * 0.5 * (v_cls + v2_cls)
    t, t_next = grid[-2], grid[-1]
    v, v_cls = velocity(x, cls, t)
    return x + (t_next - t) * v, cls + (t_next - t) * v_cls
