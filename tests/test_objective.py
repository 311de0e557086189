"""The REG objective: interpolant, time and latent sampling, label dropout, the three losses."""

import math

import pytest
import torch
from torch import nn

from regscale.config import LossConfig
from regscale.objective import (
    Draws,
    LossParts,
    draw,
    drop_labels,
    interpolate,
    projection_loss,
    reg_loss,
    sample_latents,
    sample_time,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """A stand-in network with a known output: v = a * x_t, v_cls = b * cls_t, zs = [fixed]; it records inputs."""

    num_classes = 10

    def __init__(self, zs: torch.Tensor, a: float = 0.5, b: float = -2.0) -> None:
        super().__init__()
        self.zs, self.a, self.b = zs, a, b

    def forward(self, x, t, y, cls_t):
        self.seen = (x, t, y, cls_t)
        return self.a * x, [self.zs], self.b * cls_t


def batch(seed: int = 0, b: int = 6, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 4, 4, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    tokens = torch.randn(b, 5, d, generator=g)
    return x, y, tokens


def test_interpolant_endpoints_and_target():
    x, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 1.0, 0.25])
    x_t, target = interpolate(x, noise, t)
    assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[1], noise[1])  # t=0 data, t=1 noise
    torch.testing.assert_close(x_t[2], 0.75 * x[2] + 0.25 * noise[2])
    assert torch.equal(target, noise - x)


def test_loss_of_hand_built_tensors_equals_the_formula():
    x, y, tokens = batch()
    zs = torch.randn(6, 5, 8)
    model = Recorder(zs)
    cfg = LossConfig(proj_coeff=0.5, cls_coeff=0.03, time_sampling="uniform")
    draws = draw(6, x.shape[1:], 8, "uniform", torch.Generator().manual_seed(3))
    parts = reg_loss(model, x, y, tokens, draws=draws, loss_cfg=cfg, class_dropout_prob=0.1)
    # replay the documented draw order: label dropout, t, image noise, class-token noise
    g = torch.Generator().manual_seed(3)
    drop = torch.rand(6, generator=g) < 0.1
    t = torch.rand(6, generator=g)
    eps = torch.randn(x.shape, generator=g)
    eps_c = torch.randn(6, 8, generator=g)
    c = tokens[:, 0]
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x + tb * eps
    c_t = (1 - t[:, None]) * c + t[:, None] * eps_c
    img = ((0.5 * x_t - (eps - x)) ** 2).mean()
    cls = ((-2.0 * c_t - (eps_c - c)) ** 2).mean()
    cos = (zs / zs.norm(dim=-1, keepdim=True) * tokens / tokens.norm(dim=-1, keepdim=True)).sum(-1)
    proj = -cos.mean()
    torch.testing.assert_close(parts.img, img)
    torch.testing.assert_close(parts.cls, cls)
    torch.testing.assert_close(parts.proj, proj)
    torch.testing.assert_close(parts.total, img + 0.5 * proj + 0.03 * cls)
    assert isinstance(parts, LossParts) and all(p.dim() == 0 for p in parts)
    seen_x, seen_t, seen_y, seen_c = model.seen
    torch.testing.assert_close(seen_x, x_t)
    torch.testing.assert_close(seen_c, c_t)
    assert torch.equal(seen_t, t)
    assert torch.equal(seen_y, torch.where(drop, torch.tensor(10), y))


def test_projection_loss_is_negative_cosine():
    tokens = torch.randn(2, 5, 8)
    assert projection_loss([3.0 * tokens], [tokens]).item() == pytest.approx(-1.0, abs=1e-6)
    assert projection_loss([-tokens], [tokens]).item() == pytest.approx(1.0, abs=1e-6)
    a = torch.zeros(1, 1, 2)
    a[..., 0] = 1
    b = torch.zeros(1, 1, 2)
    b[..., 1] = 1
    assert projection_loss([a], [b]).item() == 0.0
    # averaged over encoders
    assert projection_loss([tokens, -tokens], [tokens, tokens]).item() == pytest.approx(0.0, abs=1e-6)


def test_label_dropout_rate_and_null_class():
    y = torch.randint(0, 1000, (200_000,), generator=torch.Generator().manual_seed(0))
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, 0.1, 1000, u)
    dropped = out == 1000
    assert abs(dropped.float().mean().item() - 0.1) < 0.003
    assert torch.equal(dropped, u < 0.1) and torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y[:10], 0.0, 1000, u[:10]), y[:10])


def test_no_label_dropout_when_not_training():
    x, y, tokens = batch()
    model = Recorder(torch.randn(6, 5, 8))
    draws = draw(6, x.shape[1:], 8, "uniform", torch.Generator().manual_seed(0))
    reg_loss(model, x, y, tokens, draws=draws, loss_cfg=LossConfig(), class_dropout_prob=0.99, training=False)
    assert torch.equal(model.seen[2], y)


def test_time_sampling_distributions():
    u = sample_time(100_000, "uniform", torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    t = sample_time(100_000, "lognormal", torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))  # = N(0, 1)
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1) < 0.02
    with pytest.raises(ValueError, match="lognormal"):
        sample_time(3, "cosine", torch.Generator())


def test_latent_sampling_formula():
    mean, std, eps = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sample_latents(mean, std, eps), (mean + std * eps) * 0.18215)


def test_draws_are_float32_in_the_documented_order_and_shapes():
    d = draw(3, (4, 2, 2), 8, "lognormal", torch.Generator().manual_seed(9))
    assert isinstance(d, Draws) and all(t.dtype == torch.float32 for t in d)
    assert [tuple(t.shape) for t in d] == [(3,), (3,), (3, 4, 2, 2), (3, 8)]
    g = torch.Generator().manual_seed(9)
    assert torch.equal(d.drop, torch.rand(3, generator=g))
    assert torch.equal(d.t, sample_time(3, "lognormal", g))
    assert torch.equal(d.noise, torch.randn(3, 4, 2, 2, generator=g))
    assert torch.equal(d.noise_cls, torch.randn(3, 8, generator=g))


def test_a_step_replays_bit_for_bit(tiny_model):
    def step():
        tiny_model.zero_grad()
        g = torch.Generator().manual_seed(42)
        mean, std = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, 4, 8, 8, generator=g)
        x = sample_latents(mean, std, torch.randn(mean.shape, generator=g))
        tokens = torch.randn(4, 17, 16, generator=g)
        draws = draw(4, x.shape[1:], 16, "lognormal", g)
        parts = reg_loss(tiny_model, x, torch.tensor([1, 2, 3, 4]), tokens, draws=draws,
                         loss_cfg=LossConfig(time_sampling="lognormal"), class_dropout_prob=0.1)
        parts.total.backward()
        return parts.total.detach(), [p.grad.clone() for p in tiny_model.parameters()]

    (a, ga), (b, gb) = step(), step()
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert math.isfinite(a.item())
