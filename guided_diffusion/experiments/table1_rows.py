"""Table 1's rows (tuning, comparison and AnoFPDM rows per seed), its tables and its Fig. 4-style panel.

``build_rows`` runs, through ``experiments.run_rows`` (resumable, fingerprinted):

1. one ``tune_<method>`` row per comparison method (seed 0): the grid search of table1_methods.tune_method
   on validation slices with pixel labels; its result (L, s / w, threshold) enters the settings of
2. the ``<method>`` rows (one per evaluation seed): test metrics with the tuned values;
3. the ``anofpdm_*`` rows: scripts/translation_FPDM.py (label-free) per seed (a subprocess through the
   ``--launcher``, or ``translation.main`` in this process when none is given), read back with
   ``experiments.read_anofpdm_metrics``; network evaluations per slice = 2 x forward steps (one network
   call on the doubled batch per forward step, anofpdm/forward.py).

``panel_and_tables`` writes table1.md / .csv / .json and fig4_panel.png (input, GT, then the anomaly map
and mask of every method on the first test slices, seed 0).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from guided_diffusion.anofpdm import translation
from guided_diffusion.baselines import table1_methods as tm
from guided_diffusion.data.flair_baseline import flair_channel
from guided_diffusion.experiments import denoiser_comparison as dc
from guided_diffusion.experiments import experiments as ex
from guided_diffusion.experiments.denoiser_comparison import REPO
from guided_diffusion.reporting.plots import _pyplot, _save

TUNE_SEED = 0
TEST_ONLY = ("num_test", "panel_slices")  # MethodConfig fields that leave the tuning alone

# the Table 1 rows of AnoFPDM (encoding, S_te = --last_only), their display names and the table's columns
ANOFPDM_ROWS = {"anofpdm_ddim": ("ddim", False), "anofpdm_ddpm": ("ddpm", False),
                "anofpdm_ddim_ste": ("ddim", True), "anofpdm_ddpm_ste": ("ddpm", True)}
DISPLAY = {"anoddpm_gaussian": "AnoDDPM (G)", "anoddpm_simplex": "AnoDDPM (S)",
           "ddim_classifier": "DDIM + classifier guidance", "ddim_cfg": "DDIM + CFG",
           "anofpdm_ddim": "AnoFPDM (DDIM)", "anofpdm_ddpm": "AnoFPDM (DDPM)",
           "anofpdm_ddim_ste": "AnoFPDM (DDIM S_te)", "anofpdm_ddpm_ste": "AnoFPDM (DDPM S_te)",
           "flair": "FLAIR intensity"}
PIXEL_MARK = " †"
COLUMNS = [
    *[ex.Column(f"{s}.{m}", f"{s[:3]}. {m.upper()} (%)", 100, 1)
      for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc")],
    ex.Column("volume.dice_3d_mean", "3-D DICE (%)", 100, 1),
    ex.Column("volume.hd95_mm_mean", "HD95 (mm)", 1, 1),
    ex.Column("volume.lesion_f1_mean", "lesion F1 (%)", 100, 1),
    ex.Column("nfe_per_slice", "net evals / slice", 1, 0, False),
    ex.Column("seconds_per_slice", "s / slice", 1, 3),
    ex.Column("pixel_labels", "pixel labels", 1, 0, False),
]


def anofpdm_command(cfg: Mapping[str, Any], row: str, data_dir: str, model_dir: str, log_dir: str,
                    seed: int, prefix: list[str]) -> list[str]:
    """scripts/translation_FPDM.py for one AnoFPDM row (encoding, S_te = --last_only) and seed."""
    encoding, last_only = ANOFPDM_ROWS[row]
    return [*dc.eval_command(cfg, dc.NETWORK_ROWS["v2"], data_dir, model_dir, log_dir, seed, prefix),
            "--modality", *map(str, cfg["modality"]), "--encoding", encoding, "--last_only", str(last_only),
            "--save_data", "True"]


def _method_config(cfg: Mapping[str, Any], method: str, data_dir: str, seed: int) -> tm.MethodConfig:
    grids = {"anoddpm_gaussian": (cfg["anoddpm_levels"], [0.0]),
             "anoddpm_simplex": (cfg["anoddpm_levels"], [0.0]),
             "ddim_classifier": (cfg["clf_levels"], cfg["clf_scales"]),
             "ddim_cfg": (cfg["cfg_levels"], cfg["cfg_w"]), "flair": ([0], [0.0])}
    levels, scales = grids[method]
    flair = 0
    if method == "flair":
        flair = flair_channel(data_dir, "test")
    return tm.MethodConfig(
        method=method, data_dir=data_dir, levels=tuple(int(v) for v in levels),
        scales=tuple(float(v) for v in scales), thresholds=int(cfg["thresholds"]),
        modality=tuple(cfg["modality"]), flair_channel=flair,
        simplex_frequency=float(cfg["simplex_frequency"]), timestep_respacing=cfg["timestep_respacing"],
        num_val=cfg["num_slices_val"], num_test=cfg["num_slices"],
        batch_size=int(cfg["eval_batch"]), seed=seed, panel_slices=int(cfg["panel_slices"]))


_MODEL_KEY = {"anoddpm_gaussian": "anoddpm_gaussian", "anoddpm_simplex": "anoddpm_simplex",
              "ddim_classifier": "clf_model", "ddim_cfg": "fpdm"}


def _keys(method: str) -> dict[str, str]:
    """{role: model key} of the networks ``method`` loads."""
    keys = {"model": _MODEL_KEY[method]} if method in _MODEL_KEY else {}
    if method == "ddim_classifier":
        keys["classifier"] = "classifier"
    return keys


def _paths(method: str, models: Mapping[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    return {role: models[k] for role, k in _keys(method).items()}


def _shas(method: str, shas: Mapping[str, str]) -> dict[str, str]:
    return {role: shas[k] for role, k in _keys(method).items()}


class _ModelCache:
    """Loads each method's networks once per process (shared by its tuning and seed rows)."""

    def __init__(self, models: Mapping[str, tuple[str, str]], respacing: str):
        self.models, self.respacing, self.cache = models, respacing, {}

    def get(self, method: str) -> tm.Models:
        if method not in self.cache:
            self.cache[method] = tm.build_models(method, _paths(method, self.models), self.respacing)
        return self.cache[method]


