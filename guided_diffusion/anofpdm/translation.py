"""AnoFPDM evaluation pipeline behind ``scripts/translation_FPDM.py`` (docs/method.md, 'Evaluation run';
upstream differences: docs/method.md, 'Upstream deviations').

Flow: setup_dist -> logger.configure -> model from the flags + checkpoint -> calibration on the validation
split (or ``--calibration FILE``) -> test split (rank-sharded, deterministic order) -> the AnoFPDM pipeline
(``guided_diffusion.anofpdm.pipeline``: forward process + segmentation) per batch, each batch's per-slice
results saved atomically under ``LOGDIR/results`` (so ``--resume`` skips them) -> gathered on rank 0 ->
metrics.json, slices.csv, patients.csv, calibration.json, panels/ (PNG + index.html), nifti/
(``--save_nifti``), arrays/ (``--save_data``). The flags live in
``guided_diffusion.anofpdm.translation_flags``, the writers in
``guided_diffusion.anofpdm.translation_outputs``.

Several ``--w``: one forward pass serves all of them; the primary setting (top-level metrics, panels, NIfTI)
is the w chosen by the paper's rule (calibration.select_guidance: largest w whose validation accuracy is
within ``--selection_tolerance`` (99 %) of the best; docs/method.md, 'Choosing the guidance strength'),
and the selection table is stored in
metrics.json under "guidance_selection". ``scripts/select_guidance.py`` runs the calibration part alone.

Noise: each slice uses its own generator seeded from (seed, split, dataset index), so results do not
depend on the batch composition or the number of processes.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.anofpdm.calibration import (
    calibrate,
    choose_primary_w,
    guidance_selection,
)
from guided_diffusion.anofpdm.eval_resume import data_key, open_shared, save_batch
from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.anofpdm.pipeline import AnoFPDMPipeline, setting_key, slice_generators
from guided_diffusion.anofpdm.translation_flags import (
    add_calibration_flags,
    create_argparser,
    parse_args,
    parse_run,
)
from guided_diffusion.anofpdm.translation_outputs import write_outputs
from guided_diffusion.anofpdm.translation_runtime import (
    checkpoint_step,
    load_model,
    log_data_summary,
    peak_memory,
    prepare_inference,
    run_session,
)
from guided_diffusion.configs.calibration import Calibration, save_calibrations
from guided_diffusion.configs.eval_configs import EvalRun
from guided_diffusion.data.brats import BrainDataset, get_eval_loader
from guided_diffusion.data.read_ahead import read_ahead
from guided_diffusion.data.stored_calibration import checked_calibrations, validation_pass_record
from guided_diffusion.export.export_load import export_calibrations
from guided_diffusion.utils import dist_util, logger

__all__ = [
    "add_calibration_flags",
    "calibrate",
    "calibrate_for_ws",
    "calibrate_run",
    "choose_primary_w",
    "create_argparser",
    "guidance_selection",
    "load_model",
    "main",
    "parse_args",
    "parse_run",
    "prepare_inference",
    "run_session",
    "save_calibrations",
    "setting_key",
    "write_outputs",
]

# forward settings that change the statistics but are not Calibration fields (kept in its `settings`)
RUNTIME_SETTINGS = ("precision", "early_stop_patience")
FRESH = "start fresh with another --log_dir, or delete {folder} (or run without --resume)"


def _bar(iterable, **kw):
    show = dist_util.get_rank() == 0 and kw.pop("enabled", True)
    return tqdm(iterable, disable=not show, leave=sys.stderr.isatty(), **kw)


def _batches(loader, desc: str, enabled: bool):
    """The loader's batches, the next one read (and pinned on CUDA) while this one is computed; with a
    progress bar on rank 0."""

    batches = read_ahead(loader, depth=1, pin=dist_util.dev().type == "cuda")
    return _bar(batches, total=len(loader), desc=desc, enabled=enabled)


# ---------------------------------------------------------------------------------------------- calibration
def collect_statistics(
    model,
    diffusion,
    *,
    data_dir: str,
    split: str,
    ws: Sequence[float],
    settings: Mapping,
    batch_size: int,
    num_slices: int | None,
    seed: int,
    in_channels: int | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    cache_fingerprint: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> dict:
    """Forward statistics of every slice of ``split`` (sharded by rank, gathered on every rank).

    With ``cache_dir`` each batch's statistics are saved atomically there and reused by a later call with
    the same ``cache_fingerprint`` (a killed calibration resumes; other settings recompute from zero).
    ``image_size``: the network's ``--image_size``; slices of another size are refused (None: not checked).
    Returns {"idx" [N], "label" [N], "mse_h" [N, nW, S, M], "mse_null" [N, S, M], "div" [N, nW, S, M]}
    sorted by dataset index.
    """

    loader, dataset = get_eval_loader(data_dir, split, batch_size, num_slices=num_slices,
                                      in_channels=in_channels, image_size=image_size)
    done: dict[int, dict] = {}
    if cache_dir is not None:
        done = open_shared(cache_dir, split, cache_fingerprint or {}, resume=True, on_mismatch="recompute",
                           what="statistics", fresh_hint="")
        if done:
            logger.log(f"reusing the statistics of {len(done)} {split} slices saved in {cache_dir}")
    dev = dist_util.dev()
    rows = []
    for x, _gt, lab, idx in _batches(loader, f"{split} batches", progress):
        ids = [int(i) for i in idx]
        if all(i in done for i in ids):
            recs = [done[i] for i in ids]
        else:
            fr = run_forward_process(
                model,
                diffusion,
                x.to(dev, non_blocking=True),
                ws=list(ws),
                generator=slice_generators(seed, split, ids),
                progress=progress and dist_util.get_rank() == 0,
                **settings,
            )
            recs = [{"idx": i, "label": int(lb), "mse_h": fr.mse_h[b].cpu(),
                     "mse_null": fr.mse_null[b].cpu(), "div": fr.div[b].cpu()}
                    for b, (i, lb) in enumerate(zip(ids, torch.as_tensor(lab)))]
            if cache_dir is not None:
                save_batch(cache_dir, split, recs)
        rows.append((torch.as_tensor(ids), torch.as_tensor([r["label"] for r in recs]),
                     *(torch.stack([r[k] for r in recs]) for k in ("mse_h", "mse_null", "div"))))
    local = [torch.cat(c) for c in zip(*rows)] if rows else []
    log_data_summary(dataset)
    parts = [p for p in dist_util.all_gather_object(local) if p]
    if not parts:
        raise ValueError(f"the {split} split of {data_dir} yielded no slices")
    cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
    order = torch.argsort(cat[0])
    return dict(zip(("idx", "label", "mse_h", "mse_null", "div"), (c[order] for c in cat)))


def calibrate_for_ws(
    model,
    diffusion,
    *,
    data_dir: str,
    ws: Sequence[float],
    settings: Mapping,
    checkpoint_sha256: str,
    batch_size: int = 32,
    num_slices: int | None = None,
    seed: int = 0,
    in_channels: int | None = None,
    progress: bool = True,
    stats_settings: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> dict[float, Calibration]:
    """Calibrate every w of ``ws`` from ONE forward pass over the validation split -> {w: Calibration}.

    ``settings``: the forward-process keyword arguments; ``stats_settings``: every setting that changes
    the statistics (stored in each Calibration, checked on reuse); ``cache_dir``: resumable pass;
    ``image_size``: the network's size the validation slices must have (None: not checked)."""
    data = data_key(data_dir, ("val",))
    pass_record = validation_pass_record(num_slices, seed, data["data_sha256"])
    fingerprint = {"checkpoint_sha256": checkpoint_sha256, "ws": [float(w) for w in ws],
                   **pass_record, **data, **dict(stats_settings or settings)}
    stats = collect_statistics(
        model,
        diffusion,
        data_dir=data_dir,
        split="val",
        ws=ws,
        settings=settings,
        batch_size=batch_size,
        num_slices=num_slices,
        seed=seed,
        in_channels=in_channels,
        progress=progress,
        cache_dir=cache_dir,
        cache_fingerprint=fingerprint,
        image_size=image_size,
    )
    return {
        float(w): calibrate(
            stats["mse_h"][:, i],
            stats["mse_null"],
            stats["div"][:, i],
            stats["label"],
            w=w,
            checkpoint_sha256=checkpoint_sha256,
            extra=pass_record,
            settings=stats_settings,
            **{k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS},
        )
        for i, w in enumerate(ws)
    }


