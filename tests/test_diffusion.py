"""Diffusion core: schedules, q_sample, losses, DDPM/DDIM steps, DDIM inversion, respacing, samplers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    clamp_to_spatial_quantile,
    get_named_beta_schedule,
)
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def make_diffusion(steps=1000, schedule="linear", var_type=ModelVarType.FIXED_LARGE, loss=LossType.MSE,
                   mean_type=ModelMeanType.EPSILON, respacing=None, rescale=False):
    kwargs = dict(betas=get_named_beta_schedule(schedule, steps), model_mean_type=mean_type,
                  model_var_type=var_type, loss_type=loss, rescale_timesteps=rescale)
    if respacing is None:
        return GaussianDiffusion(**kwargs)
    return SpacedDiffusion(space_timesteps(steps, respacing), **kwargs)


class ToyNet(nn.Module):
    """Per-sample conv net depending on t; records the timesteps it receives."""

    def __init__(self, channels=2, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, y=None, null=False, threshold=0.0, generator=None):
        self.seen_t.append(t.detach().clone())
        return torch.tanh(self.conv(x) * (1.0 + 0.001 * t.float()).view(-1, 1, 1, 1))


class PointMassEps(nn.Module):
    """Exact eps for data concentrated at ``target``: eps(x_t, s) = (x_t - sqrt(abar_s) c) / sqrt(1 - abar_s).

    ``abar`` is the ORIGINAL schedule, indexed by the timestep the network receives, so a wrong timestep
    mapping breaks the exactness.
    """

    def __init__(self, target: torch.Tensor, alphas_cumprod: np.ndarray):
        super().__init__()
        self.target = target
        self.abar = torch.from_numpy(alphas_cumprod)

    def forward(self, x, t, **kwargs):
        a = self.abar[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


# ------------------------------------------------------------------------------------------ schedules
def test_linear_schedule_endpoints():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    b = get_named_beta_schedule("linear", 100)
    assert b[0] == pytest.approx(1e-3) and b[-1] == pytest.approx(0.2)
    assert np.all(np.diff(b) > 0)


def test_cosine_schedule():
    b = get_named_beta_schedule("cosine", 1000)
    assert b.dtype == np.float64 and np.all(b > 0) and np.all(b <= 0.999) and b[-1] == 0.999
    abar = np.cumprod(1 - b)
    assert np.all(np.diff(abar) < 0)

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    assert abar[499] == pytest.approx(f(500 / 1000) / f(0), rel=1e-9)
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="cosine"):  # linear betas exceed 1 below 21 steps
        GaussianDiffusion(betas=get_named_beta_schedule("linear", 10), model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE)


def test_derived_arrays():
    d = make_diffusion(50)
    for arr in (d.betas, d.alphas_cumprod, d.alphas_cumprod_prev, d.alphas_cumprod_next):
        assert arr.dtype == np.float64 and arr.shape == (50,)
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - d.betas))
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_array_equal(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    np.testing.assert_array_equal(d.alphas_cumprod_next[:-1], d.alphas_cumprod[1:])
    np.testing.assert_allclose(d.posterior_variance,
                               d.betas * (1 - d.alphas_cumprod_prev) / (1 - d.alphas_cumprod))


# ------------------------------------------------------------------------------------------ q_sample
def test_q_sample_statistics_and_generator():
    d = make_diffusion(1000)
    x0 = torch.full((4000, 1, 4, 4), 0.5)
    t = torch.full((4000,), 300, dtype=torch.long)
    state = torch.get_rng_state()
    xt = d.q_sample(x0, t, generator=torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state())
    xt2 = d.q_sample(x0, t, generator=torch.Generator().manual_seed(7))
    assert torch.equal(xt, xt2)
    a = d.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.02)
    noise = torch.randn_like(x0)
    torch.testing.assert_close(d.q_sample(x0, t, noise=noise), math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)


def test_bad_timesteps_rejected():
    d = make_diffusion(10, schedule="cosine")
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="t must"):
        d.q_sample(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        d.q_sample(x, torch.tensor([0, 10]))


def test_clamp_to_spatial_quantile():
    x = torch.rand(2, 2, 16, 16) * 0.8 - 0.4
    x[1, 0] *= 10.0
    out = clamp_to_spatial_quantile(x)
    torch.testing.assert_close(out[0], x[0])  # max |x| < 1 -> s = 1, clip is a no-op
    torch.testing.assert_close(out[1, 1], x[1, 1])
    s = torch.quantile(x[1, 0].abs().flatten(), 0.99)
    torch.testing.assert_close(out[1, 0], x[1, 0].clamp(-s, s) / s)
    assert out.abs().max() <= 1.0


# ------------------------------------------------------------------------------------------ losses
def test_training_losses_mse_matches_hand_computation():
    torch.manual_seed(0)
    d = make_diffusion(100)
    net = ToyNet()
    x0 = torch.rand(3, 2, 8, 8) * 2 - 1
    t = torch.tensor([0, 50, 99])
    noise = torch.randn_like(x0)
    terms = d.training_losses(net, x0, t, noise=noise)
    xt = d.q_sample(x0, t, noise=noise)
    expected = ((net(xt, t) - noise) ** 2).mean(dim=(1, 2, 3))
    assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (3,)
    torch.testing.assert_close(terms["mse"], expected)
    torch.testing.assert_close(terms["loss"], expected)


def test_training_losses_learned_sigma_vb_trains_variance_only():
    d = make_diffusion(100, var_type=ModelVarType.LEARNED_RANGE, loss=LossType.RESCALED_MSE)
    out = nn.Parameter(torch.randn(3, 4, 8, 8) * 0.5)
    x0 = torch.rand(3, 2, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 99])
    noise = torch.randn_like(x0)
    terms = d.training_losses(lambda x, ts, **kw: out, x0, t, noise=noise)
    torch.testing.assert_close(terms["mse"], ((out[:, :2] - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"][1:] >= 0).all()
    terms["vb"].sum().backward()
    assert torch.count_nonzero(out.grad[:, :2]) == 0 and torch.count_nonzero(out.grad[:, 2:]) > 0
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(lambda x, ts, **kw: out[:, :2], x0, t)


def test_training_losses_kl_exact_posterior_is_zero():
    # an x0-predicting model that outputs the true x0 with the posterior variance gives KL = 0 for t > 0
    d = make_diffusion(100, var_type=ModelVarType.FIXED_SMALL, loss=LossType.RESCALED_KL,
                       mean_type=ModelMeanType.START_X)
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor([5, 60])
    terms = d.training_losses(lambda x, ts, **kw: x0, x0, t)
    assert set(terms) == {"loss", "vb"}
    torch.testing.assert_close(terms["vb"], torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)
    terms = d.training_losses(lambda x, ts, **kw: x0 * 0.5, x0, t)
    assert (terms["vb"] > 0).all()
    torch.testing.assert_close(terms["loss"], terms["vb"] * 100)


# ------------------------------------------------------------------------------------------ respacing
def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45 and min(kept) == 0 and max(kept) == 299
    assert space_timesteps(100, [100]) == set(range(100))
    assert space_timesteps(100, "") == set(range(100))
    with pytest.raises(ValueError, match="ddim"):
        space_timesteps(1000, "ddim3000")
    with pytest.raises(ValueError, match="cannot keep"):
        space_timesteps(10, "11")


def test_spaced_diffusion_alphas_and_timesteps():
    base = make_diffusion(1000)
    spaced = make_diffusion(1000, respacing="ddim50")
    assert spaced.num_timesteps == 50 and spaced.timestep_map.dtype == torch.long
    assert spaced.timestep_map.tolist() == list(range(0, 1000, 20))
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[::20], rtol=1e-12)
    net = ToyNet()
    x = torch.randn(2, 2, 8, 8)
    spaced.model_eps(net, x, torch.tensor([0, 49]))
    assert net.seen_t[-1].tolist() == [0, 980]
    rescaled = make_diffusion(500, respacing="ddim50", rescale=True)
    rescaled.model_eps(net, x, torch.tensor([1, 49]))
    assert net.seen_t[-1].dtype.is_floating_point
    torch.testing.assert_close(net.seen_t[-1], torch.tensor([10.0, 490.0]) * 2.0)


# ------------------------------------------------------------------------------------------ DDIM inversion
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
def test_ddim_inversion_roundtrip_point_mass(dtype, atol):
    """For point-mass data the exact eps makes DDIM inversion and decoding exact at every step."""
    base = make_diffusion(1000)
    d = make_diffusion(1000, respacing="ddim50")
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(3, 2, 8, 8, generator=gen, dtype=torch.float64) * 1.6 - 0.8).to(dtype)
    model = PointMassEps(target, base.alphas_cumprod)
    x = (math.sqrt(d.alphas_cumprod[0]) * target
         + math.sqrt(1 - d.alphas_cumprod[0]) * torch.randn(target.shape, generator=gen, dtype=dtype))
    eps0 = (x - math.sqrt(d.alphas_cumprod[0]) * target) / math.sqrt(1 - d.alphas_cumprod[0])
    steps = 40
    latent = d.ddim_reverse_sample_loop(model, x, steps)
    a = d.alphas_cumprod[steps]  # the latent sits at level `steps`
    torch.testing.assert_close(latent, math.sqrt(a) * target + math.sqrt(1 - a) * eps0, atol=atol, rtol=0)
    out = latent
    for i in range(steps, 0, -1):
        out = d.ddim_sample(model, out, torch.full((3,), i, dtype=torch.long))["sample"]
    torch.testing.assert_close(out, x, atol=atol, rtol=0)
    # final DDIM step (t = 0) returns the clamped x0 prediction, here the data point itself
    step0 = d.ddim_sample(model, out, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(step0["sample"], target, atol=atol * 10, rtol=0)
    torch.testing.assert_close(step0["pred_xstart"], target, atol=atol * 10, rtol=0)


def test_ddim_reverse_sample_formula():
    d = make_diffusion(100)
    net = ToyNet()
    x = torch.randn(2, 2, 8, 8) * 0.3
    t = torch.tensor([3, 70])
    out = d.ddim_reverse_sample(net, x, t)
    x0 = d.predict_xstart_from_eps(x, t, net(x, t)).clamp(-1, 1)
    eps = d.predict_eps_from_xstart(x, t, x0)
    a_next = torch.tensor(d.alphas_cumprod_next[[3, 70]], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(out["pred_xstart"], x0)
    torch.testing.assert_close(out["sample"], a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps)


# ------------------------------------------------------------------------------------------ loops, RNG
@pytest.mark.parametrize("loop,extra", [("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 0.5})])
def test_sample_loops_deterministic_with_generator(loop, extra):
    torch.manual_seed(0)
    d = make_diffusion(1000, respacing="ddim20")
    net = ToyNet()
    run = getattr(d, loop)
    state = torch.get_rng_state()
    a = run(net, (2, 2, 8, 8), generator=torch.Generator().manual_seed(5), **extra)
    assert torch.equal(state, torch.get_rng_state())
    b = run(net, (2, 2, 8, 8), generator=torch.Generator().manual_seed(5), **extra)
    c = run(net, (2, 2, 8, 8), generator=torch.Generator().manual_seed(6), **extra)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.abs().max() <= 1.0 + 1e-6  # the last step returns the clamped x0
    noise = torch.randn(2, 2, 8, 8)
    n1 = run(net, (2, 2, 8, 8), noise=noise, generator=torch.Generator().manual_seed(1), **extra)
    n2 = run(net, (2, 2, 8, 8), noise=noise, generator=torch.Generator().manual_seed(1), **extra)
    assert torch.equal(n1, n2)
    with pytest.raises(ValueError, match="noise shape"):
        run(net, (2, 2, 4, 4), noise=noise)


def test_ddim_eta0_ignores_generator_and_p_sample_t0_is_mean():
    d = make_diffusion(100)
    net = ToyNet()
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([0, 0])
    s1 = d.p_sample(net, x, t, generator=torch.Generator().manual_seed(1))["sample"]
    s2 = d.p_sample(net, x, t, generator=torch.Generator().manual_seed(2))["sample"]
    assert torch.equal(s1, s2)
    t = torch.tensor([10, 50])
    a = d.ddim_sample(net, x, t)["sample"]
    b = d.ddim_sample(net, x, t, generator=torch.Generator().manual_seed(9))["sample"]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ samplers
def test_uniform_sampler():
    d = make_diffusion(50)
    sampler = create_named_schedule_sampler("uniform", d)
    assert isinstance(sampler, UniformSampler)
    t, w = sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(0))
    t2, _ = sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (64,) and torch.equal(t, t2)
    assert int(t.min()) >= 0 and int(t.max()) < 50 and torch.equal(w, torch.ones(64))
    with pytest.raises(ValueError, match="uniform"):
        create_named_schedule_sampler("nope", d)


def test_loss_second_moment_resampler():
    d = make_diffusion(10, schedule="cosine")
    sampler = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(sampler, LossSecondMomentResampler)
    np.testing.assert_array_equal(sampler.weights(), np.ones(10))
    for _ in range(sampler.history_per_term):
        ts = torch.arange(10)
        sampler.update_with_local_losses(ts, torch.where(ts == 3, 100.0, 1.0))
    w = sampler.weights()
    assert w.argmax() == 3 and w[3] > 0.9 * w.sum()
    t, weights = sampler.sample(200, "cpu", generator=torch.Generator().manual_seed(0))
    p = w / w.sum()
    assert (t == 3).float().mean() > 0.8
    torch.testing.assert_close(weights, torch.tensor(1.0 / (10 * p[t.numpy()]), dtype=torch.float32))


def test_model_wrapped_by_another_diffusion_is_remapped():
    coarse = make_diffusion(1000, respacing="ddim10")
    fine = make_diffusion(1000, respacing="ddim50")
    net = ToyNet()
    wrapped = coarse._wrap_model(net)
    x = torch.randn(1, 2, 8, 8)
    fine.model_eps(wrapped, x, torch.tensor([1]))
    coarse.model_eps(wrapped, x, torch.tensor([1]))
    assert [int(t) for t in net.seen_t] == [20, 100]
