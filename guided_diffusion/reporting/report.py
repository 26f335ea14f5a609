"""Evaluation outputs: JSON / CSV / npz / PNG panels + index.html / NIfTI volumes
(docs/method.md, 'Evaluation run').

Every file is written atomically through ``guided_diffusion.utils.io_util`` (temp file beside the target, then
rename); PNG, NIfTI and npz are rendered into memory first.  No pyplot state is used (figures are drawn
with matplotlib's Agg canvas), so this is safe in headless / multi-process runs.

API
---
    write_metrics_json(path, metrics) -> str
        nested dict -> indented, key-sorted, strict JSON (numpy scalars/arrays converted, NaN/inf -> null).
    write_csv(path, rows, fieldnames=None) -> str
        list of flat dicts -> CSV with a header (union of keys, first-seen order); None -> empty cell.
    flatten_metrics(metrics, sep=".") -> dict[str, scalar]
        {"mixed": {"dice": ..}} -> {"mixed.dice": ..} (scalar leaves only).
    save_panels(out_dir, items, modality_names, modalities=None, metrics=None, title="AnoFPDM evaluation")
        -> list[str]: one PNG per item (columns: each shown modality, ground truth, anomaly map, predicted
        mask, overlay TP/FP/FN; Dice in the title) + ``index.html`` linking them under a metrics table.
        item = {"source": [C,H,W], "gt": [H,W], "anomaly_map": [H,W], "pred_mask": [H,W],
                optional "patient", "slice", "dice", "label", "pred_label", "name", "pred_mask_raw" (the mask
                before the size filter), "min_cc_size"}; an empty predicted mask of a slice predicted
                unhealthy is explained in the title (empty_mask_reason).
    write_index_html(out_dir, metrics, panel_files, title="AnoFPDM evaluation") -> str
    read_meta(path_or_none) -> dict | None       (a patient's meta.json; None when missing)
    resampled_affine(affine, original_shape, new_hw) -> np.ndarray [4, 4]
    save_nifti_volumes(out_dir, patient_id, slice_numbers, anomaly_map, pred_mask, meta=None, gt=None)
        -> dict[str, str]: ``{patient}_anomaly_map.nii.gz``, ``{patient}_pred_mask.nii.gz`` (and
        ``{patient}_gt.nii.gz`` when gt is given); slices [S, H, W] placed at z = slice number.
    save_arrays(path, **arrays) -> str           (compressed .npz; ".npz" appended when missing)

NIfTI geometry: the preprocessing (docs/method.md, 'Preprocessing') takes axial slices ``vol[:, :, k]`` of an
H0 x W0 x D0 volume and resizes each slice to H x W (bilinear, align_corners=False) without cropping. The
output volume has shape [H, W, D] with slice k at z index k (D = D0 from meta "shape", else max(slice)+1;
slices that were not evaluated are 0). Its affine is the original affine composed with the in-plane
resampling: voxel i of the resized axis maps to original index (i + 0.5) * H0 / H - 0.5 (same for W), so the
voxel size grows by H0/H, W0/W while z is unchanged. Without meta (or without "shape") the affine is the
original one (or the identity when no affine is known) and is not rescaled.
"""

from __future__ import annotations

import csv
import gzip
import html
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from guided_diffusion.utils.io_util import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    strict_json,
)

__all__ = [
    "write_metrics_json",
    "write_csv",
    "flatten_metrics",
    "save_panels",
    "write_index_html",
    "read_meta",
    "resampled_affine",
    "save_nifti_volumes",
    "save_arrays",
]

HEADLINE = (
    ("mixed", "dice"), ("mixed", "iou"), ("mixed", "auprc"),
    ("unhealthy", "dice"), ("unhealthy", "iou"), ("unhealthy", "auprc"),
)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def write_metrics_json(path: str, metrics: Mapping[str, Any]) -> str:
    """Write a (nested) metrics dict as strict JSON (NaN/inf become null). Returns the path."""
    atomic_write_json(strict_json(metrics), os.fspath(path))
    return os.fspath(path)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if hasattr(v, "item"):
        v = v.item()
    return v


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> str:
    """Write flat dict rows as CSV (header = ``fieldnames`` or the union of keys in first-seen order)."""
    if fieldnames is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(str(k), None)
        fieldnames = list(seen)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="raise", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({str(k): _cell(v) for k, v in r.items()})
    atomic_write_text(buf.getvalue(), os.fspath(path))
    return os.fspath(path)


