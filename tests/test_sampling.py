"""The samplers: time grid, model calls, CFG interval, per-sample seeds, and an exact Gaussian case."""

import pytest
import torch
from torch import nn

from regscale.sampling import ode_time_grid, sample, sde_time_grid, score_from_velocity

pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianVelocity(nn.Module):
    """The exact velocity E[eps - x0 | x_t] when x0 ~ N(mu, s^2) per dimension (x_t = (1-t) x0 + t eps).

    Class-conditional: the image mean is mu + 0.1 * y (the null class gets mu); the class token has
    its own Gaussian N(mu_c, s_c^2). Calls are recorded as (t, batch size, labels).
    """

    num_classes = 10
    in_channels, input_size, cls_token_dim = 2, 4, 8

    def __init__(self, mu=1.5, s=0.5, mu_c=-1.0, s_c=2.0):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # the sampler reads the model dtype
        self.mu, self.s, self.mu_c, self.s_c = mu, s, mu_c, s_c
        self.calls = []

    @staticmethod
    def exact(x, t, mu, s):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        var_t = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var_t * (x - (1 - t) * mu)

    def forward(self, x, t, y, cls_t):
        self.calls.append((t[0].item(), x.shape[0], y.clone()))
        mu = self.mu + 0.1 * torch.where(y == self.num_classes, 0, y).to(x.dtype).view(-1, 1, 1, 1)
        return self.exact(x, t, mu, self.s), [], self.exact(cls_t, t, self.mu_c, self.s_c)


def test_sde_time_grid():
    grid = sde_time_grid(5)
    assert grid.dtype == torch.float64
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.76, 0.52, 0.28, 0.04, 0.0], dtype=torch.float64))
    assert len(sde_time_grid(250)) == 251
    with pytest.raises(ValueError):
        sde_time_grid(1)
    torch.testing.assert_close(ode_time_grid(4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))


def test_score_from_velocity_of_a_gaussian():
    # x0 ~ N(0, 1): x_t ~ N(0, (1-t)^2 + t^2), score -x / var
    x, t = torch.randn(5, dtype=torch.float64), 0.3
    v = GaussianVelocity.exact(x, torch.full((5,), t, dtype=torch.float64), 0.0, 1.0)
    torch.testing.assert_close(score_from_velocity(v, x, t), -x / ((1 - t) ** 2 + t**2))


def test_sde_model_calls_follow_the_grid():
    model = GaussianVelocity()
    sample(model, torch.tensor([1, 2]), [0, 1], steps=7)
    times = [c[0] for c in model.calls]
    torch.testing.assert_close(torch.tensor(times, dtype=torch.float64), sde_time_grid(7)[:-1])
    assert all(c[1] == 2 for c in model.calls)


def test_ode_makes_2n_minus_1_calls():
    model = GaussianVelocity()
    sample(model, torch.tensor([1]), [0], sampler="ode", steps=6)
    assert len(model.calls) == 11


def test_cfg_only_inside_the_interval_and_in_one_batched_forward():
    model = GaussianVelocity()
    labels = torch.tensor([1, 2, 3])
    sample(model, labels, [0, 1, 2], steps=10, cfg_scale=2.0, cls_cfg_scale=1.5, guidance_low=0.1,
           guidance_high=0.85)
    assert len(model.calls) == 10  # one forward per step, guided or not
    for t, n, y in model.calls:
        if 0.1 <= t <= 0.85:
            assert n == 6 and torch.equal(y, torch.tensor([1, 2, 3, 10, 10, 10]))
        else:
            assert n == 3 and torch.equal(y, labels)
    assert sum(n == 6 for _, n, _ in model.calls) == 7  # t = 0.787 ... 0.147


def test_no_uncond_forward_without_guidance():
    model = GaussianVelocity()
    sample(model, torch.tensor([1, 2]), [0, 1], steps=6, cfg_scale=1.0, cls_cfg_scale=1.0)
    assert all(n == 2 for _, n, _ in model.calls)


def test_guidance_scales_act_on_each_stream():
    labels, seeds = torch.tensor([5, 7]), [3, 4]
    plain = sample(GaussianVelocity(), labels, seeds, steps=8)
    img_only = sample(GaussianVelocity(), labels, seeds, steps=8, cfg_scale=3.0, cls_cfg_scale=1.0)
    # the class-token field ignores y: guiding it changes nothing; the image moves towards its class
    torch.testing.assert_close(img_only[1], plain[1])
    assert (img_only[0].mean() - plain[0].mean()).item() > 0.5
    cls_only = sample(GaussianVelocity(), labels, seeds, steps=8, cfg_scale=1.0, cls_cfg_scale=3.0)
    torch.testing.assert_close(cls_only[0], plain[0])


