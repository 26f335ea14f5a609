"""Shareable model folders (issue 12): export a training run, load it back with one call.

An export folder holds

* ``model.safetensors``: the weights (EMA weights of one rate by default, or the raw model weights);
* ``config.json``: {"format", "version", "model", "diffusion", "train"}: the config dict the training run
  saved with its checkpoints, plus "weights" {kind, ema_rate, step, source, source_sha256, sha256 (of
  model.safetensors), n_parameters}, "provenance" {exported_by: the export command, trained_by: the
  training command given with ``--trained_by``} and, with ``--metrics``, "evaluation": the
  result-changing settings of that evaluation, which ``--model_dir EXPORT`` of translation starts from
  (docs/edges.md);
* ``calibration.json`` when the run (or ``--calibration``) has one, re-keyed to ``model.safetensors``
  (checkpoint_sha256 = the export's weights sha256, the source in extra["exported_from"]);
* ``README.md``: a model card.

``load_pretrained(DIR)`` rebuilds the network from config.json, checks the weights file's SHA-256, that
every tensor name and shape fits (a mismatch names the config.json field, e.g. ``model.in_channels``), and
that the fields no shape shows (image size, heads, diffusion, step, kind) equal the record the export wrote
into model.safetensors' metadata; a mismatch is refused with one line. A calibration.json made for other
weights is dropped with a warning. Nothing is downloaded.

Trust at the edges (docs/edges.md): ``--out`` must be new or empty; ``--overwrite`` replaces an earlier
export (and nothing else) as a whole: the new export is written to a temporary sibling folder and swapped in
by renames, so an interrupted export leaves the earlier one in place. ``--metrics`` and ``--calibration``
must record the sha256 of the exported weights (the source checkpoint or an export of the same tensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import struct
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch

from guided_diffusion import script_util as su
from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.calibration import load_calibrations
from guided_diffusion.configs.eval_configs import evaluation_settings
from guided_diffusion.export.model_card import model_card
from guided_diffusion.export.weights_check import check_fits, check_weights_record, export_tensors
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.training.checkpoint import (
    find_checkpoint,
    load_state_dict_file,
    parse_checkpoint_name,
    read_saved_config,
)
from guided_diffusion.utils.io_util import atomic_write_bytes, atomic_write_json, file_sha256

FORMAT = "hae-fpdm-export"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CALIBRATION_FILE = "calibration.json"
CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CALIBRATION_FILE, CARD_FILE)

__all__ = ["FORMAT", "WEIGHTS_FILE", "CONFIG_FILE", "CALIBRATION_FILE", "flags_from_config",
           "export_run", "load_pretrained", "is_export_dir", "read_export", "export_tensors"]


def flags_from_config(model_cfg: Mapping[str, Any], diffusion_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``create_model_and_diffusion`` flags from a saved (resolved) model config and diffusion flags.

    Inverse of ``script_util.model_config``: channel_mult list -> "a,b,..", attention downsample factors
    -> resolutions, num_classes None -> class_cond False. Raises ValueError when the result does not
    resolve back to ``model_cfg`` (an edited or foreign config).
    """

    known = set(su.model_and_diffusion_defaults())
    cfg = su.drop_foreign_options(model_cfg)  # older records also list other variants' (unused) options
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
    flags.update({k: v for k, v in diffusion_cfg.items() if k in su.diffusion_defaults()})
    resolved = su.model_config(flags)
    if resolved != cfg:
        diffs = ", ".join(f"model.{k} {cfg.get(k)!r} -> {resolved.get(k)!r}"
                          for k in sorted(set(resolved) | set(cfg)) if resolved.get(k) != cfg.get(k))
        raise ValueError(f"config.json model section is not a resolved model config (does not round-trip "
                         f"through script_util.model_config: {diffs}); re-export the model")
    return flags


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _select_weights(run_dir: str, weights: str, rate: str, step: int | None) -> tuple[str, int]:
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be 'ema' or 'model', got {weights!r}")
    path = find_checkpoint(run_dir, step=step, ema_rate=rate if weights == "ema" else None)
    parsed = parse_checkpoint_name(path)
    return path, int(parsed[2]) if parsed else -1


