"""README.md model card of an export folder (guided_diffusion.export.export)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# (metrics.json block, key, label) shown in the card when present
CARD_METRICS = (
    ("mixed", "dice", "slice Dice, all test slices (gated masks)"),
    ("mixed", "dice_lesion", "slice Dice, slices with lesion"),
    ("mixed", "auroc", "pixel AUROC (foreground)"),
    ("mixed", "auprc", "pixel AUPRC (foreground)"),
    ("unhealthy", "dice", "slice Dice, unhealthy slices (ungated masks)"),
    ("patient", "dice_mean", "patient Dice (stacked slices), mean"),
    ("image", "accuracy", "slice classification accuracy"),
    ("image", "f1", "slice classification F1"),
    ("volume", "dice_3d_mean", "3-D Dice per patient, mean"),
    ("volume", "hd95_mm_mean", "HD95 (mm) per patient, mean"),
    ("volume", "lesion_f1_mean", "lesion-wise F1 per patient, mean"),
    ("volume", "lesion_dice_mean", "lesion-wise Dice per patient, mean"),
)


TRAIN_KEYS = ("data_dir", "batch_size", "lr", "max_steps", "total_epochs", "threshold", "precision", "seed")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _metrics_rows(metrics: Mapping[str, Any]) -> list[str]:
    rows = []
    for block, key, label in CARD_METRICS:
        val = metrics.get(block, {}).get(key) if isinstance(metrics.get(block), Mapping) else None
        if val is not None:
            rows.append(f"| {label} | `{block}.{key}` | {_fmt(val)} |")
    return rows


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any] | None, has_calibration: bool) -> str:
    """Markdown model card from an export config.json and an optional metrics.json dict."""
    m, d, t, w = config["model"], config["diffusion"], config.get("train", {}), config["weights"]
    weights = f"EMA (rate {w['ema_rate']})" if w["kind"] == "ema" else "raw model (not EMA)"
    lines = [
        f"# hae-fpdm model: `unet_ver={m.get('unet_ver')}`, {m.get('image_size')} px, "
        f"{m.get('in_channels')} channels",
        "",
        "Classifier-free-guided diffusion UNet for weakly supervised brain-MRI anomaly segmentation with "
        "AnoFPDM (hae-fpdm).",
        "",
        "## Load",
        "",
        "```python",
        "from guided_diffusion.export.export import load_pretrained",
        "model, diffusion, calibration = load_pretrained('THIS_FOLDER')  # local files only",
        "```",
        "",
        "## Architecture",
        "",
        f"- `unet_ver`: {m.get('unet_ver')}; parameters: {w['n_parameters']:,}",
        f"- image_size {m.get('image_size')}, in_channels {m.get('in_channels')}, num_channels "
        f"{m.get('num_channels')}, channel_mult {m.get('channel_mult')}, num_res_blocks "
        f"{m.get('num_res_blocks')}",
        f"- attention at downsample factors {m.get('attention_resolutions')}, num_heads "
        f"{m.get('num_heads')}, num_head_channels {m.get('num_head_channels')}",
        f"- classes: {m.get('num_classes')} (classifier-free label embedding); learn_sigma "
        f"{m.get('learn_sigma')}",
        f"- diffusion: {d.get('diffusion_steps')} steps, {d.get('noise_schedule')} schedule, "
        f"predict_xstart {d.get('predict_xstart')}",
        "",
        "## Training",
        "",
        f"- weights: {weights} at step {w['step']} (from `{w['source']}`)",
    ]
    for key in TRAIN_KEYS:
        if key in t:
            lines.append(f"- {key}: {t[key]}")
    made = config.get("provenance") or {}
    if made:
        lines += ["", "## How it was made", ""]
        for key, label in (("trained_by", "Trained by"), ("exported_by", "Exported by")):
            if made.get(key):
                lines += [f"{label}:", "", "```bash", made[key], "```", ""]
        lines.pop()
    lines += ["", "## Measured metrics", ""]
    rows = _metrics_rows(metrics) if metrics else []
    if rows:
        setting = metrics.get("primary_setting", "")
        lines += [f"From the metrics.json given at export{f' (setting {setting})' if setting else ''}.", "",
                  "| metric | key | value |", "|---|---|---|", *rows]
    else:
        lines.append("No metrics.json was given at export (`--metrics`); evaluate with "
                     "scripts/translation_FPDM.py.")
    lines += [
        "",
        "## Calibration",
        "",
        "calibration.json (validation thresholds per guidance strength w) is included."
        if has_calibration else "No calibration.json: calibrate on your validation split before segmenting.",
        "",
        "## Intended use",
        "",
        "Research on weakly supervised anomaly segmentation of skull-stripped, co-registered axial brain-MRI "
        "slices preprocessed like the training data (scripts/preprocess.py: per-slice min-max to [-1, 1], "
        "the same modalities, channel order and image size).",
        "",
        "## Limits",
        "",
        "- Not a medical device; not for diagnosis or treatment decisions.",
        "- Trained on the data listed above only; other scanners, sequences, resolutions, pathologies or "
        "preprocessing shift the calibration and the results.",
        "- Slice-wise 2-D model; 3-D metrics come from stacking slices.",
        "- The metrics and calibration given at export were checked to come from these weights (the sha256 "
        "they record); the calibration is keyed to model.safetensors (the source checkpoint's sha256 is in "
        "its extra.exported_from).",
        "",
    ]
    return "\n".join(lines)
