"""Shareable model folders (issue 12): export a training run, load it back with one call.

An export folder holds

* ``model.safetensors``: the weights (EMA weights of one rate by default, or the raw model weights);
* ``config.json``: {"format", "version", "model", "diffusion", "train"} where model / diffusion / train are
  the config dict the training run saved with its checkpoints (``script_util.model_config`` keys and the
  diffusion flags, i.e. today's flag names), plus "weights" {kind, ema_rate, step, source, source_sha256,
  sha256 (of model.safetensors), n_parameters};
* ``calibration.json`` when the run (or ``--calibration``) has one: a calibration made with the exported
  checkpoint is re-keyed to ``model.safetensors`` (checkpoint_sha256 = the export's weights sha256, the
  source checkpoint in extra["exported_from"]), so ``--model_dir EXPORT`` of translation can use it;
* ``README.md``: a model card.

``load_pretrained(DIR)`` rebuilds the network from config.json, checks the weights file's SHA-256 and that
every tensor name and shape fits, and refuses a mismatch with one line. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from .cli import ArgumentParser
from .io_util import atomic_write_bytes, atomic_write_json, atomic_write_text

FORMAT = "hae-fpdm-export"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CALIBRATION_FILE = "calibration.json"

__all__ = ["FORMAT", "WEIGHTS_FILE", "CONFIG_FILE", "CALIBRATION_FILE", "flags_from_config",
           "export_run", "load_pretrained", "is_export_dir", "read_export", "export_tensors"]


def flags_from_config(model_cfg: Mapping[str, Any], diffusion_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``create_model_and_diffusion`` flags from a saved (resolved) model config and diffusion flags.

    Inverse of ``script_util.model_config``: channel_mult list -> "a,b,..", attention downsample factors
    -> resolutions, num_classes None -> class_cond False. Raises ValueError when the result does not
    resolve back to ``model_cfg`` (an edited or foreign config).
    """
    from .script_util import diffusion_defaults, model_and_diffusion_defaults, model_config

    known = set(model_and_diffusion_defaults())
    cfg = dict(model_cfg)
    unknown = sorted(set(cfg) - known - {"class_cond"})
    if unknown:
        raise ValueError(f"config.json model section has unknown keys {unknown}")
    for key in ("channel_mult", "attention_resolutions"):
        val = cfg.get(key)
        if not isinstance(val, list) or not all(isinstance(v, (int, float)) for v in val):
            raise ValueError(f"config.json model section: {key} must be a list of numbers (a resolved model "
                             f"config), got {val!r}; re-export the model")
    size = int(cfg["image_size"])
    flags: dict[str, Any] = {k: v for k, v in cfg.items() if k in known}
    flags["channel_mult"] = ",".join(f"{float(m):g}" for m in cfg["channel_mult"])
    flags["attention_resolutions"] = ",".join(str(size // int(f)) for f in cfg["attention_resolutions"])
    flags["class_cond"] = cfg["num_classes"] is not None
    flags["num_classes"] = 2 if cfg["num_classes"] is None else int(cfg["num_classes"])
    flags.update({k: v for k, v in diffusion_cfg.items() if k in diffusion_defaults()})
    if model_config(flags) != dict(model_cfg):
        raise ValueError("config.json model section is not a resolved model config (does not round-trip "
                         "through script_util.model_config); re-export the model")
    return flags


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _select_weights(run_dir: str, weights: str, rate: str, step: int | None) -> tuple[str, int]:
    from .checkpoint import find_checkpoint, parse_checkpoint_name

    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be 'ema' or 'model', got {weights!r}")
    path = find_checkpoint(run_dir, step=step, ema_rate=rate if weights == "ema" else None)
    parsed = parse_checkpoint_name(path)
    return path, int(parsed[2]) if parsed else -1


def export_run(run_dir: str, out_dir: str, weights: str = "ema", rate: str = "0.9999",
               step: int | None = None, calibration: str | None = None, metrics: str | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Write the export folder of one training run (see module docstring); returns the config written."""
    from safetensors.torch import save

    from .calibration import file_sha256
    from .checkpoint import load_state_dict_file, read_saved_config
    from .script_util import create_model_and_diffusion

    if os.path.exists(os.path.join(out_dir, WEIGHTS_FILE)) and not overwrite:
        raise FileExistsError(f"--out {out_dir} already holds {WEIGHTS_FILE}; pass --overwrite or pick "
                              "another folder")
    path, found_step = _select_weights(run_dir, weights, rate, step)
    cal, metrics_data = _read_inputs(run_dir, calibration, metrics)
    saved = read_saved_config(run_dir, found_step)
    if not saved or "model" not in saved or "diffusion" not in saved:
        raise ValueError(f"{run_dir} has no saved config with 'model' and 'diffusion' (state*.pt or "
                         "config.json of a training run); cannot export without the flags")
    flags = flags_from_config(saved["model"], saved["diffusion"])
    sd = load_state_dict_file(path)
    model, _ = create_model_and_diffusion(**flags)
    _check_fits(model, sd, path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    blob = save(tensors, metadata={"format": FORMAT, "step": str(found_step), "weights": weights})
    n_params = sum(p.numel() for p in model.parameters())
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": dict(saved["model"]),
        "diffusion": dict(saved["diffusion"]),
        "train": dict(saved.get("train") or {}),
        "weights": {"kind": weights, "ema_rate": rate if weights == "ema" else None, "step": found_step,
                    "source": os.path.basename(path), "source_sha256": file_sha256(path),
                    "sha256": _sha256(blob), "n_parameters": n_params},
    }
    from .model_card import model_card

    card = model_card(config, metrics_data, cal is not None)
    # calibration and card first, weights last: an interrupted export has no model.safetensors
    stale = os.path.join(out_dir, CALIBRATION_FILE)
    if cal is not None:
        atomic_write_text(_exported_calibration(cal, path, config["weights"]["sha256"]), stale)
    elif os.path.exists(stale):
        os.remove(stale)  # from an earlier export with --overwrite
    atomic_write_text(card, os.path.join(out_dir, "README.md"))
    atomic_write_json(config, os.path.join(out_dir, CONFIG_FILE))
    atomic_write_bytes(blob, os.path.join(out_dir, WEIGHTS_FILE))
    return config


def _exported_calibration(cal_path: str, source: str, export_sha: str) -> str:
    """calibration.json text for the export: a calibration made with the exported checkpoint is tied to
    model.safetensors (its checkpoint_sha256 becomes the export's, the source's goes to
    extra["exported_from"]); one without a checkpoint_sha256 is kept as is (it cannot be verified and a
    translation run recalibrates); one made with other weights is refused."""
    from dataclasses import asdict

    from .calibration import file_sha256, load_calibrations

    src_sha = file_sha256(source)
    cals = load_calibrations(cal_path)
    for w, c in sorted(cals.items()):
        if c.checkpoint_sha256 == src_sha:
            c.checkpoint_sha256 = export_sha
            c.extra = {**c.extra, "exported_from": {"checkpoint": os.path.basename(source),
                                                    "checkpoint_sha256": src_sha}}
        elif c.checkpoint_sha256:
            raise ValueError(f"calibration {cal_path} (w={w:g}) was made with the checkpoint of sha256 "
                             f"{c.checkpoint_sha256[:12]}..., not the exported {os.path.basename(source)} "
                             f"({src_sha[:12]}...); export the weights it was made with (--weights, --rate, "
                             "--step) or pass the matching --calibration")
    items = [asdict(c) for _, c in sorted(cals.items())]
    return json.dumps({"calibrations": items}, indent=2, sort_keys=True) + "\n"


def _read_inputs(run_dir: str, calibration: str | None, metrics: str | None) -> tuple[str | None, Any]:
    """(calibration path or None, metrics dict or None), checked before anything is written."""
    from .calibration import load_calibrations

    if calibration and not os.path.isfile(calibration):
        raise FileNotFoundError(f"--calibration {calibration} does not exist")
    cal = calibration or os.path.join(run_dir, CALIBRATION_FILE)
    if not os.path.isfile(cal):
        cal = None
    else:
        load_calibrations(cal)  # refuse a broken file before copying it
    metrics_data = None
    if metrics:
        if not os.path.isfile(metrics):
            raise FileNotFoundError(f"--metrics {metrics} does not exist")
        with open(metrics, encoding="utf-8") as f:
            try:
                metrics_data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"--metrics {metrics}: not valid JSON ({err})") from err
        if not isinstance(metrics_data, dict):
            raise ValueError(f"--metrics {metrics}: expected a JSON object (a metrics.json of an evaluation)")
    return cal, metrics_data


def _check_fits(model: torch.nn.Module, sd: Mapping[str, Any], path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        first = (missing + unexpected + shaped)[0]
        raise ValueError(f"{path} does not fit the model of its config.json: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shaped)} mis-shaped tensors (first: {first}); "
                         "the config was edited or belongs to other weights: re-export the model")


def is_export_dir(path: str) -> bool:
    """True when ``path`` holds an export (model.safetensors and config.json)."""
    return all(os.path.isfile(os.path.join(path, name)) for name in (WEIGHTS_FILE, CONFIG_FILE))


def read_export(export_dir: str) -> tuple[dict[str, Any], bytes]:
    """(config.json dict, model.safetensors bytes) of an export, format and weights' SHA-256 checked."""
    if not is_export_dir(export_dir):
        raise FileNotFoundError(f"{export_dir} is not an export folder (needs {WEIGHTS_FILE} and "
                                f"{CONFIG_FILE}; create one with scripts/export_model.py RUN_DIR --out DIR)")
    cfg_path = os.path.join(export_dir, CONFIG_FILE)
    with open(cfg_path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
        raise ValueError(f"{cfg_path} is not a {FORMAT} version {VERSION} config; re-export the model")
    wpath = os.path.join(export_dir, WEIGHTS_FILE)
    with open(wpath, "rb") as f:
        blob = f.read()
    if _sha256(blob) != (cfg.get("weights") or {}).get("sha256"):
        raise ValueError(f"{wpath} does not match the sha256 recorded in {cfg_path}; the files belong to "
                         "different exports or were modified: re-export the model")
    return cfg, blob


def export_tensors(blob: bytes, path: str) -> dict[str, torch.Tensor]:
    """The state dict in the safetensors bytes ``blob`` read from ``path`` (ValueError naming it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from err


def load_pretrained(export_dir: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, diffusion, {w: Calibration} or None) from an export folder; local files only.

    Raises ValueError (one line) when config.json is not an export config, the weights' SHA-256 differs
    from the one recorded, or the tensors do not fit the network the config describes.
    """
    from .script_util import create_model_and_diffusion

    cfg, blob = read_export(export_dir)
    cfg_path, wpath = os.path.join(export_dir, CONFIG_FILE), os.path.join(export_dir, WEIGHTS_FILE)
    try:
        flags = flags_from_config(cfg["model"], cfg["diffusion"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path}: model / diffusion section is incomplete ({err}); re-export") from err
    except ValueError as err:
        raise ValueError(f"{cfg_path}: {err}") from err
    model, diffusion = create_model_and_diffusion(**flags)
    sd = export_tensors(blob, wpath)
    _check_fits(model, sd, wpath)
    model.load_state_dict(sd, strict=True)
    model.to(device).eval()
    cal = None
    cal_path = os.path.join(export_dir, CALIBRATION_FILE)
    if os.path.isfile(cal_path):
        from .calibration import load_calibrations

        cal = load_calibrations(cal_path)
    return model, diffusion, cal


# ------------------------------------------------------------------------------------------ command line
def create_argparser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Export a training run as a shareable model folder.")
    p.add_argument("run_dir", help="training log dir (model*/ema_*/state*.pt, config.json)")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--rate", default="0.9999", help="EMA rate with --weights ema (default 0.9999)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--calibration", default=None, help="calibration.json (default: RUN_DIR/calibration.json)")
    p.add_argument("--metrics", default=None, help="metrics.json of an evaluation, shown in the model card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    return p


def main(argv: list[str]) -> int:
    """``scripts/export_model.py``: parse ``argv`` and export (errors go to ``cli.run_cli``)."""
    args = create_argparser().parse_args(argv)
    cfg = export_run(args.run_dir, args.out, weights=args.weights, rate=args.rate, step=args.step,
                     calibration=args.calibration, metrics=args.metrics, overwrite=args.overwrite)
    w = cfg["weights"]
    print(f"exported {w['kind']} weights of step {w['step']} ({w['n_parameters']:,} parameters) "
          f"to {args.out}")
    return 0
