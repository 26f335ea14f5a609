"""Where M_t peaks, and how many validation slices the calibration needs (issue 21, items 1 and 5;
docs/method.md, 'Where M_t peaks: the forward window'). ``scripts/forward_window_study.py`` runs it.

Part A, window and chain (``window.json`` / ``window.png``): for every ``--respacings`` R the forward
process (``anofpdm.run_forward_process``, noise per slice from ``pipeline.slice_generators`` as the
evaluation draws it) runs ONCE over the whole chain, forward_steps = R - 1 (the most it allows), on the
validation and test slices, and keeps M_t = div [N, nW, R - 1, M]. The DDIM encoding is sequential, so the
first F steps of that pass are the pass with forward_steps = F (tests/experiments/test_forward_window.py
checks it), and the window of F steps is read off the whole-chain curves:

* peak position: t_e = first argmax of M_t over the whole chain, per modality and as recorded (the later
  of the modalities, as slices.csv's t_e), given as the position on the training chain,
  ``timestep_map[t_e] / (diffusion_steps - 1)`` (= t_e / (R - 1) for an evenly spaced chain);
* per window share s in WINDOW_SHARES: F = min(round(s R), R - 1) and t_e(F) = the first argmax over the
  first F steps (recorded: max over modalities); the share of unhealthy (and healthy) slices with
  0 < t_e(F) < F - 1, and the smallest s where it reaches one half;
* the mean normalised curve: per slice and modality M_t / max_t M_t over the chain, averaged over the
  modalities, then over the unhealthy / healthy slices, against the position on the chain.

Each number is given for the test slices and for validation and test together (``groups``).

Part B, calibration size (``calibration_size.json`` / ``calibration_size.png``): one forward pass over
validation and test at the run's own chain and forward steps; then per ``--val_sizes`` n and each of
``--draws`` seeded subsets of the validation slices: ``calibration.calibrate`` per w on the subset,
``calibration.choose_primary_w`` (the paper's rule), ``segmentation.segment`` of the test split with that
calibration and ``metrics.evaluator.SegmentationEvaluator``: unhealthy Dice, pixel AUPRC, image accuracy /
recall, the chosen w. Subsets are stratified: n_1 = round(n N_1 / N) unhealthy slices (clamped so that both
labels have at least one slice when n >= 2) and n - n_1 healthy, each drawn without replacement from a
generator seeded by (seed, n, draw). The whole validation split gives the ``full`` row, which equals
translation_FPDM.py's calibration and test metrics for the same settings.

Each JSON states the model's sha256, the data fingerprint (val + test), the settings, the seed and the
command; it is written atomically. A part whose file holds the same settings is reused (part A per chain:
an interrupted run continues); a folder made with other settings is refused naming them unless
``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from guided_diffusion.anofpdm.calibration import calibrate, choose_primary_w
from guided_diffusion.anofpdm.forward import ForwardResult, run_forward_process
from guided_diffusion.anofpdm.pipeline import slice_generators
from guided_diffusion.anofpdm.segmentation import SegmentationResult, segment
from guided_diffusion.anofpdm.translation import RUNTIME_SETTINGS
from guided_diffusion.anofpdm.translation_flags import parse_run
from guided_diffusion.anofpdm.translation_runtime import load_model
from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.configs.eval_configs import EvalRun, resolve_min_cc_size
from guided_diffusion.data.brats import get_eval_loader
from guided_diffusion.data.fingerprint import data_fingerprint
from guided_diffusion.experiments.experiments import described_differences
from guided_diffusion.experiments.forward_window_report import (
    WINDOW_SHARES,
    plot_calibration_size,
    plot_window,
    write_markdown,
)
from guided_diffusion.experiments.forward_window_stats import (
    chain_positions,
    draw_subset,
    first_argmax,
    inside_share,
    summarise_draws,
    window_steps,
    window_summary,
)
from guided_diffusion.metrics.evaluator import SegmentationEvaluator
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.utils.io_util import atomic_write_bytes, atomic_write_json
from guided_diffusion.utils.run_lock import run_lock

__all__ = ["WINDOW_SHARES", "calibration_size_part", "chain_positions", "draw_subset", "first_argmax",
           "inside_share", "main", "parse", "run_study", "window_part", "window_steps", "window_summary"]

STUDY_VERSION = 1
WINDOW_JSON, WINDOW_PNG = "window.json", "window.png"
CAL_JSON, CAL_PNG, STUDY_MD = "calibration_size.json", "calibration_size.png", "study.md"
SPLITS = ("val", "test")


# ---------------------------------------------------------------------------------------------- flags
@dataclasses.dataclass(frozen=True)
class StudyArgs:
    """The study's own flags (the evaluation's flags go to translation_flags.parse_run)."""

    out: str
    respacings: tuple[int, ...]
    val_sizes: tuple[int, ...]
    draws: int
    seed: int
    overwrite: bool
    command: str


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="forward_window_study.py", allow_abbrev=False,
                       description="Where M_t peaks (chain, forward window) and how many validation slices "
                       "the calibration needs; other flags are translation_FPDM.py's (an export needs none)")
    p.add_argument("--model_dir", required=True, help="an export folder or a training log dir")
    p.add_argument("--data_dir", required=True, help="preprocessed dataset root (val and test splits)")
    p.add_argument("--out", required=True, help="output folder (window.json, calibration_size.json, ...)")
    p.add_argument("--respacings", type=int, nargs="+", default=[25, 50, 100],
                   help="chains R (--timestep_respacing) of part A")
    p.add_argument("--w", type=float, nargs="+", default=None,
                   help="guidance strengths (default: the export's evaluation --w)")
    p.add_argument("--val_sizes", type=int, nargs="+", default=[4, 8, 12, 18, 24, 36],
                   help="validation subset sizes n of part B")
    p.add_argument("--draws", type=int, default=20, help="random validation subsets per n")
    p.add_argument("--seed", type=int, default=0, help="noise seed (per slice, as translation) and subsets")
    p.add_argument("--overwrite", action="store_true", help="replace parts computed with other settings")
    return p


def parse(argv: Sequence[str]) -> tuple[StudyArgs, EvalRun]:
    """(the study's flags, the evaluation run of the model); ValueError (one line naming the flag)."""
    argv = [str(a) for a in argv]
    ns, rest = _parser().parse_known_args(argv)
    if ns.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {ns.draws}")
    if ns.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {ns.seed}")
    if any(r < 2 for r in ns.respacings) or len(set(ns.respacings)) != len(ns.respacings):
        raise ValueError(f"--respacings must be distinct chain lengths >= 2, got {ns.respacings}")
    if any(n < 2 for n in ns.val_sizes) or len(set(ns.val_sizes)) != len(ns.val_sizes):
        raise ValueError(f"--val_sizes must be distinct sizes >= 2 (one healthy and one unhealthy slice), "
                         f"got {ns.val_sizes}")
    if os.path.isfile(ns.out):
        raise ValueError(f"--out {ns.out} is a file; expected a folder")
    if not os.path.isdir(ns.data_dir):
        raise FileNotFoundError(f"--data_dir {ns.data_dir} does not exist")
    if not os.path.isdir(ns.model_dir):
        raise FileNotFoundError(f"--model_dir {ns.model_dir} does not exist")
    flags = ["--model_dir", ns.model_dir, "--data_dir", ns.data_dir, "--seed", str(ns.seed),
             "--progress", "False", *(["--w", *map(str, ns.w)] if ns.w else []), *rest]
    run = parse_run(flags)
    if run.eval.num_slices is not None or run.eval.num_slices_val is not None:
        raise ValueError("--num_slices / --num_slices_val: the study uses every validation and test slice")
    args = StudyArgs(out=ns.out, respacings=tuple(ns.respacings), val_sizes=tuple(ns.val_sizes),
                     draws=int(ns.draws), seed=int(ns.seed), overwrite=bool(ns.overwrite),
                     command=shlex.join(["python", "scripts/forward_window_study.py", *argv]))
    return args, run


# ---------------------------------------------------------------------------------------------- passes
@dataclasses.dataclass
class SplitPass:
    """One split's forward pass: per batch the ForwardResult (CPU), x, gt, labels and slice ids."""

    batches: list[tuple[ForwardResult, torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, int]]]]
    idx: torch.Tensor  # [N] dataset indices
    labels: torch.Tensor  # [N]

    def cat(self, key: str) -> torch.Tensor:
        """A ForwardResult field over the split: mse_h / div [N, nW, S, M], mse_null [N, S, M]."""
        return torch.cat([getattr(b[0], key) for b in self.batches])


