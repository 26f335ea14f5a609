"""Measurements of one checkpoint for the block diagnosis (``guided_diffusion.experiments.block_diagnosis``,
whose docstring defines every number): the blocks of a UNet by name and level, the zero-initialised tensors
of the hybrid blocks and their norms, the fusion-output ratios read by forward hooks, and the gradient norms
of the training loss per block."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from guided_diffusion.hae_blocks import HybridCNNTransformerBlockBase
from guided_diffusion.unet import AttentionBlock, ResBlock, UNetModel

CONDS = ("label", "null")
_NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------- blocks
def block_layout(model: UNetModel) -> dict[str, tuple[str, int]]:
    """(part, level) of every entry of the UNet: ``input_blocks.i``, ``middle_block``, ``output_blocks.i``
    -> ("input" | "middle" | "output", resolution level 0 = finest)."""

    levels = len(model.channel_mult)
    nrb = model.num_res_blocks
    out = {"input_blocks.0": ("input", 0), "middle_block": ("middle", levels - 1)}
    idx = 1
    for level in range(levels):
        for _ in range(nrb + (level != levels - 1)):
            out[f"input_blocks.{idx}"] = ("input", level)
            idx += 1
    idx = 0
    for level in reversed(range(levels)):
        for _ in range(nrb + 1):
            out[f"output_blocks.{idx}"] = ("output", level)
            idx += 1
    return out


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, HybridCNNTransformerBlockBase):
        return "hae"
    if isinstance(module, ResBlock):
        return "res"
    if isinstance(module, AttentionBlock):
        return "attn"
    return None


def measured_blocks(model: UNetModel) -> dict[str, dict[str, Any]]:
    """Every hybrid block, ResBlock and AttentionBlock by its module name (e.g. ``output_blocks.5.2``), with
    its kind ("hae" | "res" | "attn"), part and level, in module order."""

    layout = block_layout(model)
    out = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        prefix = name if name.startswith("middle_block") else ".".join(name.split(".")[:2])
        part, level = layout["middle_block" if prefix.startswith("middle_block") else prefix]
        out[name] = {"kind": kind, "part": part, "level": level}
    return out


def hybrid_blocks(model: nn.Module) -> dict[str, HybridCNNTransformerBlockBase]:
    """The hybrid blocks by module name, in module order (empty for networks without them)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HybridCNNTransformerBlockBase)}


def zero_init_names(model: nn.Module, block: str) -> list[str]:
    """State-dict keys under ``block`` that ``model`` (freshly built) holds at exactly 0, except the
    parameters of normalisation layers (their bias starts at 0 in every network)."""

    norm_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _NORM_LAYERS))
    return [k for k, v in model.state_dict().items()
            if k.startswith(f"{block}.") and not k.startswith(norm_prefixes) and v.is_floating_point()
            and not bool(v.any())]


