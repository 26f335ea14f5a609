"""The "what produced this" section of ``panels/index.html``: checkpoint (path, step, sha256), the primary
w with the guidance-selection table, thr_01 / diff_max per w, the resolved settings of the run, and the
per-patient 3-D ("volume") metrics of the primary setting when metrics.json has them.

Kept apart from ``report.py`` (which renders metrics and panels); ``add_run_summary`` inserts the section
into an index.html that ``report.save_panels`` wrote.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from guided_diffusion.utils.io_util import atomic_write_text

MARK = "<!-- run summary -->"


def _row(*cells: Any, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def run_summary_html(metrics: Mapping[str, Any]) -> str:
    """HTML of the run summary from a metrics.json dict (translation_outputs.write_outputs)."""
    run = metrics.get("run", {})
    out = [MARK, "<h2>What produced these results</h2><table>",
           _row("checkpoint", run.get("checkpoint", "?")),
           _row("checkpoint step", run.get("checkpoint_step", "?")),
           _row("checkpoint sha256", run.get("checkpoint_sha256", "?")),
           _row("primary setting", metrics.get("primary_setting", "?")), "</table>"]
    sel = metrics.get("guidance_selection")
    cal = metrics.get("calibration", {})
    out.append("<h3>Guidance strength w</h3>")
    if sel:
        out.append(f"<p>chosen w = {sel['chosen_w']:g}: {html.escape(str(sel.get('rule', '')))} "
                   f"(tolerance {sel.get('tolerance')})</p>")
    else:
        out.append("<p>one w given (no selection)</p>")
    out.append("<table>" + _row("w", "val accuracy", "n_min / n_val", "thr_01", "diff_max", "chosen",
                                head=True))
    chosen = sel["chosen_w"] if sel else None
    for key, c in sorted(cal.items(), key=lambda kv: float(kv[0])):
        w = float(c.get("w", key))
        mark = "yes" if (chosen is None or w == chosen) else ""
        out.append(_row(f"{w:g}", f"{c.get('accuracy', float('nan')):.4f}",
                        f"{c.get('n_min')} / {c.get('n_val')}", f"{c['thr_01']:.6g}",
                        ", ".join(f"{v:.6g}" for v in c["diff_max"]), mark))
    out.append("</table><h3>Settings</h3><table>")
    for section, fields in sorted((run.get("config") or {}).items()):
        for name, value in fields.items():
            out.append(_row(section, name, json.dumps(value)))
    out.append(_row("segment", "min_cc_size (resolved)", run.get("min_cc_size")))
    out.append("</table>")
    out += volume_html(metrics.get("volume"))
    return "\n".join(out) + "\n"


VOLUME_ROWS = (("3-D Dice", "dice_3d"), ("3-D IoU", "iou_3d"), ("HD95 (mm)", "hd95_mm"),
               ("ASD (mm)", "asd_mm"), ("lesion-wise F1", "lesion_f1"), ("lesion-wise Dice", "lesion_dice"))


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def volume_html(volume: Mapping[str, Any] | None) -> list[str]:
    """HTML lines of the per-patient 3-D metrics ("volume" section of metrics.json); none without it."""
    if not volume:
        return []
    out = [f"<h3>Volume metrics (3-D, per patient; {html.escape(str(volume.get('setting', '?')))})</h3>",
           f"<p>{volume.get('n_patients')} patients ({volume.get('n_patients_lesion')} with a lesion); "
           f"voxel spacing: {html.escape(str(volume.get('spacing_source', '?')))}</p><table>",
           _row("metric", "mean", "std", head=True)]
    for label, key in VOLUME_ROWS:
        out.append(_row(label, _num(volume.get(key + "_mean")), _num(volume.get(key + "_std"))))
    out.append(_row("lesions TP / FP / FN", f"{volume.get('lesion_tp')} / {volume.get('lesion_fp')} / "
                    f"{volume.get('lesion_fn')}", f"pooled F1 {_num(volume.get('lesion_f1_pooled'))}"))
    out.append("</table><p>Conventions:</p><ul>")
    for name, text in (volume.get("conventions") or {}).items():
        out.append(f"<li>{html.escape(name)}: {html.escape(str(text))}</li>")
    out.append("</ul>")
    return out


def add_run_summary(index_path: str, metrics: Mapping[str, Any]) -> None:
    """Insert the run summary right after the page title of ``index_path`` (once)."""
    with open(index_path, encoding="utf-8") as f:
        text = f.read()
    if MARK in text:
        return
    section = run_summary_html(metrics)
    cut = text.find("</h1>")
    cut = cut + len("</h1>\n") if cut >= 0 else text.find("<body>") + len("<body>")
    atomic_write_text(text[:cut] + section + text[cut:], index_path)