@pytest.mark.parametrize("sampler,steps", [("sde", 100), ("ode", 40)])
def test_gaussian_data_lands_on_the_right_mean_and_variance(sampler, steps):
    model = GaussianVelocity(mu=1.5, s=0.5, mu_c=-1.0, s_c=2.0)
    n = 256
    x, cls = sample(model, torch.full((n,), model.num_classes), list(range(n)), sampler=sampler, steps=steps)
    assert x.shape == (n, 2, 4, 4) and cls.shape == (n, 8) and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(1.5, abs=0.03)
    assert x.var().item() == pytest.approx(0.25, rel=0.06)
    assert cls.mean().item() == pytest.approx(-1.0, abs=0.15)
    assert cls.var().item() == pytest.approx(4.0, rel=0.08)


def test_same_seeds_same_samples_at_batch_sizes_1_and_4(tiny_model):
    labels, seeds = torch.tensor([1, 2, 3, 10]), [11, 12, 13, 14]
    for model, kwargs in ((GaussianVelocity(), {}), (tiny_model, dict(cfg_scale=1.8, cls_cfg_scale=1.8,
                                                                      guidance_high=0.7))):
        x4, c4 = sample(model, labels, seeds, steps=6, **kwargs)
        for i in range(4):
            x1, c1 = sample(model, labels[i:i + 1], seeds[i:i + 1], steps=6, **kwargs)
            torch.testing.assert_close(x1[0], x4[i], rtol=0, atol=1e-5)
            torch.testing.assert_close(c1[0], c4[i], rtol=0, atol=1e-5)
    a, _ = sample(GaussianVelocity(), labels[:2], [11, 99], steps=6)
    assert not torch.allclose(a[0], a[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="one seed per sample"):
        sample(GaussianVelocity(), torch.tensor([1, 2]), [0], steps=3)
    with pytest.raises(ValueError, match="'sde' or 'ode'"):
        sample(GaussianVelocity(), torch.tensor([1]), [0], sampler="ddim", steps=3)


def test_class_token_scale_zero_means_unguided_conditional():
    model = GaussianVelocity()
    sample(model, torch.tensor([1, 2]), [0, 1], steps=4, cfg_scale=1.0, cls_cfg_scale=0.0)
    assert all(n == 2 for _, n, _ in model.calls)  # nothing to guide: no unconditional branch


def test_bf16_precision_runs_the_model_under_autocast(tiny_model):
    labels, seeds = torch.tensor([1, 2, 10]), [3, 4, 5]
    kwargs = dict(steps=4, cfg_scale=1.8, cls_cfg_scale=1.8, guidance_high=0.7)
    out_dtypes = []
    hook = tiny_model.final_layer.linear.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    try:
        x32, c32 = sample(tiny_model, labels, seeds, **kwargs)
        x16, c16 = sample(tiny_model, labels, seeds, precision="bf16", **kwargs)
    finally:
        hook.remove()
    assert set(out_dtypes[:4]) == {torch.float32} and set(out_dtypes[4:]) == {torch.bfloat16}
    assert x16.dtype == torch.float32 and c16.dtype == torch.float32  # the state stays float64 -> float32
    diff = (x16 - x32).abs().max().item()
    assert 0 < diff < 0.05 * x32.abs().max().item()  # bf16 rounding of the same computation
    with pytest.raises(ValueError, match="precision must be one of"):
        sample(tiny_model, labels, seeds, precision="fp16", steps=3)


def test_compiled_model_samples_as_the_eager_one(tiny_model):
    from regscale.sampling import compile_for_sampling

    labels, seeds = torch.tensor([1, 2, 10]), [3, 4, 5]
    kwargs = dict(steps=4, cfg_scale=1.8, cls_cfg_scale=1.8, guidance_high=1.0)  # every call guided: 1 graph
    compiled = compile_for_sampling(tiny_model)
    assert compiled is not tiny_model and compiled.num_classes == tiny_model.num_classes
    eager, got = sample(tiny_model, labels, seeds, **kwargs), sample(compiled, labels, seeds, **kwargs)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
