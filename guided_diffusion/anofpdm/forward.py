"""AnoFPDM forward process (docs/method.md, 'Forward process') with streaming statistics.

For every forward step t = 0 .. S-1 the latent x_t is fed to the classifier-free-guided network and
two clean-image predictions are formed:

* HGP (healthy-guided): x̂h0,t = clip(pred_x0(x_t, t, (1 + w) eps_y - w eps_null)), y = 0 (healthy);
* UGP (unguided):        x̂∅0,t = clip(pred_x0(x_t, t, eps_null))  (paper Eq. 10, ``ugp="null"``) or
                          clip(pred_x0(x_t, t, eps_y))             (upstream code, ``ugp="healthy_w0"``).

Faithful mode (default): x_0' = q_sample(x0, 0, noise) (the paper's x1), then DDIM inversion with the
null model using the *same* null prediction as the UGP, so each step costs ONE network call on 2B
samples. ``eps_y``/``eps_null`` do not depend on w, so a list of guidance strengths is served by one pass.

Nothing of size [B, S, M, H, W] is kept by default: per step we record the scalars
``mse_h``/``mse_null``/``div`` and update the sub-anomaly-map aggregates online (running sum of
SAM_t = (x̂h0,t - x0)², snapshotted whenever M_t = mean (x̂h0,t - x̂∅0,t)² reaches a new maximum), which is
exact for t_e = argmax_t M_t. ``sam_mode`` "gradient" / "gradient_para" replaces SAM_t by the guidance
term (x̂h0,t - x̂∅0,t)² (docs/method.md, 'Gradient-SAM ablation'; see gradient_sam.py). Optional stacks:
SAMs in float16 (for t_e_ratio != 1) and float32 x̂ stacks
(``call_pattern="upstream"`` / ``keep_xstarts``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from guided_diffusion.anofpdm.gradient_sam import gradient_sam_scale
from guided_diffusion.configs.eval_configs import ENCODINGS, UGP_MODES
from guided_diffusion.gaussian_diffusion import clamp_to_spatial_quantile
from guided_diffusion.guidance import guided_eps
from guided_diffusion.utils.precision import autocast, check_precision

CALL_PATTERNS = ("batched", "upstream")

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def forward_settings(
    *,
    forward_steps: int,
    modality: Sequence[int],
    encoding: str = "ddim",
    ugp: str = "null",
    legacy_indexing: bool = False,
    clip_denoised: bool = True,
    dynamic_clip: bool = False,
) -> dict:
    """The forward-process flags that change its results (stored in / checked against calibrations)."""
    return {
        "forward_steps": int(forward_steps),
        "modality": [int(m) for m in modality],
        "encoding": encoding,
        "ugp": ugp,
        "legacy_indexing": bool(legacy_indexing),
        "clip_denoised": bool(clip_denoised),
        "dynamic_clip": bool(dynamic_clip),
    }


def sample_noise(like: Tensor, generator: GeneratorLike) -> Tensor:
    """N(0, I) noise shaped like ``like`` [B, ...].

    generator: None (global RNG), one torch.Generator, or a sequence of B generators (one per sample; each
    sample's noise then depends only on its own generator, not on the batch composition). Noise is drawn on
    the generator's device (CPU for per-sample generators) and moved to ``like.device`` without waiting for
    the device (a non-blocking copy; the host tensor is staged at once, so it may be freed after the call).
    """
    if generator is None:
        return torch.randn_like(like)
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(
            like.device, non_blocking=True
        )
    if len(generator) != like.shape[0]:
        raise ValueError(
            f"generator: got {len(generator)} per-sample generators for a batch of {like.shape[0]}; "
            "pass one generator per sample (or a single torch.Generator)"
        )
    return torch.stack(
        [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype) for g in generator]
    ).to(like.device, non_blocking=True)


@dataclass
class ForwardResult:
    """Per-step statistics and online SAM aggregates of one forward pass.

    Shapes (B batch, nW = len(ws), S steps, M = len(modality)):
        mse_h [B, nW, S, M]: pixel mean of (x̂h0,t - x0[m])² per w.
        mse_null [B, S, M]: pixel mean of (x̂∅0,t - x0[m])².
        div [B, nW, S, M]: M_t = pixel mean of (x̂h0,t - x̂∅0,t)².
        end_step [B, nW, M]: argmax_t div (first maximum).
        agg: name -> [B, nW, M, H, W] float32 SAM aggregates at t_e = end_step:
            "sum_incl" = Σ_{t<=t_e} SAM_t, "sum_excl" = Σ_{t<t_e} SAM_t, "sam_te" = SAM_{t_e},
            "sam_prev" = SAM_{t_e-1} (SAM_0 when t_e = 0), and with subset_interval k > 0
            "grid_excl" = Σ_{t<t_e, t % k == 0} SAM_t.
        sam_stack [B, nW, S, M, H, W] float16 (float32 for sam_mode "gradient", whose 1/B_t² scale can
            exceed the float16 range) or None; xstart_h [B, nW, S, M, H, W] / xstart_null
        [B, S, M, H, W] float32 or None.
        calls: number of network calls made; samples_per_call: batch size of each call.
        sam_mode: "default" (SAM_t = (x̂h0,t - x0)²) or the gradient-SAM ablation the aggregates hold.
    """

    ws: list[float]
    modality: list[int]
    mse_h: Tensor
    mse_null: Tensor
    div: Tensor
    end_step: Tensor
    agg: dict[str, Tensor]
    subset_interval: int = -1
    sam_stack: Tensor | None = None
    xstart_h: Tensor | None = None
    xstart_null: Tensor | None = None
    calls: int = 0
    samples_per_call: list[int] = field(default_factory=list)
    steps_run: int | None = None
    sam_mode: str = "default"

    @property
    def forward_steps(self) -> int:
        return int(self.mse_null.shape[1])

    def w_index(self, w: float) -> int:
        """Index of guidance strength ``w`` in ``ws`` (ValueError listing ``ws`` if absent)."""
        for i, v in enumerate(self.ws):
            if float(v) == float(w):
                return i
        raise ValueError(f"w={w} was not part of this forward pass (ws={self.ws}); rerun with it in `ws`")

    def state_bytes(self) -> int:
        """Bytes held by the result's tensors (the forward process's persistent memory)."""
        tensors = [
            self.mse_h,
            self.mse_null,
            self.div,
            self.end_step,
            *self.agg.values(),
            self.sam_stack,
            self.xstart_h,
            self.xstart_null,
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _OnlineAccumulator:
    """Streams per-step predictions into ForwardResult statistics (see ForwardResult for the fields)."""

    def __init__(
        self,
        x0_sel: Tensor,
        n_w: int,
        steps: int,
        subset_interval: int,
        keep_sam_stack: bool,
        keep_xstarts: bool,
        sam_scale: Tensor | None = None,
        sam_mode: str = "default",
    ):
        b, m, h, w = x0_sel.shape
        self.sam_mode = sam_mode
        self.sam_scale = None if sam_scale is None else sam_scale.to(x0_sel.device)
        dev = x0_sel.device
        self.x0 = x0_sel.float()
        self.interval = int(subset_interval)
        self.mse_h = torch.zeros(b, n_w, steps, m, device=dev)
        self.mse_null = torch.zeros(b, steps, m, device=dev)
        self.div = torch.zeros(b, n_w, steps, m, device=dev)
        self.best = torch.full((b, n_w, m), -float("inf"), device=dev)
        self.end_step = torch.zeros(b, n_w, m, dtype=torch.long, device=dev)
        shape = (b, n_w, m, h, w)
        self.run_sum = torch.zeros(shape, device=dev)
        names = ["sum_incl", "sum_excl", "sam_te", "sam_prev"] + (["grid_excl"] if self.interval > 0 else [])
        self.agg = {k: torch.zeros(shape, device=dev) for k in names}
        self.grid_sum = torch.zeros(shape, device=dev) if self.interval > 0 else None
        self.prev_sam: Tensor | None = None
        self.steps_run = steps
        stack_dtype = torch.float32 if sam_mode == "gradient" else torch.float16
        self.sam_stack = (
            torch.zeros(b, n_w, steps, m, h, w, dtype=stack_dtype, device=dev) if keep_sam_stack else None
        )
        self.xstart_h = torch.zeros(b, n_w, steps, m, h, w, device=dev) if keep_xstarts else None
        self.xstart_null = torch.zeros(b, steps, m, h, w, device=dev) if keep_xstarts else None

    def update(self, t: int, xh: Tensor, xn: Tensor) -> None:
        """Record step t. xh [B, nW, M, H, W] HGPs (selected modalities), xn [B, M, H, W] UGP."""
        xh, xn = xh.float(), xn.float()
        sam = (xh - self.x0[:, None]) ** 2
        self.mse_h[:, :, t] = sam.mean(dim=(-2, -1))
        self.mse_null[:, t] = ((xn - self.x0) ** 2).mean(dim=(-2, -1))
        guide = (xh - xn[:, None]) ** 2
        d = guide.mean(dim=(-2, -1))
        if self.sam_scale is not None:
            sam = guide * self.sam_scale[t][None, :, None, None, None]
        self.div[:, :, t] = d
        new = d > self.best
        self.best = torch.where(new, d, self.best)
        self.end_step = torch.where(new, torch.full_like(self.end_step, t), self.end_step)
        nm = new[..., None, None]
        prev = sam if self.prev_sam is None else self.prev_sam
        self.agg["sum_excl"] = torch.where(nm, self.run_sum, self.agg["sum_excl"])
        self.run_sum += sam
        self.agg["sum_incl"] = torch.where(nm, self.run_sum, self.agg["sum_incl"])
        self.agg["sam_te"] = torch.where(nm, sam, self.agg["sam_te"])
        self.agg["sam_prev"] = torch.where(nm, prev, self.agg["sam_prev"])
        if self.grid_sum is not None:
            self.agg["grid_excl"] = torch.where(nm, self.grid_sum, self.agg["grid_excl"])
            if t % self.interval == 0:
                self.grid_sum += sam
        self.prev_sam = sam
        if self.sam_stack is not None:
            self.sam_stack[:, :, t] = sam.to(self.sam_stack.dtype)
        if self.xstart_h is not None:
            self.xstart_h[:, :, t] = xh
            self.xstart_null[:, t] = xn

    def settled(self, t: int, patience: int) -> bool:
        """True when every M_t has stayed below its running maximum for >= ``patience`` steps at step t."""
        return bool((t - self.end_step >= patience).all())

    def hold_from(self, t: int) -> None:
        """Early stop after step t - 1: steps t.. hold the last computed mse/div values."""
        self.steps_run = t
        self.mse_h[:, :, t:] = self.mse_h[:, :, t - 1 : t]
        self.mse_null[:, t:] = self.mse_null[:, t - 1 : t]
        self.div[:, :, t:] = self.div[:, :, t - 1 : t]

    def result(self, ws: list[float], modality: list[int], calls: int, sizes: list[int]) -> ForwardResult:
        return ForwardResult(
            ws=ws,
            modality=modality,
            mse_h=self.mse_h,
            mse_null=self.mse_null,
            div=self.div,
            end_step=self.end_step,
            agg=self.agg,
            subset_interval=self.interval,
            sam_stack=self.sam_stack,
            xstart_h=self.xstart_h,
            xstart_null=self.xstart_null,
            calls=calls,
            samples_per_call=sizes,
            steps_run=self.steps_run,
            sam_mode=self.sam_mode,
        )


def forward_result_from_stacks(
    x0_sel: Tensor,
    xstart_h: Tensor,
    xstart_null: Tensor,
    ws: Sequence[float],
    modality: Sequence[int] | None = None,
    subset_interval: int = -1,
    keep_sam_stack: bool = False,
    sam_scale: Tensor | None = None,
    sam_mode: str = "default",
) -> ForwardResult:
    """ForwardResult from given x̂ sequences (hand-made or from the upstream pattern).

    x0_sel [B, M, H, W] (already restricted to the modalities), xstart_h [B, nW, S, M, H, W] (or
    [B, S, M, H, W] for one w), xstart_null [B, S, M, H, W]; sam_scale [S, nW] from gradient_sam_scale
    (with its sam_mode) for the gradient-SAM ablation.
    """
    if xstart_h.dim() == 5:
        xstart_h = xstart_h[:, None]
    if xstart_h.dim() != 6 or xstart_null.dim() != 5:
        raise ValueError(
            f"xstart_h must be [B, nW, S, M, H, W] and xstart_null [B, S, M, H, W], got "
            f"{tuple(xstart_h.shape)} and {tuple(xstart_null.shape)}"
        )
    b, n_w, steps = xstart_h.shape[:3]
    if len(ws) != n_w:
        raise ValueError(f"ws has {len(ws)} entries but xstart_h holds {n_w} guidance strengths")
    if (sam_scale is None) != (sam_mode == "default"):
        raise ValueError(f"sam_mode={sam_mode!r} needs a sam_scale from gradient_sam_scale (and only then)")
    acc = _OnlineAccumulator(
        x0_sel, n_w, steps, subset_interval, keep_sam_stack, False, sam_scale=sam_scale, sam_mode=sam_mode
    )
    for t in range(steps):
        acc.update(t, xstart_h[:, :, t], xstart_null[:, t])
    mods = list(modality) if modality is not None else list(range(x0_sel.shape[1]))
    return acc.result([float(w) for w in ws], mods, 0, [])


def select_channels(x: Tensor, channels: Sequence[int]) -> Tensor:
    """x[:, channels] for x [B, C, ...] built from slices, with no index tensor.

    Indexing with a Python list makes a host index tensor that CUDA must upload (a blocking copy, one
    per call); narrow slices joined by one ``cat`` stay on the device. Same values as ``x[:, channels]``.
    """
    parts = [x.narrow(1, int(c), 1) for c in channels]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _check_args(
    model: Callable,
    diffusion,
    x0: Tensor,
    ws: Sequence[float],
    modality: Sequence[int],
    forward_steps: int,
    encoding: str,
    ugp: str,
    call_pattern: str,
) -> list[float]:
    if x0.dim() != 4:
        raise ValueError(f"x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
    if isinstance(ws, (int, float)):
        ws = [ws]
    ws = [float(w) for w in ws]
    if not ws or any(w != w or w in (float("inf"), -float("inf")) for w in ws):
        raise ValueError(f"ws must be a non-empty list of finite guidance strengths (--w), got {ws}")
    if not modality or any(not 0 <= int(m) < x0.shape[1] for m in modality):
        raise ValueError(
            f"modality {list(modality)} must be a non-empty list of channel indices in "
            f"[0, {x0.shape[1] - 1}] (--modality)"
        )
    if not 1 <= forward_steps <= diffusion.num_timesteps - 1:
        raise ValueError(
            f"forward_steps must be in [1, {diffusion.num_timesteps - 1}] (the diffusion has "
            f"{diffusion.num_timesteps} steps), got {forward_steps}"
        )
    for name, value, allowed in (
        ("encoding", encoding, ENCODINGS),
        ("ugp", ugp, UGP_MODES),
        ("call_pattern", call_pattern, CALL_PATTERNS),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")
    net = getattr(model, "module", model)
    if getattr(net, "num_classes", 1) is None:
        raise ValueError(
            "the AnoFPDM forward process needs a class-conditional (classifier-free) model: "
            "build it with --num_classes 2"
        )
    return ws


def _invert(diffusion, x: Tensor, t: Tensor, eps_null: Tensor, clip: bool) -> Tensor:
    """DDIM encoding step with index t: x̂0 from eps_null (clipped), eps recomputed, -> level t+1."""
    pred = diffusion.predict_xstart_from_eps(x, t, eps_null)
    if clip:
        pred = pred.clamp(-1.0, 1.0)
    eps = diffusion.predict_eps_from_xstart(x, t, pred)
    abar_next = diffusion._extract(diffusion.alphas_cumprod_next, t, x)
    return pred * torch.sqrt(abar_next) + torch.sqrt(1.0 - abar_next) * eps


@torch.no_grad()
def run_forward_process(
    model: Callable[..., Tensor],
    diffusion,
    x0: Tensor,
    *,
    ws: Sequence[float],
    modality: Sequence[int],
    forward_steps: int,
    encoding: str = "ddim",
    ugp: str = "null",
    legacy_indexing: bool = False,
    clip_denoised: bool = True,
    dynamic_clip: bool = False,
    generator: GeneratorLike = None,
    subset_interval: int = -1,
    keep_sam_stack: bool = False,
    keep_xstarts: bool = False,
    call_pattern: str = "batched",
    progress: bool = False,
    precision: str = "fp32",
    early_stop_patience: int = 0,
    sam_mode: str = "default",
    legacy_gradient_schedule: bool = False,
) -> ForwardResult:
    """Run the AnoFPDM forward process on x0 [B, C, H, W] for every w in ``ws``.

    Args:
        model: classifier-free-guided network ``model(x, t, y=..., null=BoolTensor[B])``.
        diffusion: GaussianDiffusion/SpacedDiffusion (t are indices into its schedule; its wrapper maps them).
        ws: guidance strengths served by the same pass (HGP per w from the same eps_y, eps_null).
        modality: channel indices kept for the statistics (e.g. [0, 3]).
        forward_steps: S, steps t = 0 .. S-1.
        encoding: "ddim" (deterministic inversion from x_0' = q_sample(x0, 0)) or "ddpm"
            (x_t = q_sample(x0, t) with fresh noise every step).
        ugp: "null" (paper Eq. 10) or "healthy_w0" (upstream: UGP from eps_y).
        legacy_indexing: upstream's off-by-one inversion (the latent used at step t >= 1 has level t+1); the
            next step's inversion call (null, index t+1, same latent) is batched with this step's predictions.
        clip_denoised / dynamic_clip: clamp x̂0 to [-1, 1] / apply clamp_to_spatial_quantile first (HGP/UGP).
        generator: torch.Generator or one per sample, for the x_0' and DDPM noise.
        subset_interval: k > 0 also tracks the every-k-th-step aggregate; keep_sam_stack: float16 SAM stack
            [B, nW, S, M, H, W] (2 bytes per element, needed for t_e_ratio != 1);
            keep_xstarts: float32 x̂ stacks.
        call_pattern: "batched" (1 call per step on 2B, or 3B with legacy_indexing) or "upstream" (4 separate
            calls per step and float32 stacks kept, for benchmarks; same x̂ sequences).
        progress: tqdm bar over steps.
        precision: "fp32", "bf16" or "fp16" for the network calls only (autocast); the predictions are
            cast back to fp32 and the statistics, the DDIM inversion and the accumulators stay fp32.
        early_stop_patience: K > 0 stops the pass once every tracked M_t (each sample, w and modality)
            has stayed below its running maximum for at least K steps; checked every K steps (one
            host synchronisation per K steps). The remaining steps' mse/div entries hold the last computed
            values and ``steps_run`` says how many steps ran. Changes results (t_e is an argmax over all
            S steps and the image-level cosine uses whole curves): off (0) by default.
        sam_mode: "default", or the gradient-SAM ablation "gradient" / "gradient_para" (sam_mode_from_flags);
            legacy_gradient_schedule: B_t from upstream's hard-coded linear schedule (see gradient_sam_scale).
    """
    check_precision(precision)
    if early_stop_patience < 0:
        raise ValueError(f"early_stop_patience must be >= 0 (0 = off), got {early_stop_patience}")
    ws = _check_args(model, diffusion, x0, ws, modality, forward_steps, encoding, ugp, call_pattern)
    modality = [int(m) for m in modality]
    upstream = call_pattern == "upstream"
    b, dev = x0.shape[0], x0.device
    scale = gradient_sam_scale(
        diffusion, forward_steps, ws, sam_mode=sam_mode, legacy_schedule=legacy_gradient_schedule
    )
    acc = _OnlineAccumulator(
        select_channels(x0, modality),
        len(ws),
        forward_steps,
        subset_interval,
        keep_sam_stack,
        keep_xstarts or upstream,
        sam_scale=scale,
        sam_mode=sam_mode,
    )
    sizes: list[int] = []

    def call(x: Tensor, t: Tensor, null: Tensor) -> Tensor:
        sizes.append(int(x.shape[0]))
        y = torch.zeros(x.shape[0], dtype=torch.long, device=dev)
        with autocast(dev, precision):
            eps = diffusion.model_eps(model, x, t, model_kwargs={"y": y, "null": null})["eps"]
        return eps.float()

    def flags(*halves: bool) -> Tensor:
        return torch.cat([torch.full((b,), h, dtype=torch.bool, device=dev) for h in halves])

    def x0_pred(x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        pred = diffusion.predict_xstart_from_eps(x, t, eps)
        if dynamic_clip:
            pred = clamp_to_spatial_quantile(pred)
        return pred.clamp(-1.0, 1.0) if clip_denoised else pred

    ddim = encoding == "ddim"
    x = (
        diffusion.q_sample(
            x0, torch.zeros(b, dtype=torch.long, device=dev), noise=sample_noise(x0, generator)
        )
        if ddim
        else None
    )
    for t in tqdm(range(forward_steps), disable=not progress, leave=False, desc="forward steps"):
        tt = torch.full((b,), t, dtype=torch.long, device=dev)
        if not ddim:
            x = diffusion.q_sample(x0, tt, noise=sample_noise(x0, generator))
        eps_next = None
        if upstream:
            if ddim and legacy_indexing and t >= 1:
                x = _invert(diffusion, x, tt, call(x, tt, flags(True)), clip_denoised)
            eps_y, eps_n = call(x, tt, flags(False)), call(x, tt, flags(True))
            eps_u = call(x, tt, flags(ugp == "null"))
        else:
            nxt = ddim and legacy_indexing and t + 1 < forward_steps
            xs, ts = [x, x], [tt, tt]
            if nxt:
                xs.append(x)
                ts.append(tt + 1)
            eps = call(torch.cat(xs), torch.cat(ts), flags(False, True, *([True] if nxt else [])))
            eps_y, eps_n = eps[:b], eps[b : 2 * b]
            eps_next = eps[2 * b :] if nxt else None
            eps_u = eps_n if ugp == "null" else eps_y
        xm, ey, en = (select_channels(v, modality) for v in (x, eps_y, eps_n))
        hgp = torch.stack([x0_pred(xm, tt, guided_eps(ey, en, w)) for w in ws], dim=1)
        acc.update(t, hgp, x0_pred(xm, tt, select_channels(eps_u, modality)))
        if early_stop_patience and (t + 1) % early_stop_patience == 0 and acc.settled(t, early_stop_patience):
            acc.hold_from(t + 1)
            break
        if not ddim or t + 1 >= forward_steps:
            continue
        if legacy_indexing:
            if not upstream:
                x = _invert(diffusion, x, tt + 1, eps_next, clip_denoised)
        elif upstream:
            x = _invert(diffusion, x, tt, call(x, tt, flags(True)), clip_denoised)
        else:
            x = _invert(diffusion, x, tt, eps_n, clip_denoised)
    return acc.result(ws, modality, len(sizes), sizes)