def _cpu(fr: ForwardResult, keep_agg: bool) -> ForwardResult:
    moved = {k: getattr(fr, k).cpu() for k in ("mse_h", "mse_null", "div", "end_step")}
    agg = {k: v.cpu() for k, v in fr.agg.items()} if keep_agg else {}
    return dataclasses.replace(fr, agg=agg, **moved)


def forward_split(run: EvalRun, model: Any, diffusion: Any, split: str, forward_steps: int,
                  keep_agg: bool) -> SplitPass:
    """The forward process of every slice of ``split`` with the run's settings and ``forward_steps``, each
    slice's noise from (seed, split, index) as translation_FPDM.py draws it."""
    bs = run.eval.batch_size_val if split == "val" else run.eval.batch_size
    loader, dataset = get_eval_loader(run.eval.data_dir, split, bs or 16, in_channels=run.model.in_channels,
                                      world_size=1, rank=0, image_size=run.model.image_size)
    dev = next(model.parameters()).device
    settings = {**run.forward.settings_kwargs(), "forward_steps": int(forward_steps)}
    seg = run.segment
    batches, ids, labels = [], [], []
    for x, gt, lab, idx in loader:
        b_ids = [int(i) for i in idx]
        fr = run_forward_process(model, diffusion, x.to(dev), ws=list(run.forward.w),
                                 generator=slice_generators(run.eval.seed, split, b_ids),
                                 subset_interval=seg.subset_interval, sam_mode=seg.sam_mode,
                                 legacy_gradient_schedule=seg.legacy_segmentation, **settings)
        batches.append((_cpu(fr, keep_agg), x, gt, torch.as_tensor(lab).long(),
                        [tuple(dataset.slice_info(i)) for i in b_ids]))
        ids += b_ids
        labels.append(torch.as_tensor(lab).long())
    return SplitPass(batches, torch.as_tensor(ids), torch.cat(labels))


