"""Shared machinery of the HAE UNet family (``hae``, ``hae_lite``, ``hae_v2``).

One implementation of the Multi-scale Sparse Transformer Block (MSTB) and of the hybrid
CNN-Transformer decoder block, parameterised by what differs between the three variants
(see docs/hae.md, 'Hybrid decoder block'; docs/hae.md, 'Multi-scale sparse attention'):

* regional tokens: per-patch ``Linear(C·p² → C)`` projection (``hae``) or average pooling of the
  shared-1×1-projected map (``hae_lite``/``hae_v2``);
* local 1×1 projection on (lite, v2) or off (``hae``);
* fusion of the two branches: concatenation + 1×1 conv 2C→C (``hae``) or average + 1×1 conv C→C;
* the token MLP (standard ``C→4C→C`` or the bottleneck ``C→⌊rC⌋→C`` of ``hae_v2``).

The "sparse" attention is a deterministic spatial-reduction attention: queries are the HW local
tokens, keys/values the regional tokens of the p=4 and p=8 scales; heads 0..3 see the p=4 tokens,
heads 4..7 the p=8 tokens.  Cost O(HW·(HW/16 + HW/64)·C); no L×L mask and no random numbers.

The variant modules only choose these options, one way for all three: each variant subclasses its
parent's MSTB, hybrid block and model classes (``hae`` -> ``hae_lite`` -> ``hae_v2``) and overrides class
attributes (``PATCH_EMBED``, ``LOCAL_PROJ``, ``FUSION``, ``MSTB``, ``HYBRID_BLOCK``) or the ``make_mlp``
hook; an option of its own is a keyword-only argument of its model class, handed to every hybrid block
through ``block_options``.  :class:`HAEUNetBase` wires the hybrid blocks into
:class:`guided_diffusion.unet.UNetModel` through its ``decoder_block`` hook.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.nn import checkpoint, conv_nd, linear, normalization, zero_module
from guided_diffusion.unet import TimestepBlock, UNetModel

PATCH_SIZES: tuple[int, ...] = (4, 8)
MSTB_HEADS = 8
MLP_EXPANSION = 4


def check_width(channels: int, num_heads: int = MSTB_HEADS, where: str = "MSTB") -> None:
    """Raise a clear ``ValueError`` when ``channels`` cannot be split into ``num_heads`` heads."""
    if channels <= 0 or channels % num_heads != 0:
        raise ValueError(
            f"{where}: channels={channels} must be a positive multiple of the {num_heads} attention heads "
            f"(head dim = channels/{num_heads}); choose num_channels/channel_mult so every decoder level "
            f"width mult*num_channels is divisible by {num_heads}."
        )


def check_bottleneck_ratio(bottleneck_ratio: float, channels: int | None = None) -> None:
    """Validate ``bottleneck_ratio`` ∈ (0, 1] (and ⌊r·C⌋ ≥ 1 when ``channels`` is given)."""
    try:
        r = float(bottleneck_ratio)
    except (TypeError, ValueError):
        raise ValueError(
            f"bottleneck_ratio={bottleneck_ratio!r} is not a number; pass a float in (0, 1], e.g. 0.25."
        ) from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise ValueError(
            f"bottleneck_ratio={bottleneck_ratio!r} is out of range: expected 0 < bottleneck_ratio <= 1 "
            "(hidden width of the HAE V2 bottleneck MLP = floor(ratio * channels)); e.g. 0.25."
        )
    if channels is not None and int(math.floor(r * channels)) < 1:
        raise ValueError(
            f"bottleneck_ratio={r} gives a zero-width bottleneck at channels={channels} "
            "(floor(ratio * channels) = 0); use a larger ratio."
        )


class TokenMLP(nn.Module):
    """Two-layer token MLP: ``Linear(C→hidden) → GELU → Dropout → Linear(hidden→C) → Dropout``.

    Input/output: tokens ``[..., C]``.
    """

    def __init__(self, channels: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"TokenMLP: hidden width must be >= 1, got {hidden} (channels={channels}).")
        self.channels = channels
        self.hidden = hidden
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, channels)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbedTokens(nn.Module):
    """Regional tokens of ``hae``: each non-overlapping p×p patch → ``Linear(C·p² → C)``.

    The flattened patch is ordered (channel, row, column), i.e. the order of ``F.unfold``; the
    projection is evaluated as a stride-p convolution with the Linear's weight (same result, no
    unfolded copy).  Sides that are not multiples of p are zero-padded at the bottom/right, so a
    partial patch still yields a token.  Input ``[B, C, H, W]`` → tokens ``[B, ⌈H/p⌉·⌈W/p⌉, C]``.
    """

    def __init__(self, channels: int, patch_size: int):
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.proj = nn.Linear(channels * patch_size * patch_size, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        weight = self.proj.weight.view(self.channels, self.channels, p, p)
        out = F.conv2d(x, weight, self.proj.bias, stride=p)
        return out.flatten(2).transpose(1, 2)


class PooledTokens(nn.Module):
    """Regional tokens of ``hae_lite``/``hae_v2``: p×p average pooling (no parameters).

    Ceil-mode pooling without padding: a partial patch at the border is the mean of its valid
    pixels.  Input ``[B, C, H, W]`` → tokens ``[B, ⌈H/p⌉·⌈W/p⌉, C]``.
    """

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        out = F.avg_pool2d(x, kernel_size=p, stride=p, ceil_mode=True)
        return out.flatten(2).transpose(1, 2)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention from HW query tokens to a few regional key/value token sets.

    Parameters are exactly those of ``nn.MultiheadAttention(C, heads)``: ``in_proj_weight``
    (3C×C), ``in_proj_bias`` (3C), ``out_proj`` (Linear C×C + bias).  The heads are split evenly
    between the token sets: with two sets and 8 heads, heads 0–3 attend to set 0 and heads 4–7 to
    set 1.  Only the key/value rows a set's heads use are projected for that set.

    Args (forward):
        queries: ``[B, L, C]`` (already normalised).
        regional: list of ``[B, N_s, C]`` (already normalised), one per head group.
    Returns ``[B, L, C]``.
    """

    def __init__(self, channels: int, num_heads: int = MSTB_HEADS, num_groups: int = len(PATCH_SIZES)):
        super().__init__()
        check_width(channels, num_heads)
        if num_heads % num_groups != 0:
            raise ValueError(
                f"SpatialReductionAttention: num_heads={num_heads} must be divisible by the number of "
                f"regional scales ({num_groups})."
            )
        self.channels = channels
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.head_dim = channels // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, queries: torch.Tensor, regional: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(regional) != self.num_groups:
            raise ValueError(
                f"SpatialReductionAttention: expected {self.num_groups} regional token sets, "
                f"got {len(regional)}."
            )
        b, length, c = queries.shape
        d = self.head_dim
        heads_per_group = self.num_heads // self.num_groups
        width = c // self.num_groups
        w_q, w_k, w_v = self.in_proj_weight.chunk(3, dim=0)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3, dim=0)
        q = F.linear(queries, w_q, b_q).view(b, length, self.num_heads, d).transpose(1, 2)
        outs = []
        for g, tokens in enumerate(regional):
            rows = slice(g * width, (g + 1) * width)
            n = tokens.shape[1]
            k = F.linear(tokens, w_k[rows], b_k[rows]).view(b, n, heads_per_group, d).transpose(1, 2)
            v = F.linear(tokens, w_v[rows], b_v[rows]).view(b, n, heads_per_group, d).transpose(1, 2)
            q_g = q[:, g * heads_per_group:(g + 1) * heads_per_group]
            outs.append(F.scaled_dot_product_attention(q_g, k, v, dropout_p=0.0))
        out = torch.cat(outs, dim=1).transpose(1, 2).reshape(b, length, c)
        return self.out_proj(out)