def flatten_metrics(metrics: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Nested dict -> {"a.b": scalar}; lists/arrays are skipped."""
    out: dict[str, Any] = {}

    def rec(prefix: str, obj: Any) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
        elif isinstance(obj, (bool, int, float, str, np.generic)) or obj is None:
            out[prefix] = obj.item() if isinstance(obj, np.generic) else obj

    rec("", metrics)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4f}"
    return str(v)


def _safe_name(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("._") or "x"


def _render_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


_OVERLAY_CMAP = ListedColormap([(0, 0, 0, 0), (0.1, 0.85, 0.1, 1), (0.95, 0.15, 0.1, 1), (0.2, 0.4, 1, 1)])


def _panel_png(item: Mapping[str, Any], modality_names: Sequence[str], modalities: Sequence[int]) -> bytes:
    src = _np(item["source"]).astype(np.float32)
    if src.ndim == 4 and src.shape[0] == 1:
        src = src[0]
    if src.ndim != 3:
        raise ValueError(f"panel item `source` must be [C, H, W], got {tuple(src.shape)}")

    def hw(key: str) -> np.ndarray:
        a = _np(item[key])
        a = a.reshape(a.shape[-2:]) if a.ndim > 2 and int(np.prod(a.shape[:-2])) == 1 else a
        if a.ndim != 2 or a.shape != src.shape[1:]:
            raise ValueError(f"panel item `{key}` must be [H, W] = {src.shape[1:]}, got {tuple(a.shape)}")
        return a

    gt = hw("gt") > 0.5
    amap = hw("anomaly_map").astype(np.float32)
    pred = hw("pred_mask") > 0.5
    ncol = len(modalities) + 4
    fig = Figure(figsize=(2.2 * ncol, 2.6))
    axes = fig.subplots(1, ncol)
    for ax, m in zip(axes, modalities):
        ax.imshow(src[m], cmap="gray", vmin=-1, vmax=1)
        name = modality_names[m] if m < len(modality_names) else f"ch{m}"
        ax.set_title(str(name), fontsize=9)
    k = len(modalities)
    axes[k].imshow(gt, cmap="gray", vmin=0, vmax=1)
    axes[k].set_title("ground truth", fontsize=9)
    im = axes[k + 1].imshow(amap, cmap="inferno")
    axes[k + 1].set_title("anomaly map", fontsize=9)
    fig.colorbar(im, ax=axes[k + 1], fraction=0.046, pad=0.02)
    axes[k + 2].imshow(pred, cmap="gray", vmin=0, vmax=1)
    axes[k + 2].set_title("predicted mask", fontsize=9)
    over = np.zeros(gt.shape, np.int64)
    over[pred & gt], over[pred & ~gt], over[~pred & gt] = 1, 2, 3
    base = src[modalities[0]] if len(modalities) else np.zeros(gt.shape, np.float32)
    axes[k + 3].imshow(base, cmap="gray", vmin=-1, vmax=1)
    axes[k + 3].imshow(over, cmap=_OVERLAY_CMAP, vmin=0, vmax=3, interpolation="nearest")
    axes[k + 3].set_title("TP green FP red FN blue", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    reason = empty_mask_reason(item)
    if reason:
        axes[k + 2].text(0.5, 0.5, "empty", color="white", ha="center", va="center", fontsize=9,
                         transform=axes[k + 2].transAxes)
    fig.suptitle(panel_title(item), fontsize=10 if not reason else 8)
    fig.tight_layout()
    return _render_png(fig)


def empty_mask_reason(item: Mapping[str, Any]) -> str | None:
    """Why the predicted mask of ``item`` is empty although the slice was predicted unhealthy (else None):
    every component removed by the size filter (``pred_mask_raw`` non-empty) or no pixel above the
    threshold. A slice predicted healthy is not segmented (its title already says ``pred 0``)."""
    if int(item.get("pred_label", 1)) != 1 or bool((_np(item["pred_mask"]) > 0.5).any()):
        return None
    raw = item.get("pred_mask_raw")
    if raw is not None and bool((_np(raw) > 0.5).any()):
        size = item.get("min_cc_size")
        limit = f" (components <= {int(size)} px are dropped)" if size is not None else ""
        return f"empty mask: every component removed by the size filter{limit}"
    if raw is not None:
        return "empty mask: no pixel of the anomaly map reached the threshold"
    return "empty mask"


def panel_title(item: Mapping[str, Any]) -> str:
    """Panel headline: patient | slice | label | pred | Dice, plus the empty-mask reason when there is one."""
    parts = []
    if "patient" in item:
        parts.append(f"patient {item['patient']}")
    if "slice" in item:
        parts.append(f"slice {item['slice']}")
    if "label" in item:
        parts.append(f"label {int(item['label'])}")
    if "pred_label" in item:
        parts.append(f"pred {int(item['pred_label'])}")
    if item.get("dice") is not None:
        parts.append(f"Dice {float(item['dice']):.3f}")
    reason = empty_mask_reason(item)
    return " | ".join(parts) + (f"\n{reason}" if reason else "")


def write_index_html(out_dir: str, metrics: Mapping[str, Any] | None, panel_files: Sequence[str],
                     title: str = "AnoFPDM evaluation", captions: Sequence[str] | None = None) -> str:
    """index.html with a headline table (paper Table 1 columns), all scalar metrics, and the panels (each
    with its caption, e.g. the panel title with the empty-mask reason, when ``captions`` is given)."""
    flat = flatten_metrics(metrics or {})
    esc = html.escape
    lines = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:2px 8px}img{max-width:100%}</style>",
             "</head><body>", f"<h1>{esc(title)}</h1>"]
    head = [(f"{s}.{k}", flat[f"{s}.{k}"]) for s, k in HEADLINE if f"{s}.{k}" in flat]
    if head:
        lines.append("<h2>Headline (paper Table 1 columns)</h2><table><tr>")
        lines += [f"<th>{esc(k)}</th>" for k, _ in head]
        lines.append("</tr><tr>")
        lines += [f"<td>{esc(_fmt(v))}</td>" for _, v in head]
        lines.append("</tr></table>")
    if flat:
        lines.append("<h2>All metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        lines += [f"<tr><td>{esc(k)}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in flat.items()]
        lines.append("</table>")
    if panel_files:
        lines.append("<h2>Examples</h2>")
        for k, f in enumerate(panel_files):
            name = esc(os.path.basename(f))
            caption = captions[k] if captions is not None and k < len(captions) else ""
            text = f"<br>{esc(caption).replace(chr(10), '<br>')}" if caption else ""
            lines.append(f"<p><a href='{name}'><img src='{name}' alt='{name}'></a>{text}</p>")
    lines.append("</body></html>")
    path = os.path.join(os.fspath(out_dir), "index.html")
    atomic_write_text("\n".join(lines) + "\n", path)
    return path


def save_panels(out_dir: str, items: Sequence[Mapping[str, Any]], modality_names: Sequence[str],
                modalities: Sequence[int] | None = None, metrics: Mapping[str, Any] | None = None,
                title: str = "AnoFPDM evaluation") -> list[str]:
    """Render one PNG panel per item into ``out_dir`` plus ``index.html``; returns all written paths.

    Args:
        items: dicts with "source" [C,H,W] (in [-1, 1]), "gt", "anomaly_map", "pred_mask" [H,W], optional
            "patient", "slice", "label", "pred_label", "dice", "name" (file stem), "pred_mask_raw" and
            "min_cc_size" (for the empty-mask reason; see empty_mask_reason).
        modality_names: names of the source channels, e.g. ["FLAIR", "T1", "T1ce", "T2"].
        modalities: channel indices to show (the modalities used); default all channels.
        metrics: dataset metrics shown in index.html (e.g. SegmentationEvaluator.results()).
    """
    out_dir = os.fspath(out_dir)
    written = []
    for i, item in enumerate(items):
        for key in ("source", "gt", "anomaly_map", "pred_mask"):
            if key not in item:
                raise ValueError(f"panel item {i} lacks `{key}`; expected keys source, gt, anomaly_map, "
                                 "pred_mask")
        n_ch = _np(item["source"]).shape[-3]
        mods = list(range(n_ch)) if modalities is None else [int(m) for m in modalities]
        bad = [m for m in mods if not 0 <= m < n_ch]
        if bad:
            raise ValueError(f"`modalities` {bad} out of range for a source with {n_ch} channels")
        stem = item.get("name") or "_".join(
            [f"panel_{i:03d}"] + [_safe_name(item[k]) for k in ("patient", "slice") if k in item])
        path = os.path.join(out_dir, _safe_name(stem) + ".png")
        atomic_write_bytes(_panel_png(item, modality_names, mods), path)
        written.append(path)
    captions = [panel_title(item) for item in items]
    written.append(write_index_html(out_dir, metrics, written, title, captions))
    return written


def read_meta(path: str | None) -> dict[str, Any] | None:
    """Load a patient's meta.json ({"affine", "shape", "slices", "modalities"}); None if absent."""
    if path is None or not os.path.isfile(os.fspath(path)):
        return None
    with open(os.fspath(path), encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); regenerate it with scripts/preprocess.py") from e


def resampled_affine(affine: Any, original_shape: Sequence[int], new_hw: Sequence[int]) -> np.ndarray:
    """Affine of a volume whose axial slices (axes 0, 1) were resized from original_shape[:2] to new_hw.

    Index i on a resized axis corresponds to original index (i + 0.5) * s - 0.5 with s = old / new
    (bilinear, align_corners=False); the slice axis (2) is unchanged.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    if len(original_shape) < 2 or len(new_hw) != 2:
        raise ValueError(f"need original_shape (H0, W0, ...) and new_hw (H, W); "
                         f"got {original_shape}, {new_hw}")
    s = np.eye(4)
    for ax in (0, 1):
        scale = float(original_shape[ax]) / float(new_hw[ax])
        s[ax, ax] = scale
        s[ax, 3] = 0.5 * scale - 0.5
    return a @ s


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), mtime=0)


def save_nifti_volumes(out_dir: str, patient_id: Any, slice_numbers: Sequence[int], anomaly_map: Any,
                       pred_mask: Any, meta: Mapping[str, Any] | str | None = None,
                       gt: Any = None) -> dict[str, str]:
    """Stack a patient's slices into NIfTI volumes [H, W, D] (slice k at z = k) and write them.

    Args:
        slice_numbers: S original axial slice indices; anomaly_map / pred_mask (/ gt): [S,(1,)H,W].
        meta: the patient's meta.json (dict or path); its "affine" (+ "shape" for the in-plane rescale,
            see module docstring) is used; identity affine when absent.
    Returns: {"anomaly_map": path, "pred_mask": path[, "gt": path]}.
    """
    if isinstance(meta, (str, os.PathLike)):
        meta = read_meta(os.fspath(meta))
    slices = [int(s) for s in slice_numbers]
    if len(set(slices)) != len(slices) or any(s < 0 for s in slices):
        raise ValueError(f"`slice_numbers` must be distinct non-negative ints, got {slices}")
    arrays = {"anomaly_map": anomaly_map, "pred_mask": pred_mask}
    if gt is not None:
        arrays["gt"] = gt
    vols: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        a = _np(a)
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 3 or a.shape[0] != len(slices):
            raise ValueError(f"`{name}` must be [S, H, W] with S = {len(slices)} slices, "
                             f"got {tuple(a.shape)}")
        vols[name] = a
    h, w = vols["anomaly_map"].shape[1:]
    affine = np.eye(4)
    depth = max(slices) + 1 if slices else 1
    if meta and meta.get("affine") is not None:
        affine = np.asarray(meta["affine"], dtype=np.float64)
        if meta.get("shape") is not None:
            shape0 = [int(v) for v in meta["shape"]]
            affine = resampled_affine(affine, shape0, (h, w))
            if len(shape0) > 2:
                depth = max(depth, shape0[2])
    out_dir = os.fspath(out_dir)
    written = {}
    pid = _safe_name(patient_id)
    for name, a in vols.items():
        dtype = np.float32 if name == "anomaly_map" else np.uint8
        vol = np.zeros((h, w, depth), dtype=dtype)
        for j, s in enumerate(slices):
            vol[:, :, s] = a[j] if name == "anomaly_map" else (a[j] > 0.5)
        path = os.path.join(out_dir, f"{pid}_{name}.nii.gz")
        atomic_write_bytes(_nifti_bytes(vol, affine), path)
        written[name] = path
    return written


def save_arrays(path: str, **arrays: Any) -> str:
    """Save named arrays (numpy or torch) to a compressed .npz atomically; returns the final path."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    if not arrays:
        raise ValueError(f"save_arrays({path!r}) got no arrays; pass them as keyword arguments")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: _np(v) for k, v in arrays.items()})
    atomic_write_bytes(buf.getvalue(), path)
    return path