def calibrate_run(
    run: EvalRun, model, diffusion, sha: str, log_dir: str | None = None
) -> dict[float, Calibration]:
    """``calibrate_for_ws`` with the run's configs: every w from one (resumable) validation pass."""
    return calibrate_for_ws(
        model,
        diffusion,
        data_dir=run.eval.data_dir,
        ws=run.forward.w,
        settings=run.forward.settings_kwargs(),
        checkpoint_sha256=sha,
        batch_size=run.eval.batch_size_val,
        num_slices=run.eval.num_slices_val,
        seed=run.eval.seed,
        in_channels=run.model.in_channels,
        progress=run.eval.progress,
        stats_settings=run.stats_settings(),
        cache_dir=os.path.join(log_dir, "calibration_stats") if log_dir else None,
        image_size=run.model.image_size,
    )


def get_calibrations(run: EvalRun, model, diffusion, sha: str, log_dir: str) -> dict[float, Calibration]:
    """The run's calibrations: ``--calibration FILE``, the log dir's calibration.json on --resume, an export
    folder's fitting calibration.json (``--model_dir EXPORT``), or a new (resumable) validation pass.
    A stored calibration must match every statistics-changing setting; the log dir's own must also come
    from this run's validation pass and data (an explicit FILE may come from any; metrics.json keeps its
    record)."""
    stored = os.path.join(log_dir, "calibration.json")
    given = run.eval.calibration
    path = given or (stored if run.eval.resume and os.path.isfile(stored) else None)
    if path:
        if given:
            hint = "recalibrate (omit --calibration) or run with the calibration's settings"
        else:
            hint = FRESH.format(folder=log_dir) + " to recalibrate"
        cals = checked_calibrations(path, run, sha, hint=hint, same_pass=not given,
                                    pass_hint=f"pass --calibration {path} to reuse it anyway, or {hint}")
    elif found := export_calibrations(run, sha):  # an export folder's own, when it fits this run and data
        path, cals = found
    else:
        t0 = time.time()
        cals = calibrate_run(run, model, diffusion, sha, log_dir)
        logger.log(f"calibration on the validation split took {time.time() - t0:.1f}s")
        return cals
    logger.log(f"using calibration {path}")
    return cals