def tensor_norm(tensors: Sequence[torch.Tensor]) -> float:
    """The L2 norm of all ``tensors`` together (float64)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def weight_norms(state: Mapping[str, torch.Tensor], zero_init: Mapping[str, Sequence[str]]
                 ) -> dict[str, dict[str, float]]:
    """Per hybrid block (the keys of ``zero_init``: block -> its zero-initialised keys), from a state dict:
    ``fusion_weight_norm``, ``fusion_bias_norm`` and ``zero_init_norm`` (the other zero-initialised keys)."""

    out = {}
    for block, keys in zero_init.items():
        fusion = (f"{block}.fusion.weight", f"{block}.fusion.bias")
        others = [state[k] for k in keys if k not in fusion]
        out[block] = {"fusion_weight_norm": tensor_norm([state[fusion[0]]]),
                      "fusion_bias_norm": tensor_norm([state[fusion[1]]]) if fusion[1] in state else 0.0,
                      "zero_init_norm": tensor_norm(others)}
    return out


# ---------------------------------------------------------------------------------------------- measures
def _keep_input(store: dict[str, dict[str, torch.Tensor]], name: str, module: nn.Module,
                args: tuple[Any, ...]) -> None:
    store.setdefault(name, {})["path"] = args[0].detach()


def _keep_output(store: dict[str, dict[str, torch.Tensor]], name: str, module: nn.Module,
                 args: tuple[Any, ...], output: torch.Tensor) -> None:
    store.setdefault(name, {})["residual"] = output.detach()


def _fro(t: torch.Tensor) -> float:
    return float(t.double().norm())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


@torch.no_grad()
def fusion_measures(model: nn.Module, diffusion: Any, x: torch.Tensor, labels: torch.Tensor,
                    timesteps: Sequence[int], noise: Sequence[torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per hybrid block: ``fusion_ratio`` {cond: {t: ratio}}, ``fusion_ratio_mean`` {cond: mean over t} and
    ``cond_delta`` {t: value} (module docstring) on x [N, C, H, W] (on the model's device), labels [N],
    one noise tensor [N, C, H, W] per t. Read with forward hooks, removed on return."""

    blocks = hybrid_blocks(model)
    store: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(functools.partial(_keep_input, store, name)))
        handles.append(block.fusion.register_forward_hook(functools.partial(_keep_output, store, name)))
    out: dict[str, dict[str, Any]] = {n: {"fusion_ratio": {c: {} for c in CONDS}, "cond_delta": {}}
                                      for n in blocks}
    dev = x.device
    try:
        for t, eps in zip(timesteps, noise):
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=dev)
            xt = diffusion.q_sample(x, tt, noise=eps.to(dev))
            seen = {}
            for cond in CONDS:
                store.clear()
                diffusion.model_eps(model, xt, tt, model_kwargs={"y": labels.to(dev), "null": cond == "null"})
                seen[cond] = {n: dict(v) for n, v in store.items()}
                for name in blocks:
                    path, res = seen[cond][name]["path"], seen[cond][name]["residual"]
                    out[name]["fusion_ratio"][cond][str(t)] = _ratio(_fro(res), _fro(path))
            for name in blocks:
                delta = seen["label"][name]["residual"] - seen["null"][name]["residual"]
                out[name]["cond_delta"][str(t)] = _ratio(_fro(delta), _fro(seen["label"][name]["path"]))
    finally:
        for h in handles:
            h.remove()
    for row in out.values():
        row["fusion_ratio_mean"] = {c: float(np.mean(list(row["fusion_ratio"][c].values()))) for c in CONDS}
    return out


def gradient_norms(model: nn.Module, diffusion: Any, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, blocks: Sequence[str]) -> tuple[dict[str, dict[str, float]],
                                                                        dict[str, dict[str, float]]]:
    """Gradient norms of the training loss per block of ``blocks`` ({block: {cond: norm}}) and per
    condition the loss and the whole network's gradient norm ({cond: {"loss", "grad_norm_total"}}).

    x [N, C, H, W] (model's device), labels [N], t [N], noise [N, C, H, W]; no label dropout; the model's
    gradients are cleared on return."""

    dev = x.device
    modules = dict(model.named_modules())
    per_block: dict[str, dict[str, float]] = {b: {} for b in blocks}
    totals: dict[str, dict[str, float]] = {}
    try:
        for cond in CONDS:
            model.zero_grad(set_to_none=True)
            kwargs = {"y": labels.to(dev), "null": cond == "null"}
            losses = diffusion.training_losses(model, x, t.to(dev), model_kwargs=kwargs, noise=noise.to(dev))
            loss = losses["loss"].float().mean()
            loss.backward()
            for b in blocks:
                grads = [p.grad for p in modules[b].parameters() if p.grad is not None]
                per_block[b][cond] = tensor_norm(grads)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            totals[cond] = {"loss": float(loss.detach()), "grad_norm_total": tensor_norm(grads)}
    finally:
        model.zero_grad(set_to_none=True)
    return per_block, totals
