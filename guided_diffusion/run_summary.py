"""The "what produced this" section of ``panels/index.html``: checkpoint (path, step, sha256), the primary
w with the guidance-selection table, thr_01 / diff_max per w, and the resolved settings of the run.

Kept apart from ``report.py`` (which renders metrics and panels); ``add_run_summary`` inserts the section
into an index.html that ``report.save_panels`` wrote.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from .io_util import atomic_write_text

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
    return "\n".join(out) + "\n"


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