# ---------------------------------------------------------------------------------------------- part A
def chain_curves(run: EvalRun, model: Any, chain: int) -> dict[str, np.ndarray]:
    """The whole-chain pass of chain R over val and test: {"div" [N, nW, R - 1, M] float32, "label" [N],
    "split" [N] ("val" / "test"), "idx" [N] dataset indices, "positions" [R - 1], "seconds" []}."""
    t0 = time.perf_counter()
    diffusion = create_gaussian_diffusion(run.diffusion.replace(timestep_respacing=str(chain)))
    steps = diffusion.num_timesteps - 1
    passes = {s: forward_split(run, model, diffusion, s, steps, keep_agg=False) for s in SPLITS}
    return {
        "div": torch.cat([p.cat("div") for p in passes.values()]).float().numpy(),
        "label": torch.cat([p.labels for p in passes.values()]).numpy(),
        "split": np.array([s for s, p in passes.items() for _ in range(p.labels.numel())]),
        "idx": torch.cat([p.idx for p in passes.values()]).numpy(),
        "positions": chain_positions(diffusion, steps, run.diffusion.diffusion_steps),
        "seconds": np.array(time.perf_counter() - t0),
    }


def chain_summary(run: EvalRun, chain: int, curves: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Part A summary of chain R from its curves (chain_curves), for the test slices and for all."""
    div, lab = torch.from_numpy(curves["div"]), torch.from_numpy(curves["label"]).long()
    test = torch.from_numpy(curves["split"] == "test")
    positions = np.asarray(curves["positions"], dtype=np.float64)
    groups = {"test": (div[test], lab[test]), "val+test": (div, lab)}
    return {
        "R": chain, "forward_steps": int(div.shape[2]), "positions": positions.tolist(),
        "groups": {g: window_summary(d, y, positions, chain, run.forward.w, run.forward.modality)
                   for g, (d, y) in groups.items()},
        "seconds": round(float(curves["seconds"]), 1),
    }


def _save_npz(arrays: Mapping[str, np.ndarray], path: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), path)


def _common(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Part A settings without the chain list (what one chain's curves depend on)."""
    if settings is None:
        return None
    return {k: v for k, v in settings.items() if k not in ("respacings", "window_shares")}


def _stored_settings(path: str) -> dict[str, Any] | None:
    """The settings of the study file at ``path`` (None when absent or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f)["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def window_settings(args: StudyArgs, header: Mapping[str, Any]) -> dict[str, Any]:
    """Everything part A depends on."""
    return {**header["settings_common"], "respacings": list(args.respacings),
            "window_shares": list(WINDOW_SHARES)}


def window_part(args: StudyArgs, run: EvalRun, model: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Part A over every chain of ``args.respacings`` into ``data`` (from _open_part). The curves of each
    chain are kept in OUT/curves_R<R>.npz with the sha256 of every setting but the chain list, and reused
    by any later run of the same settings (an interrupted run continues; --overwrite with another
    --respacings list recomputes only the new chains)."""
    path = os.path.join(args.out, WINDOW_JSON)
    common = _common(data["settings"])
    key = hashlib.sha256(json.dumps(common, sort_keys=True).encode()).hexdigest()
    same_file = _common(_stored_settings(path)) == common  # curves files written before the key
    data["chains"] = {}
    for chain in args.respacings:
        npz = os.path.join(args.out, f"curves_R{chain}.npz")
        curves = None
        if os.path.isfile(npz):
            with np.load(npz) as f:
                stored = {k: f[k] for k in f.files}
            if str(stored.get("key", "")) == key or ("key" not in stored and same_file):
                curves = stored
                print(f"window: chain R={chain} reused from {npz}", flush=True)
        if curves is None:
            print(f"window: chain R={chain} ({chain - 1} forward steps, val + test) ...", flush=True)
            curves = {**chain_curves(run, model, chain), "key": np.array(key)}
            _save_npz(curves, npz)
        data["chains"][str(chain)] = chain_summary(run, chain, curves)
        atomic_write_json(data, path)
    data["complete"] = True
    atomic_write_json(data, path)
    plot_window(data, os.path.join(args.out, WINDOW_PNG))
    return data


# ---------------------------------------------------------------------------------------------- part B
def _seg(run: EvalRun, fr: ForwardResult, cal: Calibration, w: float) -> SegmentationResult:
    s = run.segment
    return segment(fr, w=w, thr_01=cal.thr_01, diff_max=cal.diff_max, t_e_ratio=s.t_e_ratio[0],
                   median_filter=s.median_filter, last_only=s.last_only, subset_interval=s.subset_interval,
                   legacy=s.legacy_segmentation, sam_mode=s.sam_mode)


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def evaluate_calibration(run: EvalRun, val: SplitPass, test: SplitPass, rows: np.ndarray,
                         sha: str) -> dict[str, Any]:
    """Calibrate every w on the validation rows ``rows``, choose w by the paper's rule, segment the test
    split and score it: {chosen_w, thr_01, diff_max, val_accuracy, dice, auprc, image_accuracy, ...}."""
    mse_h, mse_null, div = (val.cat(k)[rows] for k in ("mse_h", "mse_null", "div"))
    labels = val.labels[rows]
    kw = {k: v for k, v in run.forward.settings_kwargs().items() if k not in RUNTIME_SETTINGS}
    cals = {float(w): calibrate(mse_h[:, i], mse_null, div[:, i], labels, w=w, checkpoint_sha256=sha, **kw)
            for i, w in enumerate(run.forward.w)}
    w, _ = choose_primary_w(run.forward.w, cals, run.eval.selection_tolerance)
    cal = cals[w]
    ev = SegmentationEvaluator(min_cc_size=resolve_min_cc_size(run.segment.min_cc_size, run.model.image_size))
    for fr, x, gt, lab, slice_ids in test.batches:
        out = _seg(run, fr, cal, w)
        ev.add_batch(pred_mask_gated=out.mask, pred_mask_all=out.mask_all, anomaly_map=out.anomaly_map,
                     gt=gt, source=x, label=lab, pred_label=out.pred_lab, slice_ids=slice_ids)
    res = ev.results()
    return {"n": int(rows.size), "n_unhealthy": int((labels == 1).sum()), "val_idx": val.idx[rows].tolist(),
            "chosen_w": float(w), "thr_01": float(cal.thr_01), "diff_max": [float(v) for v in cal.diff_max],
            "val_accuracy": float(cal.accuracy), "dice": _finite(res["unhealthy"]["dice"]),
            "auprc": _finite(res["unhealthy"]["auprc"]), "image_accuracy": _finite(res["image"]["accuracy"]),
            "image_recall": _finite(res["image"]["recall"]),
            "val_accuracy_by_w": {f"{v:g}": float(cals[v].accuracy) for v in sorted(cals)}}


def calibration_settings(args: StudyArgs, run: EvalRun, header: Mapping[str, Any]) -> dict[str, Any]:
    """Everything part B depends on."""
    return {**header["settings_common"], "timestep_respacing": run.diffusion.timestep_respacing,
            "forward_steps": run.forward.forward_steps, "val_sizes": list(args.val_sizes),
            "draws": args.draws, "segment": run.segment.to_dict(),
            "selection_tolerance": run.eval.selection_tolerance}


def calibration_size_part(args: StudyArgs, run: EvalRun, model: Any, diffusion: Any, sha: str,
                          data: dict[str, Any]) -> dict[str, Any]:
    """Part B at the run's chain and forward steps into ``data`` (from _open_part; reused when complete)."""
    path = os.path.join(args.out, CAL_JSON)
    if data.get("complete"):
        print(f"calibration size: reused {path}", flush=True)
        plot_calibration_size(data, os.path.join(args.out, CAL_PNG))
        return data
    t0 = time.perf_counter()
    print(f"calibration size: forward pass over val and test (R={run.diffusion.timestep_respacing}, "
          f"{run.forward.forward_steps} steps) ...", flush=True)
    val = forward_split(run, model, diffusion, "val", run.forward.forward_steps, keep_agg=False)
    test = forward_split(run, model, diffusion, "test", run.forward.forward_steps, keep_agg=True)
    labels = val.labels.numpy()
    data["full"] = evaluate_calibration(run, val, test, np.arange(labels.size), sha)
    data["n_val"], data["n_val_unhealthy"] = int(labels.size), int((labels == 1).sum())
    sizes = {}
    for n in args.val_sizes:
        rows = []
        for d in range(args.draws):
            rng = np.random.default_rng(np.random.SeedSequence([args.seed, int(n), d]))
            row = evaluate_calibration(run, val, test, draw_subset(labels, n, rng), sha)
            rows.append({"draw": d, **row})
        sizes[str(n)] = {"n": n, "summary": summarise_draws(rows), "draws": rows}
        print(f"calibration size n={n}: dice {sizes[str(n)]['summary']['dice']['mean']:.3f} "
              f"± {sizes[str(n)]['summary']['dice']['std']:.3f}", flush=True)
    data.update(sizes=sizes, complete=True, seconds=round(time.perf_counter() - t0, 1))
    atomic_write_json(data, path)
    plot_calibration_size(data, os.path.join(args.out, CAL_PNG))
    return data


# ---------------------------------------------------------------------------------------------- files
def _open_part(path: str, settings: Mapping[str, Any], header: Mapping[str, Any],
               overwrite: bool) -> dict[str, Any]:
    """The part's data: the stored file when its settings equal ``settings``, else a new one (a file of
    other settings: ValueError naming them, unless ``overwrite``)."""
    settings = json.loads(json.dumps(settings))
    fresh = {"version": STUDY_VERSION, "settings": settings, **{k: v for k, v in header.items()
                                                                 if k != "settings_common"}}
    if not os.path.isfile(path):
        return fresh
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        old = stored["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a file of this study ({type(err).__name__}); move it away or use "
                         "another --out") from None
    diffs = described_differences(old, settings)
    if not diffs:
        stored.update({k: v for k, v in fresh.items() if k == "command"})
        return stored
    if overwrite:
        print(f"--overwrite: {path} had other settings ({'; '.join(diffs)}); recomputing", flush=True)
        return fresh
    raise ValueError(f"--out: {path} was computed with other settings ({'; '.join(diffs)}); use another "
                     "--out or --overwrite")


# ---------------------------------------------------------------------------------------------- driver
def run_study(args: StudyArgs, run: EvalRun) -> dict[str, Any]:
    """Both parts into ``args.out`` (resumable); returns {"window": ..., "calibration_size": ...}."""
    diffusion_steps = run.diffusion.diffusion_steps
    big = [r for r in args.respacings if r > diffusion_steps]
    if big:
        raise ValueError(f"--respacings {big}: longer than the {diffusion_steps} training steps")
    chain = create_gaussian_diffusion(run.diffusion).num_timesteps
    if run.forward.forward_steps > chain - 1:
        raise ValueError(f"--forward_steps {run.forward.forward_steps} must be < the {chain} steps of the "
                         "chain (--timestep_respacing)")
    _, val_set = get_eval_loader(run.eval.data_dir, "val", 1, in_channels=run.model.in_channels,
                                 world_size=1, rank=0, image_size=run.model.image_size)
    too_big = [n for n in args.val_sizes if n > len(val_set)]
    if too_big:
        raise ValueError(f"--val_sizes {too_big}: the validation split of {run.eval.data_dir} has "
                         f"{len(val_set)} slices")
    model, diffusion, _path, sha = load_model(run.model, run.diffusion, run.checkpoint)
    fp = data_fingerprint(run.eval.data_dir, SPLITS)
    common = {"model_sha256": sha, "data_sha256": fp.digest, "model": run.model.to_dict(),
              "diffusion": run.diffusion.to_dict(), "forward": run.forward.to_dict(), "seed": args.seed,
              "batch_size_val": run.eval.batch_size_val, "batch_size": run.eval.batch_size}
    header = {"model_sha256": sha, "data_sha256": fp.digest, "data_dir": os.path.abspath(run.eval.data_dir),
              "model_dir": os.path.abspath(run.checkpoint.model_dir), "seed": args.seed,
              "command": args.command, "settings_common": common}
    os.makedirs(args.out, exist_ok=True)
    with run_lock(args.out, "--out"):  # both parts' files are checked before any work
        win_data = _open_part(os.path.join(args.out, WINDOW_JSON), window_settings(args, header), header,
                              args.overwrite)
        cal_data = _open_part(os.path.join(args.out, CAL_JSON), calibration_settings(args, run, header),
                              header, args.overwrite)
        window = window_part(args, run, model, win_data)
        cal = calibration_size_part(args, run, model, diffusion, sha, cal_data)
        write_markdown(window, cal, os.path.join(args.out, STUDY_MD))
    print(f"wrote {args.out}/{{{WINDOW_JSON},{WINDOW_PNG},{CAL_JSON},{CAL_PNG},{STUDY_MD}}}", flush=True)
    return {"window": window, "calibration_size": cal}


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/forward_window_study.py (errors: see cli.run_cli)."""
    args, run = parse(sys.argv[1:] if argv is None else argv)
    run_study(args, run)
    return 0
