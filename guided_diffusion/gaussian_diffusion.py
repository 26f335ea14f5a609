"""Gaussian diffusion (DDPM/DDIM) with classifier-free guidance and deterministic DDIM inversion.

Schedules and all derived constants are float64 numpy arrays; per-timestep lookups index them in float64
and cast the result to the dtype/device of the tensor they scale. ``t`` is always a LongTensor [B] of
indices into this (possibly respaced) schedule; the network sees ``timestep_map[t]`` (see respace.py).
Guidance is off for ``w=None``; any real ``w`` (``-1`` included) is a guidance strength.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from guided_diffusion.guidance import cfg_model_outputs, guided_eps
from guided_diffusion.nn import checks_on_host


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas [T] (float64) of the ``linear`` (scaled to T) or ``cosine`` (Nichol & Dhariwal) schedule."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = num_diffusion_timesteps
        return np.array([min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                         for i in range(steps)], dtype=np.float64)
    raise ValueError(f"unknown noise_schedule {name!r}: expected 'linear' or 'cosine'")


class ModelMeanType(enum.Enum):
    """What the network predicts."""
    EPSILON = enum.auto()
    START_X = enum.auto()


class ModelVarType(enum.Enum):
    """Reverse-process variance: fixed beta_t (LARGE), fixed posterior variance (SMALL), or learned."""
    FIXED_LARGE = enum.auto()
    FIXED_SMALL = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """MSE (+ vb with learned sigmas, rescaled by T/1000 for RESCALED_MSE) or the variational bound."""
    MSE = enum.auto()
    RESCALED_MSE = enum.auto()
    KL = enum.auto()
    RESCALED_KL = enum.auto()

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def clamp_to_spatial_quantile(x: Tensor) -> Tensor:
    """Dynamic clip (docs/method.md, 'Healthy-guided and unguided predictions'): per sample and channel
    ``s = max(q_0.99(|x|), 1)``; ``clip(x,-s,s)/s``.

    x: [B, C, *spatial]; returns the same shape and dtype.
    """
    if x.dim() < 3:
        raise ValueError(f"clamp_to_spatial_quantile expects x of shape [B, C, *spatial], "
                         f"got {tuple(x.shape)}")
    s = torch.quantile(x.detach().abs().flatten(2).float(), 0.99, dim=-1).clamp(min=1.0)
    s = s.to(x.dtype).reshape(*x.shape[:2], *([1] * (x.dim() - 2)))
    return torch.maximum(torch.minimum(x, s), -s) / s


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of [-1, 1] data in 256 bins under N(means, exp(log_scales)^2)."""
    def std_cdf(v: Tensor) -> Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = std_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = std_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _model_device(model: Callable[..., Tensor]) -> torch.device:
    inner = getattr(model, "model", model)
    if isinstance(inner, torch.nn.Module):
        for p in inner.parameters():
            return p.device
    return torch.device("cpu")


class _TimestepMappedModel:
    """Calls the network with its training timesteps: ``timestep_map[t]`` (x 1000/T_orig if rescaled)."""

    def __init__(self, model: Callable[..., Tensor], timestep_map: Tensor, rescale: bool,
                 original_steps: int, map_on: Callable[[torch.device], Tensor] | None = None):
        self.model, self.timestep_map = model, timestep_map
        self.rescale, self.original_steps = rescale, original_steps
        # map_on(device): the map on that device (the diffusion's cached copy, so no copy per call)
        self.map_on = map_on or timestep_map.to

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        ts = self.map_on(t.device)[t]
        if self.rescale:
            ts = ts.float() * (1000.0 / self.original_steps)
        return self.model(x, ts, **kwargs)


