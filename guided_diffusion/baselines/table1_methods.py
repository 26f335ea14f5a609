"""Evaluation of Table 1's comparison rows (everything but AnoFPDM) on one dataset, single process.

A comparison row is tuned and evaluated in two steps, with the AnoFPDM evaluation's data, loaders and
metric code (``data.brats.get_eval_loader``, ``evaluator.SegmentationEvaluator``):

* ``tune_method``: the grid of levels L x scales (s for classifier guidance, w for classifier-free
  guidance; a single dummy scale for AnoDDPM and FLAIR) on the first ``num_val`` validation slices; for
  every grid point the map threshold with the best Dice pooled over the unhealthy validation slices
  (``methods.best_threshold``, PIXEL LABELS; ``threshold_objective``); the point with the best Dice wins
  (ties: the first in grid order). Healthy slices do not enter the objective: with them, an empty mask
  (Dice 1 on each healthy slice) won whenever the maps were weak and the row scored 0 unhealthy Dice.
* ``evaluate_method``: the tuned (L, scale, threshold) on the test split; mask = map >= threshold,
  connected-component filtered like AnoFPDM's; "mixed" uses the mask on every slice with pred_label =
  "any pixel left" (upstream's ``get_mask_batch`` rule), "unhealthy" the same mask on GT-unhealthy
  slices. Records network evaluations per slice (measured by methods.py) and seconds per slice.

Randomness (AnoDDPM's noise) comes from one generator per batch seeded from (seed, split, first index),
so a result depends on the seed and the batch size only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from guided_diffusion.baselines import methods
from guided_diffusion.baselines.classifier import classifier_defaults, create_classifier
from guided_diffusion.configs.base import DiffusionConfig, ModelConfig
from guided_diffusion.configs.eval_configs import resolve_min_cc_size
from guided_diffusion.data.brats import get_eval_loader
from guided_diffusion.data.read_ahead import read_ahead
from guided_diffusion.metrics.evaluator import SegmentationEvaluator
from guided_diffusion.metrics.slice_metrics import cc_filter
from guided_diffusion.metrics.volume_outputs import VOLUME_METRICS, volume_section
from guided_diffusion.script_util import create_from_configs, drop_foreign_options, model_config
from guided_diffusion.training.checkpoint import load_model_checkpoint
from guided_diffusion.utils.io_util import atomic_write_bytes

METHODS = ("anoddpm_gaussian", "anoddpm_simplex", "ddim_classifier", "ddim_cfg", "flair")
SPLIT_CODES = {"val": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """One comparison row's evaluation settings (JSON-able; all of them change the result)."""

    method: str
    data_dir: str
    levels: tuple[int, ...] = (0,)
    scales: tuple[float, ...] = (0.0,)
    thresholds: int = 101
    modality: tuple[int, ...] = (0, 3)
    flair_channel: int = 0
    simplex_frequency: float = 64.0
    timestep_respacing: str = ""
    num_val: int | None = None
    num_test: int | None = None
    batch_size: int = 16
    seed: int = 0
    min_cc_size: int = -1
    panel_slices: int = 0
    threshold_objective: str = methods.TUNING_OBJECTIVES[0]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {METHODS}")
        if not self.levels or not self.scales:
            raise ValueError(f"{self.method}: the levels and scales grids must not be empty")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.threshold_objective not in methods.TUNING_OBJECTIVES:
            raise ValueError(f"threshold_objective {self.threshold_objective!r}: expected one of "
                             f"{methods.TUNING_OBJECTIVES}")


@dataclasses.dataclass
class Models:
    """The networks a method needs (None where unused) and the respaced diffusion of the evaluation."""

    model: Any = None
    diffusion: Any = None
    classifier: Any = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_trained(model_dir: str, checkpoint: str, timestep_respacing: str) -> tuple[Any, Any]:
    """(model in eval mode, diffusion respaced to ``timestep_respacing``) from a training log dir
    (its run_config.json) and one of its checkpoint files."""

    path = os.path.join(model_dir, "run_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {model_dir} is not a training log dir")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    # a run record lists every variant's options; those of other variants were never used by this network
    m = ModelConfig.from_dict(drop_foreign_options(saved["model"]), source=path)
    d = DiffusionConfig.from_dict(saved["diffusion"], source=path).replace(
        timestep_respacing=timestep_respacing)
    model, diffusion = create_from_configs(m, d)
    load_model_checkpoint(model, checkpoint, config=model_config(m, d))
    return model.to(_device()).eval(), diffusion