def export_run(run_dir: str, out_dir: str, weights: str = "ema", rate: str = "0.9999",
               step: int | None = None, calibration: str | None = None, metrics: str | None = None,
               overwrite: bool = False, provenance: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the export folder of one training run (see module docstring); returns the config written.
    ``provenance``: {"exported_by", "trained_by"} commands, recorded in config.json and the model card.

    Every input is checked before anything is written: ``out_dir`` new or empty (or an earlier export with
    ``overwrite``), ``metrics`` / ``calibration`` made with the exported weights (their recorded sha256).
    """
    from safetensors.torch import save


    _check_out(out_dir, overwrite)
    path, found_step = _select_weights(run_dir, weights, rate, step)
    cal, metrics_data = _read_inputs(run_dir, calibration, metrics)
    saved = read_saved_config(run_dir, found_step)
    if not saved or "model" not in saved or "diffusion" not in saved:
        raise ValueError(f"{run_dir} has no saved config with 'model' and 'diffusion' (state*.pt or "
                         "config.json of a training run); cannot export without the flags")
    flags = flags_from_config(saved["model"], saved["diffusion"])
    sd = load_state_dict_file(path)
    model, _ = create_model_and_diffusion(**flags)
    check_fits(model, sd, path, saved["model"])
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    ema_rate = rate if weights == "ema" else None
    record = {"format": FORMAT, "step": str(found_step), "weights": weights, "ema_rate": json.dumps(ema_rate),
              "model": json.dumps(dict(saved["model"]), sort_keys=True),
              "diffusion": json.dumps(dict(saved["diffusion"]), sort_keys=True)}
    blob = _canonical(save(tensors, metadata=record))
    n_params = sum(p.numel() for p in model.parameters())
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": dict(saved["model"]),
        "diffusion": dict(saved["diffusion"]),
        "train": dict(saved.get("train") or {}),
        "weights": {"kind": weights, "ema_rate": ema_rate, "step": found_step,
                    "source": os.path.basename(path), "source_sha256": file_sha256(path),
                    "sha256": _sha256(blob), "n_parameters": n_params},
        "provenance": {k: v for k, v in (provenance or {}).items() if v},
    }
    w = config["weights"]
    if metrics_data is not None:
        _check_metrics_weights(metrics, metrics_data, w, weights, path)
        if "config" in (metrics_data.get("run") or {}):  # the settings an export-only evaluation starts from
            config["evaluation"] = evaluation_settings(metrics_data["run"]["config"], f"--metrics {metrics}")

    files: dict[str, bytes | dict] = {
             CONFIG_FILE: config,
             CARD_FILE: model_card(config, metrics_data, cal is not None).encode("utf-8"),
             WEIGHTS_FILE: blob}
    if cal is not None:
        files[CALIBRATION_FILE] = _exported_calibration(cal, path, w["sha256"]).encode("utf-8")
    _publish(out_dir, files)
    return config


def _canonical(blob: bytes) -> bytes:
    """``blob`` (safetensors bytes) with its JSON header re-serialised with sorted keys, padded with spaces
    to 8 bytes as safetensors does: the same tensors and record always give the same bytes and sha256
    (safetensors writes the metadata in an order that changes from call to call). Data is untouched."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + blob[8 + n:]


def _check_out(out_dir: str, overwrite: bool) -> None:
    """``--out`` must be absent or an empty folder; with ``overwrite`` it may hold an earlier export (its
    files only). Anything else (an evaluation's or training run's folder, a file) is refused untouched."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir} is not a folder; give a new or empty folder")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return
    shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
    if not overwrite:
        raise FileExistsError(f"--out {out_dir} is not empty (holds {shown}); export into a new or empty "
                              "folder, or pass --overwrite to replace an earlier export there")
    foreign = [e for e in entries if e not in EXPORT_FILES]
    if foreign or not is_export_dir(out_dir):
        what = f"other files ({', '.join(foreign[:6])})" if foreign else f"no {WEIGHTS_FILE} + {CONFIG_FILE}"
        raise FileExistsError(f"--overwrite replaces an earlier export only, and --out {out_dir} is not one "
                              f"(it holds {what}); export into a new or empty folder")


def _publish(out_dir: str, files: Mapping[str, bytes | dict]) -> None:
    """Write ``files`` (bytes, or a dict written as JSON) into a temporary sibling folder of ``out_dir``,
    then move it in by renames: onto an absent or empty ``out_dir`` directly; over an earlier export by
    moving that aside first (put back if the second rename fails) and deleting it after. Interrupted at any
    point, ``out_dir`` holds the earlier export or the new one (a run killed between the two renames leaves
    the earlier export in the sibling ``.NAME.export-old-*``)."""
    target = os.path.abspath(out_dir)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{name}.export-tmp-{tag}")
    os.mkdir(tmp)
    try:
        # calibration and card first, weights last: a folder without model.safetensors is no export
        for fname in sorted(files, key=lambda f: f == WEIGHTS_FILE):
            write = atomic_write_json if isinstance(files[fname], dict) else atomic_write_bytes
            write(files[fname], os.path.join(tmp, fname))
        if os.path.isdir(target) and os.listdir(target):  # an earlier export (checked by _check_out)
            old = os.path.join(parent, f".{name}.export-old-{tag}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _weights_hint(checkpoint: str) -> str:
    """The export flags that select ``checkpoint`` (a model*/ema_* file name), or '' when unknown."""

    parsed = parse_checkpoint_name(os.path.basename(str(checkpoint)))
    if parsed is None or parsed[0] not in ("model", "ema"):
        return ""
    kind, ema_rate, step = parsed
    flags = "--weights model" if kind == "model" else f"--weights ema --rate {ema_rate}"
    return f"{flags} --step {step}"


def _check_metrics_weights(metrics_path: str | None, metrics: Mapping[str, Any], w: Mapping[str, Any],
                           kind: str, source: str) -> None:
    """ValueError unless the metrics.json records the sha256 of the exported weights: the source
    checkpoint's or (an evaluation of an export folder) that of the same model.safetensors."""
    run = metrics.get("run") if isinstance(metrics.get("run"), Mapping) else {}
    sha = run.get("checkpoint_sha256")
    exported = f"the exported {kind} weights {os.path.basename(source)} (sha256 {w['source_sha256'][:12]}...)"
    if not isinstance(sha, str) or not sha:
        raise ValueError(f"--metrics {metrics_path} records no checkpoint_sha256 (its run block), so it "
                         f"cannot be tied to {exported}; pass the metrics.json of an evaluation of those "
                         "weights")
    if sha in (w["source_sha256"], w["sha256"]):
        return
    measured = os.path.basename(str(run.get("checkpoint") or "an unnamed checkpoint"))
    hint = _weights_hint(measured)
    fix = f"export the weights it was measured with ({hint})" if hint else "export the weights it measured"
    raise ValueError(f"--metrics {metrics_path} was measured with {measured} (sha256 {sha[:12]}...), not "
                     f"with {exported}: its numbers belong to other weights; {fix}, or evaluate "
                     f"{os.path.basename(source)} and pass that metrics.json")


def _exported_calibration(cal_path: str, source: str, export_sha: str) -> str:
    """calibration.json text for the export: a calibration made with the exported checkpoint is tied to
    model.safetensors (its checkpoint_sha256 becomes the export's, the source's goes to
    extra["exported_from"]); one made with an export of the same weights (``export_sha``) is kept; one
    without a checkpoint_sha256 is kept as is (it cannot be verified: load_pretrained warns and a
    translation run recalibrates); one made with other weights is refused."""


    src_sha = file_sha256(source)
    cals = load_calibrations(cal_path)
    for w, c in sorted(cals.items()):
        if c.checkpoint_sha256 == src_sha:
            c.checkpoint_sha256 = export_sha
            c.extra = {**c.extra, "exported_from": {"checkpoint": os.path.basename(source),
                                                    "checkpoint_sha256": src_sha}}
        elif c.checkpoint_sha256 and c.checkpoint_sha256 != export_sha:
            raise ValueError(f"calibration {cal_path} (w={w:g}) was made with the checkpoint of sha256 "
                             f"{c.checkpoint_sha256[:12]}..., not the exported {os.path.basename(source)} "
                             f"({src_sha[:12]}...); export the weights it was made with (--weights, --rate, "
                             "--step) or pass the matching --calibration")
    items = [asdict(c) for _, c in sorted(cals.items())]
    return json.dumps({"calibrations": items}, indent=2, sort_keys=True) + "\n"


def _read_inputs(run_dir: str, calibration: str | None, metrics: str | None) -> tuple[str | None, Any]:
    """(calibration path or None, metrics dict or None), checked before anything is written."""

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


def load_pretrained(export_dir: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, diffusion, {w: Calibration} or None) from an export folder; local files only.

    Raises ValueError (one line) when config.json is not an export config, the weights' SHA-256 differs
    from the one recorded, the tensors do not fit the network the config describes (naming the field), or
    a field differs from the record in model.safetensors. A calibration of other weights is dropped with a
    warning.
    """

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
    check_fits(model, sd, wpath, cfg["model"], cfg_path)
    check_weights_record(cfg, blob, cfg_path, wpath)
    model.load_state_dict(sd, strict=True)
    model.to(device).eval()
    cal_path = os.path.join(export_dir, CALIBRATION_FILE)
    cal = _calibrations_of(cal_path, cfg["weights"]["sha256"], wpath) if os.path.isfile(cal_path) else None
    return model, diffusion, cal


def _calibrations_of(cal_path: str, sha: str, wpath: str) -> dict[float, Any] | None:
    """The calibrations of ``cal_path`` made with the weights of sha256 ``sha`` (None when none is left);
    those of other weights are dropped with a warning, those that record no checkpoint kept with one."""

    cals = load_calibrations(cal_path)
    other = {w: c.checkpoint_sha256 for w, c in cals.items() if c.checkpoint_sha256 not in ("", sha)}
    unknown = [w for w, c in cals.items() if not c.checkpoint_sha256]
    if other:
        ws = ", ".join(f"{w:g}" for w in sorted(other))
        warnings.warn(f"calibration {cal_path} for w={ws} was made with other weights (checkpoint sha256 "
                      f"{next(iter(other.values()))[:12]}..., {wpath} is {sha[:12]}...); dropped: calibrate "
                      "on your validation split", stacklevel=3)
    if unknown:
        ws = ", ".join(f"{w:g}" for w in sorted(unknown))
        warnings.warn(f"calibration {cal_path} for w={ws} records no checkpoint_sha256; kept, but it cannot "
                      "be verified against the weights", stacklevel=3)
    kept = {w: c for w, c in cals.items() if w not in other}
    return kept or None


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
    p.add_argument("--trained_by", default=None,
                   help="the command that trained RUN_DIR (recorded in config.json and the model card)")
    return p


def main(argv: list[str]) -> int:
    """``scripts/export_model.py``: parse ``argv`` and export (errors go to ``cli.run_cli``)."""
    args = create_argparser().parse_args(argv)
    shown = [a for i, a in enumerate(argv)  # the training command is kept once, under trained_by
             if not (a.startswith("--trained_by") or (i and argv[i - 1] == "--trained_by"))]
    provenance = {"exported_by": "python scripts/export_model.py " + shlex.join(shown),
                  "trained_by": args.trained_by}
    cfg = export_run(args.run_dir, args.out, weights=args.weights, rate=args.rate, step=args.step,
                     calibration=args.calibration, metrics=args.metrics, overwrite=args.overwrite,
                     provenance=provenance)
    w = cfg["weights"]
    print(f"exported {w['kind']} weights of step {w['step']} ({w['n_parameters']:,} parameters) "
          f"to {args.out}")
    return 0
