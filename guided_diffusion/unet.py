"""UNet skeleton shared by the FPDM UNet (``unet_ver v2``) and the HAE family.

The FPDM network is ``UNetModel(..., resblock_activation=False)``: it reproduces the upstream AnoFPDM
UNet, including its missing SiLU activations (ResBlock input branch and output head) and the
classifier-free condition tokens fed to every attention block (docs/method.md, 'Network';
docs/method.md, 'Classifier-free conditioning').
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.nn import (
    attention_channels_first,
    avg_pool_nd,
    checkpoint,
    checks_on_host,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument: ``forward(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that routes extra inputs: TimestepBlocks get ``(x, emb)``, AttentionBlocks get
    ``(x, cond_tokens)``, every other layer gets ``x``."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, cond_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, cond_tokens)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (key ``conv``).

    Shapes: [B, C, H, W] -> [B, C_out, 2H, 2W] (for dims=3 only the inner two axes are doubled)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``) or 2x2 average pooling. [B, C, H, W] -> [B, C_out, H/2, W/2]."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a conv cannot change the channel count")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    Args:
        channels: input channels C_in.
        emb_channels: width of the embedding ``emb`` [B, emb_channels].
        dropout: dropout probability before the last conv.
        out_channels: output channels (default C_in); a 1x1 conv skip is used when they differ.
        use_scale_shift_norm: FiLM conditioning ``norm(h) * (1 + scale) + shift`` instead of ``h + emb``.
        use_checkpoint: recompute activations in the backward pass.
        use_activation: True = standard block (SiLU after both norms). False = upstream FPDM block:
            no SiLU in the input branch, and SiLU after the output norm only with scale-shift norm.
    Shapes: x [B, C_in, H, W], emb [B, emb_channels] -> [B, C_out, H, W].
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        use_activation: bool = True,
        dims: int = 2,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        out_act = use_activation or use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU() if use_activation else nn.Identity(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU() if out_act else nn.Identity(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, with optional classifier-free condition tokens.

    Args:
        channels: C; heads = ``num_heads`` or ``C // num_head_channels`` when that is not -1.
        encoder_channels: width E of the condition vector; creates ``encoder_kv`` (Conv1d E -> 2C).
        use_checkpoint: recompute activations in the backward pass.
    forward(x, cond_tokens): x [B, C, *spatial]; cond_tokens None or the condition vector c [B, E].
    With c, the E condition tokens (token j = encoder_kv applied to the column c_j * c of the outer
    product c ⊗ c) are prepended to the keys and values of the HW spatial tokens. Returns x's shape.
    Upstream ("legacy") head layout: qkv [B, 3C, T] is viewed [B*heads, 3d, T] then split into q, k, v.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        encoder_channels: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} must divide the attention width {channels}"
                )
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be >= 1 and divide the attention width {channels}"
            )
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, 3 * channels, 1)
        self.encoder_kv = conv_nd(1, encoder_channels, 2 * channels, 1) if encoder_channels else None
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor, cond_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, x, cond_tokens, enabled=self.use_checkpoint)

    def condition_kv(self, cond: torch.Tensor) -> torch.Tensor:
        """Keys/values of the condition tokens: [B, E] -> [B, 2C, E].

        Upstream applies encoder_kv (weight W [2C, E], bias b) to the outer product M = c ⊗ c
        (M[i, j] = c_i c_j, E channels x E tokens): out[:, j] = W M[:, j] + b = c_j (W c) + b.
        We compute the right-hand side, never materialising the E x E outer product.
        """
        if self.encoder_kv is None:
            raise ValueError("cond_tokens given to an AttentionBlock built without encoder_channels")
        weight = self.encoder_kv.weight[..., 0]
        wc = F.linear(cond, weight)  # [B, 2C]
        bias = self.encoder_kv.bias.to(wc.dtype)
        return wc[:, :, None] * cond[:, None, :].to(wc.dtype) + bias[None, :, None]

    def _forward(self, x: torch.Tensor, cond_tokens: torch.Tensor | None) -> torch.Tensor:
        b, c, *spatial = x.shape
        heads, d = self.num_heads, c // self.num_heads
        xf = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(xf))  # [B, 3C, T]
        q, k, v = qkv.reshape(b, heads, 3 * d, -1).split(d, dim=2)  # each [B, heads, d, T]
        if cond_tokens is not None:
            ekv = self.condition_kv(cond_tokens).to(q.dtype)  # [B, 2C, E]
            ek, ev = ekv.reshape(b, heads, 2 * d, -1).split(d, dim=2)  # each [B, heads, d, E]
            k = torch.cat([ek, k], dim=-1)
            v = torch.cat([ev, v], dim=-1)
        # softmax(q^T k / sqrt(d)) v, on [B, heads, tokens, d]
        a = attention_channels_first(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, -1)
        return (xf + self.proj_out(a)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """Timestep- and (optionally) class-conditional UNet (OpenAI guided-diffusion layout).

    Args:
        image_size: nominal input side (stored; other sides that are multiples of
            2**(len(channel_mult)-1) also work).
        in_channels / out_channels: image channels in / predicted channels out.
        model_channels: base width mc; the timestep/class embedding width is 4*mc.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        attention_resolutions: downsample factors ds (1, 2, 4, ...) whose levels get attention.
        channel_mult: width multiplier per level.
        num_classes: None (unconditional) or the number of classes (classifier-free layers).
        num_heads / num_head_channels / num_heads_upsample: attention heads (-1 upsample = num_heads).
        use_scale_shift_norm: FiLM ResBlocks.
        resblock_activation: False = upstream FPDM (missing SiLUs); True = standard blocks (HAE).
        encoder_channels: width of the condition vector (default 4*mc); every AttentionBlock gets an
            ``encoder_kv`` layer even when the model is unconditional (as upstream).
        decoder_block: optional ``fn(channels, level) -> TimestepBlock | None``; the returned block is
            inserted in the last output block of every decoder level except level 0, right before its
            Upsample.
    forward(x [B, in_channels, H, W], timesteps [B]) -> [B, out_channels, H, W]; see ``forward``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_activation: bool = False,
        encoder_channels: int | None = None,
        decoder_block: Callable[[int, int], nn.Module | None] | None = None,
    ):
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = set(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.dims = dims
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_dim = model_channels * 4
        self.encoder_channels = encoder_channels or emb_dim

        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, model_channels)
            self.class_emb = nn.Sequential(
                linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim)
            )

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out, dims=dims,
                            use_scale_shift_norm=use_scale_shift_norm, use_checkpoint=use_checkpoint,
                            use_activation=resblock_activation)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  encoder_channels=self.encoder_channels, use_checkpoint=use_checkpoint)

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    extra = decoder_block(ch, level) if decoder_block is not None else None
                    if extra is not None:
                        if not isinstance(extra, TimestepBlock):
                            raise ValueError(
                                f"decoder_block({ch}, {level}) returned {type(extra).__name__}; it must "
                                "return a TimestepBlock (called as block(h, emb)) or None"
                            )
                        layers.append(extra)
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU() if resblock_activation else nn.Identity(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    @property
    def size_multiple(self) -> int:
        """Every spatial side of the input must be a multiple of this (2**(len(channel_mult)-1))."""
        return 2 ** (len(self.channel_mult) - 1)

    def _check_input(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dims + 2:
            raise ValueError(f"tensor x must have shape [B, {self.in_channels}, H, W]; got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"tensor x has {x.shape[1]} channels but the model expects in_channels={self.in_channels}; "
                "check --in_channels against the data"
            )
        m = self.size_multiple
        bad = [s for s in x.shape[2:] if s % m]
        if bad:
            s = bad[0]
            raise ValueError(
                f"tensor x has spatial size {tuple(x.shape[2:])}; every side must be a multiple of {m} "
                f"(2**(len(channel_mult)-1) for channel_mult={self.channel_mult}), e.g. {max(m, s // m * m)} "
                f"or {(s // m + 1) * m} instead of {s}"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(
                f"timesteps must have shape [{x.shape[0]}] (one per sample); got {tuple(timesteps.shape)}"
            )
        return timesteps

    def _condition(
        self,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        y: torch.Tensor | None,
        null: bool | torch.Tensor,
        threshold: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Classifier-free condition vector c [B, 4*mc]; zero rows are the null condition."""
        assert self.num_classes is not None
        # No host-device synchronisation on an accelerator: a Python bool becomes a filled tensor, and the
        # label range is checked on the host only when y lives there (on CUDA an out-of-range label fails
        # in the embedding lookup instead).
        if isinstance(null, bool):
            null_mask = torch.full((batch,), null, device=device, dtype=torch.bool)
        else:
            null_mask = torch.as_tensor(null, device=device).to(torch.bool)
            if null_mask.ndim == 0:
                null_mask = null_mask.expand(batch)
        if null_mask.shape != (batch,):
            raise ValueError(
                f"null must be a bool or a bool tensor of shape [{batch}]; got {tuple(null_mask.shape)}"
            )
        if threshold > 1.0:
            raise ValueError(
                f"threshold (label-dropout probability) must be <= 1; got {threshold} "
                "(values <= 0, e.g. upstream's -1, mean no label dropout)"
            )
        if y is None:
            if not (null if isinstance(null, bool) else bool(null_mask.all())):
                raise ValueError(
                    f"this model is class-conditional (num_classes={self.num_classes}): pass class labels y "
                    "[B] or null=True for the null (unconditional) condition"
                )
            return torch.zeros(batch, self.model_channels * 4, device=device, dtype=dtype)
        y = torch.as_tensor(y, device=device)
        if y.shape != (batch,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(
                f"y must be an integer tensor of shape [{batch}]; got {y.dtype} {tuple(y.shape)}"
            )
        if batch and checks_on_host(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"y has labels in [{int(y.min())}, {int(y.max())}] but the model has "
                f"num_classes={self.num_classes} (valid labels 0..{self.num_classes - 1})"
            )
        c = self.class_emb(self.label_emb(y.long()))
        drop = null_mask
        if threshold > 0:
            gen_device = generator.device if generator is not None else device
            u = torch.rand(batch, generator=generator, device=gen_device).to(device)
            drop = drop | (u < threshold)
        return torch.where(drop[:, None], torch.zeros((), dtype=c.dtype, device=device), c)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        null: bool | torch.Tensor = False,
        threshold: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict the network output.

        Args:
            x: [B, in_channels, H, W].
            timesteps: [B] (int or float; a scalar is broadcast).
            y: LongTensor [B] of class labels (class-conditional models; optional where ``null`` is all True).
            null: bool or BoolTensor [B]; True rows use the null condition (c = 0).
            threshold: label-dropout probability (training): rows with u < threshold get c = 0,
                u = torch.rand(B, generator=generator). Values <= 0 (upstream's -1) mean no dropout
                and draw nothing.
            generator: optional torch.Generator for the label-dropout draw.
        Returns:
            [B, out_channels, H, W] in x's dtype.
        """
        timesteps = self._check_input(x, timesteps)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        cond = None
        if self.num_classes is not None:
            cond = self._condition(x.shape[0], x.device, emb.dtype, y, null, threshold, generator)
            emb = emb + cond.to(emb.dtype)
        elif y is not None:
            raise ValueError("y was given but this model is unconditional (num_classes=None); drop y or "
                             "build the model with class_cond=True and num_classes > 0")
        hs = []
        h = x.to(dtype)
        for module in self.input_blocks:
            h = module(h, emb, cond)
            hs.append(h)
        h = self.middle_block(h, emb, cond)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out(h).to(x.dtype)