def load_classifier(clf_dir: str, checkpoint: str) -> torch.nn.Module:
    """The noise-aware classifier of scripts/train_classifier.py (its classifier_config.json)."""

    path = os.path.join(clf_dir, "classifier_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {clf_dir} is not a classifier training dir")
    with open(path, encoding="utf-8") as f:
        flags = json.load(f)
    clf = create_classifier(**{k: flags[k] for k in classifier_defaults() if k in flags})
    load_model_checkpoint(clf, checkpoint)
    return clf.to(_device()).eval()


def method_map(cfg: MethodConfig, models: Models, x: torch.Tensor, level: int, scale: float,
               generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """The anomaly map [B, 1, H, W] (CPU float32) and network evaluations per slice of one batch."""
    x = x.to(_device())
    mods = list(cfg.modality)
    if cfg.method == "flair":
        amap, nfe = methods.flair_map(x, cfg.flair_channel)
    elif cfg.method.startswith("anoddpm"):
        noise = cfg.method.split("_", 1)[1]
        amap, nfe = methods.anoddpm_map(models.model, models.diffusion, x, int(level), noise=noise,
                                        modality=mods, generator=generator,
                                        simplex_kwargs={"frequency": cfg.simplex_frequency})
    elif cfg.method == "ddim_classifier":
        amap, nfe = methods.clf_guided_ddim_map(models.model, models.classifier, models.diffusion, x,
                                                int(level), float(scale), modality=mods)
    else:
        amap, nfe = methods.cfg_ddim_map(models.model, models.diffusion, x, int(level), float(scale),
                                         modality=mods)
    return amap.detach().float().cpu(), int(nfe)


def _generator(seed: int, split: str, first: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(first)]).generate_state(2, np.uint32)
    gen_device = _device() if _device().type == "cuda" else torch.device("cpu")
    return torch.Generator(device=gen_device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


def iter_maps(cfg: MethodConfig, models: Models, split: str, level: int, scale: float,
              num: int | None) -> Iterator[dict[str, Any]]:
    """Batches of the first ``num`` slices of ``split``: {"maps" [B, 1, H, W] (CPU), "x", "gt", "label",
    "idx", "nfe" (per slice), "seconds" (map computation only), "dataset"}."""

    loader, dataset = get_eval_loader(cfg.data_dir, split, cfg.batch_size, num_slices=num,
                                      world_size=1, rank=0)
    for x, gt, lab, idx in read_ahead(loader):  # the next batch is read while this one's maps are computed
        t0 = time.perf_counter()
        amap, nfe = method_map(cfg, models, x, level, scale, _generator(cfg.seed, split, int(idx[0])))
        yield {"maps": amap, "x": x.float(), "gt": gt.float(), "label": lab, "idx": idx, "nfe": nfe,
               "seconds": time.perf_counter() - t0, "dataset": dataset}


def tune_method(cfg: MethodConfig, models: Models) -> dict[str, Any]:
    """Grid search of (level, scale, threshold) on validation slices WITH pixel labels; "val_dice" is the
    ``cfg.threshold_objective`` Dice (default: pooled over the unhealthy validation slices).

    Returns {"level", "scale", "threshold", "val_dice", "grid": [{"level", "scale", "threshold",
    "val_dice"}, ...], "num_val_slices"}."""
    grid, best, n = [], None, 0
    for level in cfg.levels:
        for scale in cfg.scales:
            batches = list(iter_maps(cfg, models, "val", int(level), float(scale), cfg.num_val))
            maps = torch.cat([b["maps"] for b in batches])
            thr, dice = methods.best_threshold(maps, torch.cat([b["gt"] for b in batches]), cfg.thresholds,
                                               objective=cfg.threshold_objective)
            point = {"level": int(level), "scale": float(scale), "threshold": thr, "val_dice": dice}
            grid.append(point)
            n = int(maps.shape[0])
            if best is None or dice > best["val_dice"]:
                best = point
    assert best is not None
    return {**best, "grid": grid, "num_val_slices": n}


def evaluate_method(cfg: MethodConfig, models: Models, tuned: Mapping[str, Any],
                    work_dir: str | None = None) -> dict[str, Any]:
    """Test-split metrics of the tuned method (same evaluator as AnoFPDM's metrics.json), streamed.

    Returns {"mixed": {dice, iou, auprc, dice_lesion}, "unhealthy": {...}, "image": {"accuracy"},
    "nfe_per_slice", "seconds_per_slice", "tuned": {...}, "num_test_slices", "min_cc_size", "volume":
    {per-patient 3-D means, see volume_means}}; with
    ``work_dir`` and ``cfg.panel_slices`` > 0 also writes panel.npz (inputs, GT, maps and masks of the
    test slices with the largest lesions, in dataset order)."""

    ev, min_cc = None, 0
    n, nfe, secs, panel = 0, 0, 0.0, []
    ids, pred_masks, gt_masks = [], [], []  # for the per-patient 3-D metrics
    for b in iter_maps(cfg, models, "test", int(tuned["level"]), float(tuned["scale"]), cfg.num_test):
        maps, gt = b["maps"][:, 0].numpy(), b["gt"][:, 0].numpy() > 0.5
        if ev is None:  # the paper's 40 px at 128 px scaled to the slice size, as AnoFPDM's evaluation
            min_cc = resolve_min_cc_size(cfg.min_cc_size, maps.shape[-1])
            ev = SegmentationEvaluator(min_cc_size=min_cc)
        masks = cc_filter(maps >= float(tuned["threshold"]), min_cc)
        pred_lab = masks.reshape(masks.shape[0], -1).any(axis=1).astype(np.int64)
        batch_ids = [tuple(b["dataset"].slice_info(int(i))) for i in b["idx"]]
        ev.add_batch(pred_mask_gated=masks, pred_mask_all=masks, anomaly_map=maps, gt=gt,
                     source=b["x"].numpy(), label=b["label"].numpy(), pred_label=pred_lab,
                     slice_ids=batch_ids)
        ids += batch_ids
        pred_masks += list(masks)
        gt_masks += list(gt)
        n, nfe, secs = n + len(maps), b["nfe"], secs + b["seconds"]
        if cfg.panel_slices > 0:  # keep the slices with the largest lesions so far
            for j in range(len(maps)):
                panel.append((-int(gt[j].sum()), int(b["idx"][j]), b["x"][j].numpy(), gt[j], maps[j],
                              masks[j]))
            panel = sorted(panel, key=lambda r: r[:2])[:cfg.panel_slices]
    if ev is None:
        raise ValueError(f"{cfg.method}: the test split of {cfg.data_dir} has no slices")
    res = ev.results()
    volume = volume_means(ids, pred_masks, gt_masks, cfg.data_dir, cfg.method)
    if work_dir and panel:
        panel.sort(key=lambda r: r[1])
        buf = _npz_bytes(index=np.array([r[1] for r in panel]), x=np.stack([r[2] for r in panel]),
                         gt=np.stack([r[3] for r in panel]), anomaly_map=np.stack([r[4] for r in panel]),
                         pred_mask=np.stack([r[5] for r in panel]))
        atomic_write_bytes(buf, os.path.join(work_dir, "panel.npz"))
    keys = ("dice", "iou", "auprc", "dice_lesion")
    return {
        "mixed": {k: res["mixed"].get(k) for k in keys},
        "unhealthy": {k: res["unhealthy"].get(k) for k in keys},
        "image": {"accuracy": res.get("image", {}).get("accuracy")},
        "nfe_per_slice": nfe,
        "seconds_per_slice": secs / max(n, 1),
        "tuned": {k: tuned[k] for k in ("level", "scale", "threshold", "val_dice")},
        "num_test_slices": n,
        "min_cc_size": min_cc,
        "volume": volume,
    }


def volume_means(slice_ids: Sequence[tuple[Any, Any]], pred_masks: Sequence[np.ndarray],
                 gt_masks: Sequence[np.ndarray], data_dir: str, setting: str) -> dict[str, Any]:
    """Per-patient 3-D metrics of a method's test masks ([H, W] each), as AnoFPDM's metrics.json "volume"
    section: {VOLUME_METRICS key: value} (3-D Dice, HD95 in mm, lesion-wise F1, ...)."""

    section, _ = volume_section(slice_ids, pred_masks, gt_masks, data_dir, setting, split="test")
    return {k: section.get(k) for k in VOLUME_METRICS}


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def build_models(method: str, paths: Mapping[str, Sequence[str]], timestep_respacing: str) -> Models:
    """Load the networks of ``method`` from ``paths`` ({"model": (log_dir, ckpt), "classifier": (...)})."""
    if method == "flair":
        return Models()
    model, diffusion = load_trained(*paths["model"], timestep_respacing)
    clf = load_classifier(*paths["classifier"]) if method == "ddim_classifier" else None
    return Models(model=model, diffusion=diffusion, classifier=clf)
