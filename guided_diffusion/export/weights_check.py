"""Do exported weights fit their config? The checks ``load_pretrained`` and ``--model_dir EXPORT`` share.

* :func:`check_fits`: every tensor name and shape of a state dict fits the network a config builds; a
  mismatch names the config field that disagrees with the weights (read off the tensors when possible).
* :func:`check_weights_record`: the fields no shape shows (image size, heads, diffusion, step, weights
  kind) equal the record the export wrote into model.safetensors' metadata (:func:`weights_record`).
* :func:`export_tensors`: the state dict of safetensors bytes, a ValueError naming the file otherwise.

Every refusal is one ValueError line that names the file (docs/edges.md).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

from guided_diffusion.training.checkpoint import _guess_flags

# config.json "weights" fields recorded in model.safetensors' metadata (metadata key, config key)
RECORDED_WEIGHTS = (("step", "step"), ("weights", "kind"), ("ema_rate", "ema_rate"))

__all__ = ["RECORDED_WEIGHTS", "check_fits", "check_weights_record", "export_tensors", "fields_in_weights",
           "weights_record"]


def fields_in_weights(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Model config fields read off a state dict: in_channels and num_channels (first convolution),
    learn_sigma (output channels), num_classes (label embedding; None without one). Shared by every
    unet_ver; a field whose tensor is absent or odd is left out."""
    found: dict[str, Any] = {}
    first = sd.get("input_blocks.0.0.weight")
    if first is not None and first.dim() == 4:
        found["num_channels"], found["in_channels"] = int(first.shape[0]), int(first.shape[1])
        out = sd.get("out.2.weight")
        if out is not None and int(out.shape[0]) in (found["in_channels"], 2 * found["in_channels"]):
            found["learn_sigma"] = int(out.shape[0]) == 2 * found["in_channels"]
    label = sd.get("label_emb.weight")
    found["num_classes"] = int(label.shape[0]) if label is not None and label.dim() == 2 else None
    return found


def check_fits(model: torch.nn.Module, sd: Mapping[str, Any], path: str,
                model_cfg: Mapping[str, Any] | None = None, cfg_path: str | None = None) -> None:
    """ValueError (one line) naming ``path``, the config field that disagrees with the weights when one
    can be read off them (else the fields that probably do) and ``cfg_path``, when ``sd`` does not fit
    ``model`` (missing, unexpected or mis-shaped tensors)."""

    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shaped):
        return
    where = cfg_path or "the run's saved config"
    first = (missing + unexpected + shaped)[0]
    counts = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shaped)} mis-shaped tensors "
              f"(first: {first})")
    cfg = dict(model_cfg or {})
    wrong = [f"model.{k} is {cfg[k]!r} in {where} but the weights hold {v!r}"
             for k, v in fields_in_weights(sd).items() if k in cfg and cfg[k] != v]
    if not wrong:
        guess = "/".join(_guess_flags(missing, unexpected, [f"{k} " for k in shaped]))
        wrong = [f"the fields that probably differ in {where}: model.{guess.replace('/', '/model.')}"]
    raise ValueError(f"{path} does not fit the model of its config.json: {'; '.join(wrong)} ({counts}); the "
                     "config was edited or belongs to other weights: re-export the model")


def weights_record(blob: bytes) -> dict[str, str]:
    """The metadata of safetensors bytes (the record an export writes: format, step, weights kind,
    ema_rate, model and diffusion config as JSON); {} when it has none."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
    except (struct.error, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def check_weights_record(cfg: Mapping[str, Any], blob: bytes, cfg_path: str, wpath: str) -> None:
    """ValueError (one line) naming the first config.json field that differs from the record the export
    wrote into model.safetensors (the fields no tensor shape shows: image size, heads, diffusion, step,
    weights kind). Exports written before the record existed hold only step and kind."""
    meta = weights_record(blob)
    have_w = dict(cfg.get("weights") or {})
    pairs: list[tuple[str, Any, Any]] = []
    for meta_key, key in RECORDED_WEIGHTS:
        if meta_key in meta:
            rec = meta[meta_key] if meta_key == "weights" else json.loads(meta[meta_key])
            pairs.append((f"weights.{key}", have_w.get(key), rec))
    for section in ("model", "diffusion"):
        if section in meta:
            have, rec = dict(cfg.get(section) or {}), json.loads(meta[section])
            pairs += [(f"{section}.{k}", have.get(k), rec.get(k)) for k in sorted(set(rec) | set(have))]
    for field, have, rec in pairs:
        if have != rec:
            raise ValueError(f"{cfg_path}: {field} is {have!r} but {wpath} was exported with {rec!r}; the "
                             "config was edited or belongs to other weights: re-export the model")


def export_tensors(blob: bytes, path: str) -> dict[str, torch.Tensor]:
    """The state dict in the safetensors bytes ``blob`` read from ``path`` (ValueError naming it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from err