def build_rows(cfg: Mapping[str, Any], base: Mapping[str, Any], models: Mapping[str, tuple[str, str]],
               shas: Mapping[str, str], out: str, data_dir: str, prefix: list[str], env: Mapping[str, str],
               recompute: bool) -> list[dict[str, Any]]:
    """Run (or reuse) every row of ``cfg["rows"]``; returns the evaluation records (no tuning rows)."""
    mode = "recompute" if recompute else "refuse"
    comparison = [r for r in cfg["rows"] if r in tm.METHODS]
    cache = _ModelCache(models, cfg["timestep_respacing"])
    tune_rows = []
    for method in comparison:
        mc = _method_config(cfg, method, data_dir, TUNE_SEED)
        tune_set = {k: v for k, v in _plain(mc).items() if k not in TEST_ONLY}
        settings = {**base, "method": tune_set, "checkpoints": _shas(method, shas)}
        tune_rows.append(ex.Row(f"tune_{method}", TUNE_SEED, settings,
                                lambda work, m=method, c=mc: tm.tune_method(c, cache.get(m))))
    tuned = {r["name"][len("tune_"):]: r for r in ex.run_rows(tune_rows, out, mode)}
    rows = []
    for method in cfg["rows"]:
        for seed in cfg["eval_seeds"]:
            if method in ANOFPDM_ROWS:
                rows.append(_anofpdm_row(cfg, base, method, seed, models, shas, data_dir, prefix, env))
                continue
            mc = _method_config(cfg, method, data_dir, seed)
            best = {k: tuned[method]["metrics"][k] for k in ("level", "scale", "threshold", "val_dice")}
            settings = {**base, "method": _plain(mc), "checkpoints": _shas(method, shas),
                        "tuned": best}

            def fn(work, m=method, c=mc, b=best):
                res = tm.evaluate_method(c, cache.get(m), b, work)
                return {**res, "pixel_labels": 1.0}
            rows.append(ex.Row(method, seed, settings, fn))
    return ex.run_rows(rows, out, mode)


def _anofpdm_row(cfg: Mapping[str, Any], base: Mapping[str, Any], row: str, seed: int,
                 models: Mapping[str, tuple[str, str]], shas: Mapping[str, str], data_dir: str,
                 prefix: list[str], env: Mapping[str, str]) -> ex.Row:
    model_dir = models["fpdm"][0]
    keys = ("forward_steps", "w", "num_slices", "num_slices_val", "eval_batch", "modality")
    settings = {**base, **{k: cfg[k] for k in keys}, "row": row, "checkpoint_sha256": shas["fpdm"]}

    def fn(work: str) -> dict[str, Any]:
        ev = os.path.join(work, "eval")
        cmd = anofpdm_command(cfg, row, data_dir, model_dir, ev, seed, prefix)
        if prefix == [sys.executable]:  # no --launcher: the same evaluation in this process (no start-up)

            print("$ (in process) " + shlex.join(cmd[1:]), flush=True)
            translation.main(cmd[2:])
        else:
            ex.run_command(cmd, str(tm_repo()), env)
        res = ex.read_anofpdm_metrics(ev)
        res.pop("per_w", None)
        return {**res, "nfe_per_slice": 2 * int(cfg["forward_steps"]), "pixel_labels": 0.0}
    return ex.Row(row, seed, settings, fn, meta={"model_dir": model_dir})


def tm_repo() -> str:
    return str(REPO)


