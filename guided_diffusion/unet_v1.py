"""The guided-diffusion UNet (``unet_ver v1``, upstream ``guided_diffusion/unet_v1.py``).

The network the paper uses for its comparison models (AnoDDPM, the classifier-guided DDIM model). It
differs from the FPDM UNet (unet.py) in: standard ResBlocks (SiLU in both branches and the output head),
optional ResBlock up/down-sampling (``resblock_updown``), optional "new" attention head order
(``use_new_attention_order``), no classifier-free condition tokens (no ``encoder_kv``), and the class
embedding ``label_emb`` (Embedding(num_classes, 4*mc)) added to the timestep embedding. State-dict keys
follow upstream (``time_embed.0``, ``label_emb``, ``input_blocks.N.0.in_layers...``, ``out.2``...).
The blocks (ResBlock, AttentionBlock, Downsample, Upsample) are unet.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from guided_diffusion.nn import (
    attention_channels_first,
    checks_on_host,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)
from guided_diffusion.registry import register_model
from guided_diffusion.unet import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    UNetModel,
    Upsample,
)


class AttentionBlockV1(AttentionBlock):
    """Self-attention without condition tokens; ``new_order`` splits q, k, v before the heads
    (upstream QKVAttention) instead of the legacy heads-first split. Same parameters and keys."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, new_order: bool = False):
        super().__init__(channels, num_heads=num_heads, num_head_channels=num_head_channels,
                         encoder_channels=None, use_checkpoint=use_checkpoint)
        self.new_order = new_order

    def _forward(self, x: torch.Tensor, cond_tokens: torch.Tensor | None) -> torch.Tensor:
        if not self.new_order:
            return super()._forward(x, cond_tokens)
        b, c, *spatial = x.shape
        xf = x.reshape(b, c, -1)
        q, k, v = (z.reshape(b, self.num_heads, c // self.num_heads, -1)
                   for z in self.qkv(self.norm(xf)).chunk(3, dim=1))
        a = attention_channels_first(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, -1)
        return (xf + self.proj_out(a)).reshape(b, c, *spatial)


class ResBlockV1(ResBlock):
    """Standard ResBlock that can also resample (``up`` / ``down``): the input branch is resampled
    between its SiLU and its conv, the skip branch before the skip connection (no extra parameters)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False, dims: int = 2,
                 up: bool = False, down: bool = False):
        super().__init__(channels, emb_channels, dropout, out_channels=out_channels,
                         use_scale_shift_norm=use_scale_shift_norm, use_checkpoint=use_checkpoint,
                         use_activation=True, dims=dims)
        if up:
            self.h_upd: nn.Module = Upsample(channels, False, dims)
            self.x_upd: nn.Module = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.updown = up or down

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not self.updown:
            return super()._forward(x, emb)
        h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x)))
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def build_encoder(*, in_channels: int, model_channels: int, num_res_blocks: int, attention_resolutions: set,
                  dropout: float, channel_mult: Sequence[float], conv_resample: bool, dims: int,
                  use_checkpoint: bool, num_heads: int, num_head_channels: int, use_scale_shift_norm: bool,
                  resblock_updown: bool, use_new_attention_order: bool
                  ) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int], int, int]:
    """Encoder half shared by UNetV1 and the classifier: (input_blocks, middle_block, skip widths,
    final width, final downsample factor)."""
    emb_dim = 4 * model_channels

    def res(ch_in: int, ch_out: int, **kw) -> ResBlockV1:
        return ResBlockV1(ch_in, emb_dim, dropout, out_channels=ch_out, dims=dims,
                          use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

    def attn(ch: int) -> AttentionBlockV1:
        return AttentionBlockV1(ch, num_heads=num_heads, num_head_channels=num_head_channels,
                                use_checkpoint=use_checkpoint, new_order=use_new_attention_order)

    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    skips, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attn(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            skips.append(ch)
        if level != len(channel_mult) - 1:
            down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims)
            blocks.append(TimestepEmbedSequential(down))
            skips.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
    return blocks, middle, skips, ch, ds


class UNetV1(UNetModel):
    """guided-diffusion UNet; arguments as UNetModel's plus ``resblock_updown`` and
    ``use_new_attention_order`` (``num_classes`` adds ``label_emb``; learn_sigma is out_channels = 2C).

    forward(x [B, in_channels, H, W], timesteps [B], y LongTensor [B] or None) -> [B, out_channels, H, W].
    Inherits UNetModel's input checks; its own layers are built here (UNetModel.__init__ is not run).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        nn.Module.__init__(self)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_res_blocks, self.dims = model_channels, num_res_blocks, dims
        self.attention_resolutions = set(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        self.input_blocks, self.middle_block, skips, ch, ds = build_encoder(
            in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=self.attention_resolutions, dropout=dropout, channel_mult=self.channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        self.output_blocks = nn.ModuleList([])

        def res(ch_in: int, ch_out: int, up: bool = False) -> ResBlockV1:
            return ResBlockV1(ch_in, emb_dim, dropout, out_channels=ch_out, dims=dims, up=up,
                              use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)

        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [res(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlockV1(
                        ch, num_heads=heads_up, num_head_channels=num_head_channels,
                        use_checkpoint=use_checkpoint, new_order=use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        input_ch = int(self.channel_mult[0] * model_channels)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                null: bool | torch.Tensor = False, threshold: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, in_channels, H, W], [B] (, y [B]) -> [B, out_channels, H, W] in x's dtype.

        ``null`` / ``threshold`` / ``generator`` exist for the shared training and sampling code: v1 has
        no null condition, so any null row or a label-dropout threshold > 0 is a ValueError.
        """
        if not isinstance(null, bool):  # a null tensor on an accelerator is not read (issue 11)
            null = torch.as_tensor(null)
            null = checks_on_host(null) and bool(null.any())
        if null or threshold > 0:
            raise ValueError("--unet_ver v1 has no classifier-free null condition (null=True or label "
                             "dropout --threshold > 0); use a classifier-free model (e.g. --unet_ver v2)")
        timesteps = self._check_input(x, timesteps)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError(f"this model is class-conditional (num_classes={self.num_classes}): pass "
                                 "class labels y [B] (--unet_ver v1 has no null condition)")
            y = torch.as_tensor(y, device=x.device)
            if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
                raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}]; got {y.dtype} "
                                 f"{tuple(y.shape)}")
            if x.shape[0] and checks_on_host(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"y has labels in [{int(y.min())}, {int(y.max())}] but the model has "
                                 f"num_classes={self.num_classes} (valid labels 0..{self.num_classes - 1})")
            emb = emb + self.label_emb(y.long())
        elif y is not None:
            raise ValueError("y was given but this model is unconditional (num_classes=None; --unet_ver v1)")
        hs, h = [], x.to(dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


@register_model("v1")
def build_unet_v1(*, resblock_updown: bool = False, use_new_attention_order: bool = False,
                  **kwargs: Any) -> UNetV1:
    """Registry builder for ``unet_ver v1``; its options (keyword-only) are ``resblock_updown`` and
    ``use_new_attention_order``, the other keywords are ``UNetV1``'s."""
    return UNetV1(resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order, **kwargs)

