"""Statistics and determinism of the vectorised simplex noise (guided_diffusion/simplex.py)."""

import pytest
import torch

from guided_diffusion.simplex import simplex_noise, simplex_noise_like


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lag1_corr(x: torch.Tensor) -> float:
    """Mean correlation between horizontally adjacent pixels (per slice, x is normalised)."""
    a, b = x[..., :, :-1], x[..., :, 1:]
    a = a - a.mean(dim=(-1, -2), keepdim=True)
    b = b - b.mean(dim=(-1, -2), keepdim=True)
    num = (a * b).mean(dim=(-1, -2))
    den = a.pow(2).mean(dim=(-1, -2)).sqrt() * b.pow(2).mean(dim=(-1, -2)).sqrt()
    return float((num / den).mean())


def test_zero_mean_unit_variance_per_slice():
    x = simplex_noise((3, 2, 32, 32), generator=_gen(0))
    assert x.shape == (3, 2, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean(dim=(-1, -2)), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(x.std(dim=(-1, -2)), torch.ones(3, 2), atol=1e-4)
    # slices differ (independent tables per sample and channel)
    assert not torch.allclose(x[0, 0], x[1, 0]) and not torch.allclose(x[0, 0], x[0, 1])


def test_spatially_correlated_unlike_white_noise():
    x = simplex_noise((4, 1, 32, 32), generator=_gen(1))
    white = torch.randn(4, 1, 32, 32, generator=_gen(1))
    assert _lag1_corr(x) > 0.5
    assert abs(_lag1_corr(white)) < 0.1


def test_octaves_change_the_spectrum():
    g = 2
    one = simplex_noise((8, 1, 32, 32), octaves=1, frequency=16.0, generator=_gen(g))
    six = simplex_noise((8, 1, 32, 32), octaves=6, frequency=16.0, generator=_gen(g))

    def high_freq_fraction(x: torch.Tensor) -> float:
        power = torch.fft.fft2(x).abs().pow(2)
        f = torch.fft.fftfreq(32).abs()
        high = (f[:, None] > 0.2) | (f[None, :] > 0.2)
        return float(power[..., high].sum() / power.sum())

    assert high_freq_fraction(six) > 2 * high_freq_fraction(one)
    # persistence weights the fine octaves: a lower persistence gives smoother noise
    smooth = simplex_noise((8, 1, 32, 32), octaves=6, persistence=0.3, frequency=16.0, generator=_gen(g))
    assert high_freq_fraction(smooth) < high_freq_fraction(six)


def test_deterministic_per_generator():
    a = simplex_noise((2, 3, 16, 24), generator=_gen(5))
    b = simplex_noise((2, 3, 16, 24), generator=_gen(5))
    c = simplex_noise((2, 3, 16, 24), generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    like = simplex_noise_like(torch.zeros(2, 3, 16, 24, dtype=torch.float64), generator=_gen(5))
    assert like.dtype == torch.float64 and torch.allclose(like.float(), a, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(shape=(2, 16, 16)), dict(shape=(1, 1, 8, 8), octaves=0),
                                    dict(shape=(1, 1, 8, 8), frequency=0.0)])
def test_bad_arguments_one_line(kwargs):
    shape = kwargs.pop("shape")
    with pytest.raises(ValueError, match="simplex_noise"):
        simplex_noise(shape, **kwargs)