def _plain(mc: tm.MethodConfig) -> dict[str, Any]:
    d = dataclasses.asdict(mc)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------- outputs
def display_name(name: str) -> str:
    return DISPLAY[name] + (PIXEL_MARK if name in tm.METHODS else "")


def panel_and_tables(cfg: Mapping[str, Any], records: list[dict[str, Any]], out: str, data_dir: str,
                     provenance: Mapping[str, Any]) -> dict[str, str]:
    """table1.md / .csv / .json and fig4_panel.png in ``out``; returns the table paths."""
    agg = ex.aggregate(records, [c.key for c in COLUMNS])
    agg = {display_name(n): v for n, v in agg.items()}
    notes = [f"{PIXEL_MARK.strip()} tuned (L, s or w, threshold) by grid search on validation slices WITH "
             "pixel labels (best Dice pooled over the unhealthy validation slices, so an empty mask cannot "
             "win); AnoFPDM rows are label-free.",
             "Comparison rows: mask = map >= threshold, connected components as AnoFPDM, a slice is "
             "predicted unhealthy when a pixel is left (mixed); unhealthy = GT-unhealthy slices.",
             "net evals / slice: network (UNet + classifier) calls per test slice, a call on a doubled "
             "batch counting 2; s / slice: seconds per test slice of the map computation (comparison "
             "rows, this process) or of AnoFPDM's test forward process + segmentation."]
    prov = {**provenance, "tuned": {r["name"]: r["metrics"].get("tuned") for r in records
                                    if r["name"] in tm.METHODS and r["seed"] == cfg["eval_seeds"][0]}}
    paths = ex.write_tables(out, f"Table 1 ({provenance.get('preset')} preset, {provenance.get('dataset')})",
                            COLUMNS, agg, prov, basename="table1", notes=notes)
    try:
        write_panel(records, out, os.path.join(out, "fig4_panel.png"), cfg["eval_seeds"][0])
    except (ImportError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"fig4_panel.png not written: {err}")
    print(open(paths["md"], encoding="utf-8").read().split("\nProduced by")[0])
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}, fig4_panel.png in {out}")
    return paths


def _work_dir(out: str, rec: Mapping[str, Any]) -> str:
    return os.path.join(out, "work", f"{rec['name']}_seed{rec['seed']}-{rec['fingerprint'][:12]}")


def panel_arrays(records: list[dict[str, Any]], out: str, seed: int) -> tuple[dict[str, Any], dict]:
    """({"index", "x", "gt"} of the panel slices, {row name: (maps, masks)}) from the seed's work dirs."""
    base, per = None, {}
    for rec in (r for r in records if r["seed"] == seed and r["name"] in tm.METHODS):
        with np.load(os.path.join(_work_dir(out, rec), "panel.npz")) as z:
            arrays = {k: z[k] for k in z.files}
        base = base or {k: arrays[k] for k in ("index", "x", "gt")}
        per[rec["name"]] = (arrays["anomaly_map"], arrays["pred_mask"])
    if base is None:
        raise ValueError("no comparison row was computed, so there are no panel inputs")
    for rec in (r for r in records if r["seed"] == seed and r["name"] in ANOFPDM_ROWS):
        setting = str(rec["metrics"].get("primary_setting") or "")
        path = os.path.join(_work_dir(out, rec), "eval", "arrays", f"{setting.replace(',', '_')}.npz")
        with np.load(path) as z:
            pos = {int(i): j for j, i in enumerate(z["index"])}
            take = [pos[int(i)] for i in base["index"]]
            per[rec["name"]] = (z["anomaly_map"][take], z["pred_mask_all"][take])
    order = [n for n in DISPLAY if n in per]
    return base, {n: per[n] for n in order}


def write_panel(records: list[dict[str, Any]], out: str, path: str, seed: int) -> None:
    """Fig. 4-style panel: rows = test slices; columns = input (channel 0), GT, then
    anomaly map and mask of each method."""

    base, per = panel_arrays(records, out, seed)
    plt = _pyplot()
    n, k = len(base["index"]), len(per)
    fig, axes = plt.subplots(n, 2 + 2 * k, figsize=(1.3 * (2 + 2 * k), 1.4 * n), squeeze=False)
    chan = 0  # FLAIR in this project's BraTS channel order (flair, t1, t1ce, t2); T1 for ATLAS
    for i in range(n):
        cells = [(base["x"][i, chan], "input", "gray"), (base["gt"][i].squeeze(), "GT", "gray")]
        for name, (maps, masks) in per.items():
            cells += [(np.squeeze(maps[i]), DISPLAY[name] + "\nmap", "hot"),
                      (np.squeeze(masks[i]).astype(float), "mask", "gray")]
        for j, (img, title, cmap) in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=6)
    fig.suptitle(f"Table 1 methods on test slices (seed {seed}); produced by scripts/run_table1.py",
                 fontsize=7)
    _save(fig, path)