# ---------------------------------------------------------------------------------------------- test loop
def pipeline_of(run: EvalRun, model, diffusion, cals: Mapping[float, Calibration]) -> AnoFPDMPipeline:
    """The AnoFPDM pipeline of the run's test split on this rank's device (progress bar on rank 0 only),
    running the forward process this module runs on the validation split."""
    return AnoFPDMPipeline.from_run(run, model, diffusion, cals, device=dist_util.dev(),
                                    progress=run.eval.progress and dist_util.get_rank() == 0,
                                    forward_process=run_forward_process)


def process_batch(run: EvalRun, model, diffusion, cals: Mapping[float, Calibration], x: torch.Tensor,
                  idx: Sequence[int]) -> list[dict]:
    """Forward process + segmentation of one test batch -> one record per slice (CPU numpy/scalars);
    ``pipeline_of(...)(x, idx).records()`` for callers that hold no pipeline."""
    return pipeline_of(run, model, diffusion, cals)(x, idx).records()


def results_fingerprint(run: EvalRun, sha: str, cals: Mapping[float, Calibration]) -> dict[str, Any]:
    """What the per-slice results depend on: the checkpoint, every result-changing setting and the
    calibration values used (thr_01, diff_max per w)."""
    return {
        "checkpoint_sha256": sha,
        **run.result_settings(),
        **data_key(run.eval.data_dir, ("test",)),
        "calibration": {f"{w:g}": {"thr_01": c.thr_01, "diff_max": list(c.diff_max)}
                        for w, c in sorted(cals.items())},
    }