class MultiScaleSparseTransformerBlockBase(nn.Module):
    """MSTB: pre-norm transformer with local queries and multi-scale regional keys/values.

    ``t = local + Attn(LN(local); LN_p(regional_p))``; ``t = t + MLP(LN(t))``; no position
    embeddings.  Input/output ``[B, C, H, W]`` (any H, W ≥ 1).

    Args:
        channels: C (multiple of 8).
        mlp: the token MLP module (``TokenMLP`` or ``BottleneckMLP``).
        patch_embed: True → regional tokens by per-patch Linear projection of the input (``hae``);
            False → average pooling of the (projected) local map (lite, v2).
        local_proj: True → a shared 1×1 conv C→C produces the local map (lite, v2).
        patch_sizes: regional scales (default (4, 8)).
    """

    def __init__(self, channels: int, mlp: nn.Module, patch_embed: bool, local_proj: bool,
                 patch_sizes: Sequence[int] = PATCH_SIZES, num_heads: int = MSTB_HEADS):
        super().__init__()
        check_width(channels, num_heads, where=type(self).__name__)
        self.channels = channels
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.patch_embed = patch_embed
        self.local_proj = conv_nd(2, channels, channels, 1) if local_proj else None
        self.local_norm = nn.LayerNorm(channels)
        if patch_embed:
            self.regional = nn.ModuleList(PatchEmbedTokens(channels, p) for p in self.patch_sizes)
        else:
            self.regional = nn.ModuleList(PooledTokens(p) for p in self.patch_sizes)
        self.regional_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in self.patch_sizes)
        self.attn = SpatialReductionAttention(channels, num_heads, num_groups=len(self.patch_sizes))
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = mlp

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        if c != self.channels:
            raise ValueError(f"{type(self).__name__}: input has {c} channels, expected {self.channels}.")
        base = self.local_proj(z) if self.local_proj is not None else z
        local = base.flatten(2).transpose(1, 2)                                   # [B, HW, C]
        regional = [norm(tok(base)) for tok, norm in zip(self.regional, self.regional_norms)]
        t = local + self.attn(self.local_norm(local), regional)
        t = t + self.mlp(self.mlp_norm(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class HybridCNNTransformerBlockBase(TimestepBlock):
    """Hybrid CNN-Transformer decoder block (docs/hae.md, 'Hybrid decoder block'), a ``TimestepBlock``.

    ``z = x + Linear(SiLU(emb))``; CNN branch ``GN→SiLU→conv3×3→GN→SiLU→conv3×3``; transformer
    branch ``MSTB(z)``; fusion (concat → 1×1 conv 2C→C, or average → 1×1 conv C→C, zero-initialised);
    output ``x + fusion``.  At initialisation the block is the identity.

    Args:
        channels: C.  emb_channels: width of the timestep embedding.
        transformer: the MSTB module.  fusion: "concat" or "average".
        use_checkpoint: recompute the block in backward (gradient checkpointing).
    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, emb_channels: int, transformer: nn.Module, fusion: str = "average",
                 use_checkpoint: bool = False):
        super().__init__()
        if fusion not in ("concat", "average"):
            raise ValueError(
                f"HybridCNNTransformerBlock: fusion must be 'concat' or 'average', got {fusion!r}."
            )
        self.channels = channels
        self.fusion_mode = fusion
        self.use_checkpoint = use_checkpoint
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, channels))
        self.cnn = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(2, channels, channels, 3, padding=1),
            normalization(channels),
            nn.SiLU(),
            conv_nd(2, channels, channels, 3, padding=1),
        )
        self.transformer = transformer
        fused = 2 * channels if fusion == "concat" else channels
        self.fusion = zero_module(conv_nd(2, fused, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        e = self.emb_layers(emb).to(x.dtype)
        z = x + e[..., None, None]
        cnn = self.cnn(z)
        trans = self.transformer(z).to(cnn.dtype)
        if self.fusion_mode == "concat":
            fused = torch.cat([cnn, trans], dim=1)
        else:
            fused = (cnn + trans) * 0.5
        return x + self.fusion(fused).to(x.dtype)


HybridBlockFactory = Callable[..., nn.Module]


class HAEUNetBase(UNetModel):
    """UNetModel with standard (SiLU) ResBlocks and one hybrid block per decoder level but the finest.

    Args:
        *args, **kwargs: the ``UNetModel`` arguments (positional or keyword);
            ``resblock_activation``/``decoder_block`` are fixed by the class.
        hybrid_block: ``hybrid_block(channels, emb_channels, dropout=..., use_checkpoint=...,
            **block_options)`` → block.
        use_hae: False → no hybrid blocks (the plain skeleton with SiLU ResBlocks).
        block_options: the variant's own options for its hybrid blocks (e.g. ``bottleneck_ratio``).
    """

    def __init__(self, *args, hybrid_block: HybridBlockFactory, use_hae: bool = True,
                 block_options: Mapping[str, Any] | None = None, **kwargs):
        for fixed in ("resblock_activation", "decoder_block"):
            if fixed in kwargs:
                raise ValueError(
                    f"{type(self).__name__}: '{fixed}' is fixed by the HAE variant; do not pass it."
                )
        bound = inspect.signature(UNetModel.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        emb_channels = int(bound.arguments["model_channels"]) * 4
        dropout = float(bound.arguments["dropout"])
        use_checkpoint = bool(bound.arguments["use_checkpoint"])
        options = dict(block_options or {})

        def decoder_block(channels: int, level: int) -> nn.Module:
            return hybrid_block(channels, emb_channels, dropout=dropout, use_checkpoint=use_checkpoint,
                                **options)

        super().__init__(*args, resblock_activation=True,
                         decoder_block=decoder_block if use_hae else None, **kwargs)
        self.use_hae = bool(use_hae)

    def hybrid_blocks(self) -> list[HybridCNNTransformerBlockBase]:
        """The hybrid blocks of the decoder, coarsest level first."""
        return [m for m in self.modules() if isinstance(m, HybridCNNTransformerBlockBase)]
