"""Classifier-free guidance: one batched call, exact Eq. 6, validation, w=-1 is a real guidance value."""

import pytest
import torch
from torch import nn

from guided_diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from guided_diffusion.guidance import cfg_model_outputs, guided_eps
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


class CondToyNet(nn.Module):
    """Per-sample conv net with timestep and class conditioning; counts calls and records inputs."""

    def __init__(self, channels: int = 2, out_channels: int | None = None, num_classes: int = 3):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Embedding(num_classes, out_channels)
        self.calls: list[dict] = []

    def forward(self, x, t, y=None, null=False, threshold=0.0, generator=None):
        self.calls.append({"batch": x.shape[0], "t": t.detach().clone(), "y": y, "null": null})
        h = self.conv(x) * (1.0 + 0.001 * t.float()).view(-1, 1, 1, 1)
        if y is not None:
            keep = ~torch.as_tensor(null, dtype=torch.bool, device=x.device).expand(x.shape[0])
            h = h + (self.emb(y) * keep[:, None].float())[:, :, None, None]
        return torch.tanh(h)


def make_diffusion(steps=100, var_type=ModelVarType.FIXED_LARGE):
    betas = torch.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=torch.float64).numpy()
    return GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType.EPSILON, model_var_type=var_type,
                             loss_type=LossType.MSE)


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    net = CondToyNet()
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([5, 40, 99])
    y = torch.tensor([0, 1, 2])
    return net, x, t, y


def test_batched_guided_eps_matches_two_calls_and_calls_once(setup):
    net, x, t, y = setup
    diffusion = make_diffusion()
    w = 2.5
    with torch.no_grad():
        out = diffusion.model_eps(net, x, t, model_kwargs={"y": y}, w=w)
        assert len(net.calls) == 1 and net.calls[0]["batch"] == 6
        null_flags = net.calls[0]["null"]
        assert null_flags.dtype == torch.bool and null_flags.tolist() == [False] * 3 + [True] * 3
        eps_y = net(x, t, y=y, null=False)
        eps_null = net(x, t, y=y, null=True)
    expected = (1 + w) * eps_y - w * eps_null
    torch.testing.assert_close(out["eps"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["eps_cond"], eps_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["eps_null"], eps_null, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(eps_y, eps_null)  # the test would be vacuous otherwise


def test_unguided_is_one_plain_call(setup):
    net, x, t, y = setup
    kwargs = {"y": y}
    out = make_diffusion().model_eps(net, x, t, model_kwargs=kwargs, w=None)
    assert len(net.calls) == 1 and net.calls[0]["batch"] == 3 and net.calls[0]["null"] is False
    assert set(out) == {"eps"}
    torch.testing.assert_close(out["eps"], net(x, t, y=y))
    assert kwargs == {"y": y}  # caller's dict is not mutated


def test_w_minus_one_is_guidance_not_off(setup):
    net, x, t, y = setup
    with torch.no_grad():
        out = make_diffusion().model_eps(net, x, t, model_kwargs={"y": y}, w=-1.0)
        eps_null = net(x, t, y=y, null=True)
        eps_y = net(x, t, y=y)
    assert net.calls[0]["batch"] == 6
    torch.testing.assert_close(out["eps"], eps_null, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out["eps"], eps_y)


def test_guidance_errors(setup):
    net, x, t, y = setup
    diffusion = make_diffusion()
    with pytest.raises(ValueError, match="y"):
        diffusion.model_eps(net, x, t, model_kwargs={}, w=1.0)
    with pytest.raises(ValueError, match="null"):
        diffusion.model_eps(net, x, t, model_kwargs={"y": y, "null": True}, w=1.0)
    with pytest.raises(ValueError, match="w"):
        diffusion.model_eps(net, x, t, model_kwargs={"y": y}, w=float("nan"))
    with pytest.raises(ValueError, match="y"):
        cfg_model_outputs(net, x, t, None)
    assert net.calls == []


def test_guided_eps_formula():
    a, b = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(guided_eps(a, b, 3.0), 4.0 * a - 3.0 * b)
    torch.testing.assert_close(guided_eps(a, b, 0.0), a)


def test_guided_learned_sigma_uses_conditional_variance(setup):
    _, x, t, y = setup
    net = CondToyNet(out_channels=4)
    diffusion = make_diffusion(var_type=ModelVarType.LEARNED_RANGE)
    with torch.no_grad():
        out = diffusion.model_eps(net, x, t, model_kwargs={"y": y}, w=1.5)
        full_cond = net(x, t, y=y)
        full_null = net(x, t, y=y, null=True)
    expected = 2.5 * full_cond[:, :2] - 1.5 * full_null[:, :2]
    torch.testing.assert_close(out["eps"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["var_values"], full_cond[:, 2:], atol=1e-6, rtol=1e-5)


def test_guided_ddim_loop_on_spaced_diffusion_sees_original_timesteps():
    torch.manual_seed(1)
    net = CondToyNet()
    betas = make_diffusion(1000).betas
    spaced = SpacedDiffusion(space_timesteps(1000, "ddim10"), betas=betas,
                             model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE,
                             loss_type=LossType.MSE)
    y = torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(3)
    out = spaced.ddim_sample_loop(net, (2, 2, 8, 8), w=3.0, model_kwargs={"y": y}, generator=gen)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    assert len(net.calls) == 10
    seen = [int(c["t"][0]) for c in net.calls]
    assert seen == list(range(900, -1, -100))
    assert all(c["batch"] == 4 and c["t"].tolist() == [c["t"][0].item()] * 4 for c in net.calls)


def test_real_unet_guided_single_call_and_inversion():
    from guided_diffusion.unet import UNetModel

    torch.manual_seed(0)
    net = UNetModel(image_size=16, in_channels=2, model_channels=16, out_channels=2, num_res_blocks=1,
                    attention_resolutions={2}, channel_mult=(1, 2), num_classes=2, num_heads=2).eval()
    with torch.no_grad():  # the output layer is zero-initialised: perturb so cond and null differ
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    spaced = SpacedDiffusion(space_timesteps(1000, "ddim10"), betas=make_diffusion(1000).betas,
                             model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE,
                             loss_type=LossType.MSE)
    x = torch.randn(2, 2, 16, 16)
    t = torch.tensor([3, 7])
    y = torch.tensor([0, 1])
    with torch.no_grad():
        out = spaced.model_eps(net, x, t, model_kwargs={"y": y}, w=2.0)
        assert calls == [4]
        t_orig = spaced.timestep_map[t]
        eps_y, eps_null = net(x, t_orig, y=y), net(x, t_orig, y=y, null=True)
    assert not torch.allclose(eps_y, eps_null)
    torch.testing.assert_close(out["eps"], 3.0 * eps_y - 2.0 * eps_null, atol=1e-5, rtol=1e-4)
    latent = spaced.ddim_reverse_sample_loop(net, x.clamp(-1, 1), 5, model_kwargs={"null": True})
    sample = spaced.ddim_sample_loop(net, x.shape, noise=latent, w=1.0, model_kwargs={"y": y})
    assert torch.isfinite(latent).all() and sample.shape == x.shape and sample.abs().max() <= 1.0 + 1e-6