class GaussianDiffusion:
    """DDPM/DDIM utilities for a schedule ``betas`` [T].

    Args:
        betas: float64 array [T] in (0, 1).
        model_mean_type / model_var_type / loss_type: see the enums above.
        rescale_timesteps: feed the network ``t * 1000 / T`` (float) instead of the integer index.
    """

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, rescale_timesteps: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not ((betas > 0) & (betas < 1)).all():
            lo, hi = (betas.min(), betas.max()) if betas.size else (None, None)
            raise ValueError(f"betas must be a non-empty 1-D array with values in (0, 1), got shape "
                             f"{betas.shape} and range [{lo}, {hi}]; the linear schedule needs at least 21 "
                             "steps (use 'cosine' for fewer)")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.rescale_timesteps = rescale_timesteps
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = torch.arange(self.num_timesteps, dtype=torch.long)
        self.original_num_steps = self.num_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t=0: clip the log to the t=1 value
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1 else np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.log_betas = np.log(betas)
        # fixed reverse variances: FIXED_LARGE uses beta_t (posterior variance at t=0 for a better decoder)
        if model_var_type == ModelVarType.FIXED_LARGE and self.num_timesteps > 1:
            self.fixed_variance = np.append(self.posterior_variance[1], betas[1:])
        elif model_var_type == ModelVarType.FIXED_LARGE:
            self.fixed_variance = betas
        else:
            self.fixed_variance = self.posterior_variance
        self.fixed_log_variance = np.log(np.maximum(self.fixed_variance, 1e-20))

    # ---------------------------------------------------------------- lookups and closed forms
    def _extract(self, arr: np.ndarray, t: Tensor, x: Tensor) -> Tensor:
        """``arr[t]`` looked up in float64, cast to x's dtype/device, shaped [B, 1, ...] to broadcast."""
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a LongTensor of shape [B]=[{x.shape[0]}], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if checks_on_host(t) and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps t must lie in [0, {self.num_timesteps - 1}] (indices into the "
                             f"respaced schedule), got range [{int(t.min())}, {int(t.max())}]")
        vals = self._table(arr, x.device, x.dtype)[t.to(x.device)]
        return vals.reshape(-1, *([1] * (x.dim() - 1)))

    def _table(self, arr: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``arr`` as a tensor of ``dtype`` on ``device``, cached: the lookups of a step loop then neither
        copy the schedule to the device nor wait for it. Same values as indexing in float64 and casting."""
        cache = self.__dict__.setdefault("_tables", {})
        key = (id(arr), str(device), dtype)
        hit = cache.get(key)
        if hit is None or hit[0] is not arr:
            hit = cache[key] = (arr, torch.as_tensor(arr).to(device=device, dtype=dtype))
        return hit[1]

    def _timestep_map_on(self, device: torch.device) -> Tensor:
        return self._table(self.timestep_map, device, torch.long)

    def _wrap_model(self, model: Callable[..., Tensor]) -> _TimestepMappedModel:
        if isinstance(model, _TimestepMappedModel):
            if model.timestep_map is self.timestep_map and model.rescale == self.rescale_timesteps:
                return model
            model = model.model  # wrapped by another diffusion: re-wrap the bare network with our map
        return _TimestepMappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps,
                                    map_on=self._timestep_map_on)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). x_start [B, ...] -> [B, ...]."""
        if noise is None:
            noise = randn_like(x_start, generator)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x_start shape "
                             f"{tuple(x_start.shape)}")
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor,
                                  t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """eps = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ---------------------------------------------------------------- model outputs
    def _split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split a raw network output into (eps-or-x0 [B, C, ...], learned variance values or None)."""
        channels = x.shape[1]
        learned = self.model_var_type == ModelVarType.LEARNED_RANGE
        expected = 2 * channels if learned else channels
        if out.shape[0] != x.shape[0] or out.shape[1] != expected or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match input {tuple(x.shape)}: "
                             f"expected {expected} channels (learn_sigma={learned}); check the model's "
                             "out_channels against the diffusion's learn_sigma flag")
        if learned:
            return out[:, :channels], out[:, channels:]
        return out, None

    def _to_eps(self, main: Tensor, x: Tensor, t: Tensor) -> Tensor:
        if self.model_mean_type == ModelMeanType.START_X:
            return self.predict_eps_from_xstart(x, t, main)
        return main

    def model_eps(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, model_kwargs: dict | None = None,
                  w: float | None = None) -> dict[str, Tensor]:
        """Noise prediction at (x, t), classifier-free guided when ``w`` is a number.

        w None: one plain call ``model(x, t, **model_kwargs)``; returns {"eps"}.
        w float: needs ``model_kwargs["y"]``; one batched call on 2B samples; returns
            {"eps": (1+w) eps_cond - w eps_null, "eps_cond", "eps_null"}.
        With learned sigmas the dict also holds "var_values" [B, C, ...] (conditional half when guided).
        """
        model = self._wrap_model(model)
        kwargs = dict(model_kwargs or {})
        if w is None:
            main, var_values = self._split_output(model(x, t, **kwargs), x)
            result = {"eps": self._to_eps(main, x, t)}
        else:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"guidance strength w must be a finite number or None (guidance off), "
                                 f"got {w!r}")
            out_cond, out_null = cfg_model_outputs(model, x, t, kwargs.pop("y", None), **kwargs)
            main_cond, var_values = self._split_output(out_cond, x)
            eps_cond = self._to_eps(main_cond, x, t)
            eps_null = self._to_eps(self._split_output(out_null, x)[0], x, t)
            result = {"eps": guided_eps(eps_cond, eps_null, float(w)), "eps_cond": eps_cond,
                      "eps_null": eps_null}
        if var_values is not None:
            result["var_values"] = var_values
        return result

    def _mean_variance(self, x: Tensor, t: Tensor, eps: Tensor, var_values: Tensor | None,
                       clip_denoised: bool,
                       denoised_fn: Callable[[Tensor], Tensor] | None) -> dict[str, Tensor]:
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            frac = (var_values + 1.0) / 2.0
            log_variance = (frac * self._extract(self.log_betas, t, x)
                            + (1.0 - frac) * self._extract(self.posterior_log_variance_clipped, t, x))
            variance = torch.exp(log_variance)
        else:
            variance = self._extract(self.fixed_variance, t, x).expand_as(x)
            log_variance = self._extract(self.fixed_log_variance, t, x).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, w: float | None = None,
                        clip_denoised: bool = True, denoised_fn: Callable[[Tensor], Tensor] | None = None,
                        model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, eps) for x [B, C, ...]."""
        out = self.model_eps(model, x, t, model_kwargs=model_kwargs, w=w)
        result = self._mean_variance(x, t, out["eps"], out.get("var_values"), clip_denoised, denoised_fn)
        result["eps"] = out["eps"]
        return result

    # ---------------------------------------------------------------- losses
    def _vb_terms_bpd(self, x_start: Tensor, x_t: Tensor, t: Tensor, eps: Tensor,
                      var_values: Tensor | None) -> Tensor:
        """Per-sample variational-bound term in bits/dim: KL(q || p) for t > 0, decoder NLL for t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._mean_variance(x_t, t, eps, var_values, clip_denoised=False, denoised_fn=None)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Callable[..., Tensor], x_start: Tensor, t: Tensor,
                        model_kwargs: dict | None = None, noise: Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-sample training losses [B]: keys loss, mse (MSE types) and vb (learned sigmas or KL types).

        The network is called as ``model(x_t, t, **model_kwargs)`` (kwargs may carry y/threshold/generator).
        """
        model = self._wrap_model(model)
        if noise is None:
            noise = randn_like(x_start, generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        main, var_values = self._split_output(model(x_t, t, **(model_kwargs or {})), x_start)
        terms: dict[str, Tensor] = {}
        if self.loss_type.is_vb():
            terms["vb"] = self._vb_terms_bpd(x_start, x_t, t, self._to_eps(main, x_t, t), var_values)
            rescaled = self.loss_type == LossType.RESCALED_KL
            terms["loss"] = terms["vb"] * (self.num_timesteps if rescaled else 1.0)
            return terms
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        terms["mse"] = mean_flat((target - main) ** 2)
        terms["loss"] = terms["mse"]
        if var_values is not None:
            # the vb term trains only the variance: the mean prediction is frozen (detached)
            vb = self._vb_terms_bpd(x_start, x_t, t, self._to_eps(main.detach(), x_t, t), var_values)
            rescaled = self.loss_type == LossType.RESCALED_MSE
            terms["vb"] = vb * (self.num_timesteps / 1000.0 if rescaled else 1.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    # ---------------------------------------------------------------- sampling steps
    def p_sample(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, w: float | None = None,
                 clip_denoised: bool = True, denoised_fn: Callable[[Tensor], Tensor] | None = None,
                 model_kwargs: dict | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One ancestral DDPM step x_t -> x_{t-1}: dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, w=w, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, w: float | None = None,
                    clip_denoised: bool = True, denoised_fn: Callable[[Tensor], Tensor] | None = None,
                    model_kwargs: dict | None = None, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (eta=0: deterministic): dict(sample, pred_xstart (clamped))."""
        out = self.p_mean_variance(model, x, t, w=w, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
        sample = (out["pred_xstart"] * torch.sqrt(abar_prev)
                  + torch.sqrt((1.0 - abar_prev - sigma ** 2).clamp(min=0.0)) * eps)
        if eta != 0.0:
            nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
            sample = sample + nonzero * sigma * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model: Callable[..., Tensor], x: Tensor, t: Tensor,
                            clip_denoised: bool = True, denoised_fn: Callable[[Tensor], Tensor] | None = None,
                            model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """Deterministic DDIM encoding from level t to t+1 (paper Eq. 4), without guidance.

        x̂0 from ``model(x, t, **model_kwargs)`` (clamped if clip_denoised), eps recomputed from x̂0, then
        ``x_{t+1} = sqrt(abar_next[t]) x̂0 + sqrt(1 - abar_next[t]) eps``. Returns dict(sample, pred_xstart).
        """
        out = self.p_mean_variance(model, x, t, w=None, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar_next = self._extract(self.alphas_cumprod_next, t, x)
        sample = out["pred_xstart"] * torch.sqrt(abar_next) + torch.sqrt(1.0 - abar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ---------------------------------------------------------------- loops
    def _sample_loop(self, step: Callable[..., dict[str, Tensor]], model: Callable[..., Tensor],
                     shape: tuple[int, ...], noise: Tensor | None, device: torch.device | str | None,
                     progress: bool, generator: torch.Generator | None, **step_kwargs) -> Tensor:
        model = self._wrap_model(model)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} must equal the requested shape "
                                 f"{tuple(shape)}")
            x = noise.to(device) if device is not None else noise
        else:
            device = torch.device(device) if device is not None else _model_device(model)
            x = randn_like(torch.empty(shape, device=device), generator)
        indices = range(self.num_timesteps - 1, -1, -1)
        with torch.no_grad():
            for i in tqdm(indices, disable=not progress, desc="sampling"):
                t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
                x = step(model, x, t, generator=generator, **step_kwargs)["sample"]
        return x

    def p_sample_loop(self, model: Callable[..., Tensor], shape: tuple[int, ...], noise: Tensor | None = None,
                      w: float | None = None, clip_denoised: bool = True,
                      denoised_fn: Callable[[Tensor], Tensor] | None = None, model_kwargs: dict | None = None,
                      device: torch.device | str | None = None, progress: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling from x_T = noise (or fresh N(0, I) of ``shape``) down to x_0 [shape]."""
        return self._sample_loop(self.p_sample, model, shape, noise, device, progress, generator, w=w,
                                 clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs)

    def ddim_sample_loop(self, model: Callable[..., Tensor], shape: tuple[int, ...],
                         noise: Tensor | None = None, w: float | None = None, clip_denoised: bool = True,
                         denoised_fn: Callable[[Tensor], Tensor] | None = None,
                         model_kwargs: dict | None = None,
                         device: torch.device | str | None = None, progress: bool = False, eta: float = 0.0,
                         generator: torch.Generator | None = None) -> Tensor:
        """DDIM sampling from x_T = noise (or fresh N(0, I) of ``shape``) down to x_0 [shape]."""
        return self._sample_loop(self.ddim_sample, model, shape, noise, device, progress, generator, w=w,
                                 clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs, eta=eta)

    def ddim_reverse_sample_loop(self, model: Callable[..., Tensor], x: Tensor, steps: int,
                                 clip_denoised: bool = True, model_kwargs: dict | None = None,
                                 progress: bool = False) -> Tensor:
        """``ddim_reverse_sample`` for t = 0 .. steps-1: x (taken as level 0) -> latent at level ``steps``."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_timesteps}] (num_timesteps), got {steps}")
        model = self._wrap_model(model)
        with torch.no_grad():
            for i in tqdm(range(steps), disable=not progress, desc="DDIM inversion"):
                t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
                x = self.ddim_reverse_sample(model, x, t, clip_denoised=clip_denoised,
                                             model_kwargs=model_kwargs)["sample"]
        return x
