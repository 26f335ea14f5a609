"""The noise-aware classifier of the classifier-guided baseline (Wolleb et al. 2022; guided-diffusion's
``EncoderUNetModel``): the UNet's encoder half and middle block, then a pooling head to class logits.

Upstream trains it with ``config/run_train_brats_clf.sh``: depth 2, width 128, attention pooling,
ResBlock up/down-sampling, scale-shift norm, attention at 32,16,8 (``classifier_defaults``). Keys follow
upstream (``time_embed.*``, ``input_blocks.*``, ``middle_block.*``, ``out.2.positional_embedding``...).
``classifier_loss`` is one training step's loss: x_t = q_sample(x_0, t) at uniform random t, then
cross-entropy of the logits at (x_t, t) against the image-level labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guided_diffusion.nn import linear, normalization, timestep_embedding, zero_module
from guided_diffusion.script_util import attention_downsample_factors, parse_channel_mult
from guided_diffusion.unet import UNetModel
from guided_diffusion.unet_v1 import build_encoder


def classifier_defaults() -> dict[str, Any]:
    """Upstream's classifier flags (guided-diffusion names; run_train_brats_clf.sh values)."""
    return dict(image_size=128, classifier_width=128, classifier_depth=2,
                classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                classifier_resblock_updown=True, classifier_pool="attention", in_channels=4, num_classes=2,
                classifier_channel_mult="", classifier_num_head_channels=64)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token (plus a learned position embedding per token) attends
    to all HW tokens; returns its output projected to ``output_dim``. [B, C, S, S] -> [B, output_dim]."""

    def __init__(self, spatial: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        if num_head_channels < 1 or embed_dim % num_head_channels:
            raise ValueError(f"attention pooling: num_head_channels={num_head_channels} must divide the "
                             f"width {embed_dim}")
        self.spatial = spatial
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        if tuple(spatial) != (self.spatial, self.spatial):
            raise ValueError(f"attention pooling was built for {self.spatial}x{self.spatial} features, got "
                             f"{tuple(spatial)}: the classifier's image_size must match the data")
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = (z.reshape(b, self.num_heads, c // self.num_heads, -1).transpose(-1, -2)
                   for z in self.qkv_proj(x).chunk(3, dim=1))  # "new" order: split q, k, v, then heads
        a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return self.c_proj(a)[:, :, 0]


class EncoderUNetModel(UNetModel):
    """Timestep-conditioned encoder classifier: forward(x [B, C, H, W], timesteps [B]) -> logits [B, K].

    Args as UNetModel's (``out_channels`` = number of classes K) plus ``resblock_updown``,
    ``use_new_attention_order`` and ``pool`` ("attention" or "adaptive" = global average + zero 1x1 conv).
    Reuses UNetModel's input checks; UNetModel.__init__ is not run.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, num_heads: int = 1, num_head_channels: int = 64,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 use_new_attention_order: bool = False, pool: str = "attention"):
        nn.Module.__init__(self)
        if pool not in ("attention", "adaptive"):
            raise ValueError(f"--classifier_pool {pool!r}: expected 'attention' or 'adaptive'")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.dims, self.channel_mult = model_channels, dims, tuple(channel_mult)
        self.num_classes = None
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        self.input_blocks, self.middle_block, _, ch, ds = build_encoder(
            in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=set(attention_resolutions), dropout=dropout, channel_mult=self.channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        if pool == "attention":
            head: nn.Module = AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), head)
        else:
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(nn.Conv2d(ch, out_channels, 1)), nn.Flatten())

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:  # type: ignore[override]
        timesteps = self._check_input(x, timesteps)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        h = x.to(dtype)
        for module in self.input_blocks:
            h = module(h, emb)
        return self.out(self.middle_block(h, emb)).float()


def create_classifier(image_size: int, classifier_width: int, classifier_depth: int,
                      classifier_attention_resolutions: str, classifier_use_scale_shift_norm: bool,
                      classifier_resblock_updown: bool, classifier_pool: str, in_channels: int,
                      num_classes: int = 2, classifier_channel_mult: str = "",
                      classifier_num_head_channels: int = 64) -> EncoderUNetModel:
    """Build the classifier from upstream-named flags (channel_mult "" = the UNet's per-size default)."""

    if num_classes < 2:
        raise ValueError(f"--num_classes must be >= 2 for the classifier, got {num_classes}")
    return EncoderUNetModel(
        image_size=image_size, in_channels=in_channels, model_channels=classifier_width,
        out_channels=num_classes, num_res_blocks=classifier_depth,
        attention_resolutions=attention_downsample_factors(image_size, classifier_attention_resolutions),
        channel_mult=parse_channel_mult(image_size, classifier_channel_mult),
        num_head_channels=classifier_num_head_channels, use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown, pool=classifier_pool)


def classifier_loss(classifier: nn.Module, diffusion: Any, x_start: Tensor, labels: Tensor,
                    generator: torch.Generator | None = None, noised: bool = True) -> dict[str, Tensor]:
    """One noise-aware training step's loss on a batch.

    x_start [B, C, H, W] in [-1, 1]; labels LongTensor [B] (image-level, 0 = healthy). With ``noised``,
    t ~ U{0..T-1} and x_t = q_sample(x_start, t) (both drawn from ``generator``); else t = 0 and x_0.
    Returns {"loss": mean cross-entropy (scalar), "acc": accuracy (scalar), "t": [B]}.
    """
    labels = torch.as_tensor(labels, device=x_start.device)
    if labels.shape != (x_start.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape [{x_start.shape[0]}]; got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    b = x_start.shape[0]
    gen_device = generator.device if generator is not None else x_start.device
    if noised:
        t = torch.randint(0, diffusion.num_timesteps, (b,), generator=generator, device=gen_device)
        t = t.to(x_start.device)
        x_t = diffusion.q_sample(x_start, t, generator=generator)
    else:
        t = torch.zeros(b, dtype=torch.long, device=x_start.device)
        x_t = x_start
    logits = diffusion._wrap_model(classifier)(x_t, t)
    loss = F.cross_entropy(logits, labels.long())
    acc = (logits.argmax(dim=-1) == labels).float().mean()
    return {"loss": loss, "acc": acc.detach(), "t": t}


def classifier_log_prob_grad(classifier: nn.Module, diffusion: Any, x: Tensor, t: Tensor,
                             target: Tensor) -> Tensor:
    """grad_x log p(target | x_t, t) [B, C, H, W] (the network sees the diffusion's mapped timesteps)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logp = F.log_softmax(diffusion._wrap_model(classifier)(x_in, t), dim=-1)
        picked = logp[torch.arange(x.shape[0], device=x.device), target.long()]
        return torch.autograd.grad(picked.sum(), x_in)[0]
