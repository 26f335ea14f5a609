"""``--model_dir EXPORT`` of translation: load an export folder (guided_diffusion.export.export) for a run.

* The network is built from the run's typed configs (so ``--timestep_respacing`` etc. still apply); the
  export's config.json must describe the same network: its resolved model config and the diffusion fields
  that define what the weights mean (:data:`DIFFUSION_FIELDS`) must equal the run's, else one ValueError
  line names every differing field.
* The weights come from ``model.safetensors`` (SHA-256 checked against config.json, config.json's fields
  against the tensors and the record the export wrote into the file's metadata); the checkpoint
  sha256 the results are tied to is that file's sha256. ``--ema`` / ``--ema_rate`` do not apply (the export
  holds one set of weights, named in config.json "weights"); ``--model_num`` must be the export's step.
* The export's ``calibration.json`` is used when the user gives no ``--calibration`` (and no stored
  calibration is resumed) and it matches this run (every w present, every statistics-changing setting,
  the checkpoint sha256, the validation pass and the validation split's content equal); otherwise the run
  calibrates on its validation split as usual (the reason is logged).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from guided_diffusion.configs.base import DiffusionConfig, ModelConfig, field_names
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.configs.eval_configs import EVALUATION_SECTIONS, CheckpointConfig, EvalRun
from guided_diffusion.data.stored_calibration import checked_calibrations
from guided_diffusion.export.export import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    _sha256,
    flags_from_config,
    is_export_dir,
    read_export,
)
from guided_diffusion.export.weights_check import check_fits, check_weights_record, export_tensors
from guided_diffusion.script_util import create_from_configs, drop_foreign_options, model_config
from guided_diffusion.utils import logger

# learn_sigma is part of the resolved model config (it changes the output channels)
DIFFUSION_FIELDS = ("diffusion_steps", "noise_schedule", "predict_xstart", "rescale_timesteps")

__all__ = ["DIFFUSION_FIELDS", "config_differences", "export_calibrations", "export_run_sections",
           "load_export_model"]


def export_run_sections(export_dir: str) -> dict[str, dict[str, Any]]:
    """The run-record sections an evaluation of the export folder starts from when no flag is given:
    "model" / "diffusion" from the exported network (its flags), overlaid with the settings of the
    evaluation its metrics came from (config.json "evaluation", when the export has one)."""

    cfg, _ = read_export(export_dir)
    where = os.path.join(export_dir, CONFIG_FILE)
    try:
        flags = flags_from_config(cfg["model"], cfg["diffusion"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: model / diffusion section is incomplete ({err}); re-export") from err
    sections: dict[str, dict[str, Any]] = {
        "model": {k: v for k, v in flags.items() if k in field_names(ModelConfig)},
        "diffusion": {k: v for k, v in flags.items() if k in field_names(DiffusionConfig)},
    }
    evaluation = cfg.get("evaluation") or {}
    if not isinstance(evaluation, dict):
        raise ValueError(f"{where}: \"evaluation\" must be an object of sections, got {evaluation!r}")
    for name, fields in evaluation.items():
        if name not in EVALUATION_SECTIONS or not isinstance(fields, dict):
            raise ValueError(f"{where}: \"evaluation\" section {name!r} is not one of "
                             f"{', '.join(EVALUATION_SECTIONS)} with an object of fields")
        sections[name] = {**sections.get(name, {}), **fields}
    return sections


def config_differences(cfg: dict[str, Any], model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig
                       ) -> list[str]:
    """'field: export X, this run Y' for every model / weight-defining diffusion field that differs."""

    want = model_config(model_cfg, diffusion_cfg)
    have = drop_foreign_options(cfg.get("model") or {})  # older exports list other variants' options
    diffs = [f"{k}: export {have.get(k)!r}, this run {want.get(k)!r}"
             for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
    have_d, want_d = dict(cfg.get("diffusion") or {}), diffusion_cfg.to_dict()
    diffs += [f"{k}: export {have_d.get(k)!r}, this run {want_d[k]!r}"
              for k in DIFFUSION_FIELDS if have_d.get(k) != want_d[k]]
    return diffs


def load_export_model(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, ckpt: CheckpointConfig,
                      device: str | torch.device) -> tuple[torch.nn.Module, Any, str, str]:
    """(model in eval mode on ``device``, diffusion, model.safetensors path, its sha256) of the export
    folder ``ckpt.model_dir``, built from the run's configs; ValueError (one line) on a mismatch."""

    export_dir = ckpt.model_dir
    cfg, blob = read_export(export_dir)
    diffs = config_differences(cfg, model_cfg, diffusion_cfg)
    if diffs:
        raise ValueError(f"--model_dir {export_dir} is an export whose {CONFIG_FILE} differs from this run's "
                         f"flags ({'; '.join(diffs)}); run with the export's flags (its {CONFIG_FILE} / "
                         "README.md)")
    step = (cfg.get("weights") or {}).get("step")
    given = str(ckpt.model_num).strip() if ckpt.model_num is not None else ""
    if given and (not given.isdigit() or int(given) != step):
        raise ValueError(f"--model_num {ckpt.model_num}: the export {export_dir} holds the weights of step "
                         f"{step} only; omit --model_num")
    path = os.path.join(export_dir, WEIGHTS_FILE)
    model, diffusion = create_from_configs(model_cfg, diffusion_cfg)
    sd = export_tensors(blob, path)
    cfg_path = os.path.join(export_dir, CONFIG_FILE)
    check_fits(model, sd, path, cfg.get("model"), cfg_path)
    check_weights_record(cfg, blob, cfg_path, path)
    model.load_state_dict(sd, strict=True)
    model.to(device).eval()
    return model, diffusion, path, _sha256(blob)


def export_calibrations(run: EvalRun, sha: str) -> tuple[str, dict[float, Calibration]] | None:
    """(path, {w: Calibration}) of the export folder's calibration.json when ``run.checkpoint.model_dir``
    is an export with one that fits the run: every w of the run, its statistics settings, checkpoint
    ``sha``, its validation pass (``--num_slices_val``, ``--seed``) and the validation split's content
    fingerprint; else None (the reason is logged when the file exists but does not fit)."""

    export_dir = run.checkpoint.model_dir
    path = os.path.join(export_dir, CALIBRATION_FILE)
    if not (is_export_dir(export_dir) and os.path.isfile(path)):
        return None
    other_data = ("another dataset, or the synthetic data built on another CPU type (other last bits of its "
                  "floats, docs/edges.md)")
    try:
        cals = checked_calibrations(path, run, sha, hint="its statistics belong to other settings",
                                    same_pass=True, source=f"the export's {CALIBRATION_FILE}",
                                    data_hint=other_data)
    except ValueError as err:
        logger.log(f"not using the export's calibration {path}: {err}; calibrating on the validation split")
        return None
    return path, cals