def run_test(
    run: EvalRun, model, diffusion, cals, log_dir: str, sha: str = ""
) -> tuple[dict[int, dict], dict]:
    """Evaluate the (rank-sharded) test split; returns (records by index gathered on rank 0, timing).

    Per-slice results are saved under LOGDIR/results with their fingerprint; ``--resume`` reuses them only
    under the same fingerprint and otherwise stops naming the settings that differ."""

    results_dir = os.path.join(log_dir, "results")
    done = open_shared(results_dir, "slices", results_fingerprint(run, sha, cals), resume=run.eval.resume,
                       on_mismatch="stop", what="per-slice results",
                       fresh_hint=FRESH.format(folder=results_dir))
    loader, dataset = get_eval_loader(
        run.eval.data_dir, "test", run.eval.batch_size, num_slices=run.eval.num_slices,
        in_channels=run.model.in_channels, image_size=run.model.image_size,
    )
    pipeline = pipeline_of(run, model, diffusion, cals)
    mine: dict[int, dict] = {}
    n_new, t0, steps = 0, time.time(), []
    for x, _gt, _lab, idx in _batches(loader, "test batches", run.eval.progress):
        ids = [int(i) for i in idx]
        if all(i in done for i in ids):
            mine.update({i: done[i] for i in ids})
            continue
        records = pipeline(x, ids).records()
        save_batch(results_dir, "slices", records)
        mine.update({r["idx"]: r for r in records})
        n_new += len(ids)
        steps += [r["steps_run"] for r in records]
    seconds = time.time() - t0
    timing = {
        "new_slices": n_new,
        "seconds": seconds,
        "slices_per_s": n_new / seconds if n_new else None,
        "peak_memory_bytes": peak_memory(),
        "batch_size": run.eval.batch_size,
        "steps": steps,
    }
    log_data_summary(dataset)
    gathered = dist_util.all_gather_object((mine, timing))
    merged: dict[int, dict] = {}
    for part, _ in gathered:
        merged.update(part)
    every = [n for _, t in gathered for n in t.pop("steps")]
    timing = {"per_rank": [t for _, t in gathered], "new_slices": sum(t["new_slices"] for _, t in gathered),
              "batch_size": run.eval.batch_size}
    if run.forward.early_stop_patience > 0:
        timing["forward_steps"] = run.forward.forward_steps
        timing["steps_run_mean"] = float(np.mean(every)) if every else None
    return merged, timing


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> dict | None:
    """Run the evaluation from the command line; returns the metrics dict on rank 0 (None elsewhere)."""
    return evaluate(parse_run(argv, overrides))


def evaluate(run: EvalRun) -> dict | None:
    """Run the evaluation described by ``run``; returns the metrics dict on rank 0 (None elsewhere).
    Rank 0 holds the run lock on the log dir for the whole run (a second run there stops at once)."""
    with run_session(run) as log_dir:
        return _evaluate_in(run, log_dir)


def _evaluate_in(run: EvalRun, log_dir: str) -> dict | None:


    # the network's --image_size must be the data's slice size (checked again on every split read, which
    # also warns about the data; not twice here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BrainDataset(run.eval.data_dir, "test", image_size=run.model.image_size)
    model, diffusion, path, sha = load_model(run.model, run.diffusion, run.checkpoint)
    logger.log(f"loaded {path} (sha256 {sha[:12]}...) on {dist_util.dev()}")
    run, model = prepare_inference(run, model, diffusion)
    cals = get_calibrations(run, model, diffusion, sha, log_dir)
    for w, c in cals.items():
        logger.log(
            f"w={w:g}: thr_01={c.thr_01:.6f} n_min={c.n_min} val_acc={c.accuracy:.4f} "
            f"diff_min={c.diff_min} diff_max={c.diff_max}"
        )
    primary_w, selection = choose_primary_w(run.forward.w, cals, run.eval.selection_tolerance)
    if dist_util.get_rank() == 0:
        save_calibrations(os.path.join(log_dir, "calibration.json"), cals)
    records, timing = run_test(run, model, diffusion, cals, log_dir, sha)
    for t in timing["per_rank"]:
        rate = f"{t['slices_per_s']:.3f}" if t["slices_per_s"] else "n/a"
        logger.log(
            f"test: {t['new_slices']} new slices in {t['seconds']:.1f}s ({rate} slices/s), "
            f"peak memory {t['peak_memory_bytes'] / 2**20:.1f} MiB"
        )
    if "steps_run_mean" in timing:
        logger.log(f"early stop (--early_stop_patience {run.forward.early_stop_patience}): "
                   f"{timing['steps_run_mean']} of {run.forward.forward_steps} steps run on average")
    metrics = None
    if dist_util.get_rank() == 0:
        extra = {
            "forward": run.forward.settings_kwargs(),
            "sam_mode": run.sam_mode,
            "precision": run.forward.precision,
            "compile": run.eval.compile,
            "timing": timing,
            "checkpoint": path,
            "checkpoint_step": checkpoint_step(path),
            "checkpoint_sha256": sha,
            "config": run.record(),
        }
        metrics = write_outputs(
            run, records, cals, log_dir, extra, primary_w=primary_w, guidance_selection=selection
        )
        mixed, unh = metrics["mixed"], metrics["unhealthy"]
        logger.log(
            f"{metrics['primary_setting']}: mixed dice {mixed.get('dice')} | unhealthy dice "
            f"{unh.get('dice')} | image acc {metrics['image'].get('accuracy')}"
        )
        logger.log("evaluation complete")
    dist_util.barrier()
    return metrics
