"""Diagnosis of a collapse (issue 22 item 3; docs/hae.md, 'Diagnosing a collapse'): per saved checkpoint of a
training run, what each hybrid CNN-Transformer block does to the decoder path, and where the gradient goes.

On one fixed batch of ``--slices`` validation slices (a seeded choice, half unhealthy when the split has
enough), per checkpoint:

* ``fusion_ratio[cond][t]`` (hybrid blocks): ||fusion output||_F / ||x||_F over the whole batch, where ``x``
  is the block's input (the decoder path the block adds its residual to: output = x + fusion) and the fusion
  output that residual, read by forward hooks (a pre-hook on the block, a hook on its ``fusion`` conv) while
  the network predicts the noise of x_t = q_sample(x_0, t, seeded noise), for each ``--timesteps`` t, with
  the slices' class labels (``cond`` "label") and with the null label ("null"). 0: the block is the
  identity; around 1 or more: the block's residual is as large as the path it is added to.
  ``fusion_ratio_mean[cond]``: the mean over t;
* ``cond_delta[t]`` (hybrid blocks): ||fusion(label) - fusion(null)||_F / ||x (label)||_F: how much of the
  block's residual depends on the class condition (0: the block ignores it);
* ``fusion_weight_norm`` / ``fusion_bias_norm`` (hybrid blocks): Frobenius norms of the zero-initialised
  fusion conv, read from the checkpoint file alone; ``zero_init_norm``: the norm of every other tensor of the
  block that a freshly built network holds at exactly 0 (normalisation layers excepted; their names are in
  ``blocks[name]["zero_init"]``);
* ``grad_norm[cond]`` (every ResBlock, AttentionBlock and hybrid block, so networks without hybrid blocks
  are compared level by level): the L2 norm of the gradient of the block's parameters of the training loss
  (``diffusion.training_losses`` "loss", the batch mean as in training) at one seeded t and noise per slice,
  no label dropout, dropout layers off, once with the class labels and once with the null label;
  ``param_norm``: the norm of the block's parameters.

Outputs in ``--out``: diagnosis.json (the run's config, the settings, the seed, the batch's slice ids, per
checkpoint its file and sha256, and one row per (checkpoint, block)), rewritten atomically after every
checkpoint, and diagnosis.png (one panel per measure against the training step). A rerun keeps the rows of
checkpoints whose sha256 is unchanged and computes the others; a diagnosis.json of other settings is refused,
naming them. The same inputs and seed give the same file, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.base import RESULT, DiffusionConfig, ModelConfig
from guided_diffusion.configs.config_flags import add_flags, from_args
from guided_diffusion.configs.diagnose_config import DiagnoseConfig
from guided_diffusion.configs.train_config import parse_ema_rates
from guided_diffusion.data.brats import BrainDataset
from guided_diffusion.experiments.block_diagnosis_measures import (
    CONDS,
    block_layout,
    fusion_measures,
    gradient_norms,
    hybrid_blocks,
    measured_blocks,
    tensor_norm,
    weight_norms,
    zero_init_names,
)
from guided_diffusion.experiments.experiments import described_differences
from guided_diffusion.registry import drop_foreign_options
from guided_diffusion.reporting.plots import _pyplot, _save
from guided_diffusion.script_util import create_from_configs, model_config
from guided_diffusion.training.checkpoint import (
    find_checkpoint,
    list_model_steps,
    load_model_checkpoint,
    load_state_dict_file,
)
from guided_diffusion.training.run import RUN_CONFIG
from guided_diffusion.unet import UNetModel
from guided_diffusion.utils.io_util import atomic_write_json, file_sha256
from guided_diffusion.utils.run_lock import run_lock

__all__ = ["CONDS", "DIAG_JSON", "DIAG_PNG", "block_layout", "diagnose", "fusion_measures",
           "gradient_norms", "hybrid_blocks", "main", "measure_checkpoint", "measured_blocks", "weight_norms",
           "zero_init_names"]

DIAG_VERSION = 1
DIAG_JSON, DIAG_PNG = "diagnosis.json", "diagnosis.png"


# ---------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """A training run: its configs, its saved record and the (step, checkpoint path) pairs to measure."""

    model: ModelConfig
    diffusion: DiffusionConfig
    record: dict[str, Any]
    checkpoints: list[tuple[int, str]]


def load_run(c: DiagnoseConfig) -> Run:
    """The run of ``--model_dir`` (its run_config.json) and its checkpoints (``--steps``, ``--ema``);
    FileNotFoundError / ValueError naming the flag when the folder, the record or a checkpoint is missing."""

    if not os.path.isdir(c.model_dir):
        raise FileNotFoundError(f"--model_dir {c.model_dir} does not exist or is not a folder; point it to a "
                                "training log dir")
    path = os.path.join(c.model_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model_dir {c.model_dir} holds no {RUN_CONFIG}: not a training log dir of "
                                "scripts/train.py or scripts/learning_curves.py")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        m = ModelConfig.from_dict(drop_foreign_options(record["model"]), source=path)
        d = DiffusionConfig.from_dict(record["diffusion"], source=path).replace(timestep_respacing="")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--model_dir {c.model_dir}: {path} is not a run record ({err})") from None
    present = list_model_steps(c.model_dir)
    if not present:
        raise FileNotFoundError(f"--model_dir {c.model_dir} holds no checkpoints (model*.pt / ema_*.pt); "
                                "train first (--save_interval)")
    missing = [s for s in c.steps if s not in present]
    if missing:
        raise FileNotFoundError(f"--steps {' '.join(map(str, missing))}: no checkpoint for "
                                f"{'this step' if len(missing) == 1 else 'these steps'} in {c.model_dir}; "
                                f"steps present: {', '.join(map(str, present))}")
    rate = parse_ema_rates(record.get("train", {}).get("ema_rate", "0.9999"))[0] if c.ema else None
    checkpoints = []
    for step in sorted(c.steps or present):
        try:
            checkpoints.append((step, find_checkpoint(c.model_dir, step=step, ema_rate=rate)))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--ema {c.ema}: {err}") from None
    return Run(m, d, record, checkpoints)


# ---------------------------------------------------------------------------------------------- the batch
@dataclasses.dataclass
class Batch:
    """The fixed batch: x [N, C, H, W] in [-1, 1], labels [N] (1 = unhealthy), slice ids (patient, k)."""

    x: torch.Tensor
    labels: torch.Tensor
    ids: list[tuple[str, int]]

    def sha256(self) -> str:
        """Digest of the slices' values and labels (the batch a row was measured on)."""
        h = hashlib.sha256(self.x.numpy().astype(np.float32).tobytes())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        return h.hexdigest()


def select_batch(data_dir: str, n: int, seed: int, m: ModelConfig) -> Batch:
    """``n`` validation slices in a seeded order: ⌊n/2⌋ unhealthy and the rest healthy, topped up with
    the other kind when one runs out; ValueError naming --slices when the split has fewer than ``n``."""

    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir} does not exist or is not a folder")
    ds = BrainDataset(data_dir, "val", mixed=True, in_channels=m.in_channels, image_size=m.image_size)
    if n > len(ds):
        raise ValueError(f"--slices {n} is more than the {len(ds)} slices of the validation split of "
                         f"{data_dir}")
    order = np.random.default_rng(seed).permutation(len(ds)).tolist()
    want = {1: n // 2, 0: n - n // 2}
    chosen: list[int] = []
    rest: list[int] = []
    for i in order:
        if len(chosen) == n:
            break
        lab = ds.read_label(i)
        if want[lab] > 0:
            want[lab] -= 1
            chosen.append(i)
        else:
            rest.append(i)
    chosen += rest[:n - len(chosen)]
    chosen.sort()
    items = [ds.load(i) for i in chosen]
    x = torch.stack([it[0] for it in items]).float()
    labels = torch.tensor([int(it[2]) for it in items], dtype=torch.long)
    return Batch(x, labels, [tuple(ds.slice_info(i)) for i in chosen])


@dataclasses.dataclass
class Draws:
    """Seeded draws shared by every checkpoint: noise per ratio timestep, and (t, noise) of the gradient."""

    ratio_noise: list[torch.Tensor]
    grad_t: torch.Tensor
    grad_noise: torch.Tensor


def make_draws(x: torch.Tensor, timesteps: Sequence[int], num_timesteps: int, seed: int) -> Draws:
    """Noise [N, C, H, W] per ratio timestep, t [N] uniform in [0, num_timesteps) and noise for the
    gradient, from one CPU generator seeded with ``seed`` (independent of the device)."""

    g = torch.Generator().manual_seed(int(seed))
    ratio = [torch.randn(x.shape, generator=g) for _ in timesteps]
    t = torch.randint(num_timesteps, (x.shape[0],), generator=g)
    return Draws(ratio, t, torch.randn(x.shape, generator=g))


# ---------------------------------------------------------------------------------------------- driver
def settings_of(c: DiagnoseConfig, run: Run, batch: Batch) -> dict[str, Any]:
    """Everything a row depends on besides its checkpoint: the architecture, the diffusion, the batch and
    the diagnosis flags that change results (not --steps, --out, the folders' paths)."""

    return json.loads(json.dumps({
        "version": DIAG_VERSION,
        "model": model_config(run.model, run.diffusion),
        "diffusion": run.diffusion.to_dict(),
        "diagnose": c.settings(RESULT),
        "batch_sha256": batch.sha256(),
    }))



def load_diagnosis(path: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored diagnosis at ``path`` (None when absent); ValueError naming every setting that differs."""

    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        stored = data["settings"]
        if not isinstance(data["checkpoints"], list) or not isinstance(data["rows"], list):
            raise TypeError("checkpoints and rows must be lists")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--out: {path} is not a diagnosis file ({type(err).__name__}: {err}); move it "
                         "away or use another --out") from None
    diffs = described_differences(stored, settings)
    if diffs:
        raise ValueError(f"--out: {path} was computed with other settings ({'; '.join(diffs)}); rerun with "
                         "the stored settings or use another --out")
    return data


def measure_checkpoint(model: UNetModel, diffusion: Any, path: str, step: int, batch: Batch, draws: Draws,
                       c: DiagnoseConfig, blocks: Mapping[str, Mapping[str, Any]],
                       zero_init: Mapping[str, Sequence[str]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(checkpoint entry, rows) of one checkpoint file: loads it into ``model`` and measures it."""

    state = load_state_dict_file(path)
    load_model_checkpoint(model, path)
    model.eval()
    dev = next(model.parameters()).device
    x = batch.x.to(dev)
    fusion = fusion_measures(model, diffusion, x, batch.labels, c.timesteps, draws.ratio_noise)
    weights = weight_norms(state, zero_init)
    grads, totals = gradient_norms(model, diffusion, x, batch.labels, draws.grad_t, draws.grad_noise,
                                   list(blocks))
    modules = dict(model.named_modules())
    rows = []
    for name, info in blocks.items():
        row = {"step": int(step), "block": name, **info, "grad_norm": grads[name],
               "param_norm": tensor_norm(list(modules[name].parameters()))}
        if info["kind"] == "hae":
            row.update(fusion[name])
            row.update(weights[name])
        rows.append(row)
    entry = {"step": int(step), "checkpoint": os.path.basename(path), "sha256": file_sha256(path), **totals}
    return entry, rows


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def diagnose(c: DiagnoseConfig) -> dict[str, Any]:
    """Measure every checkpoint of the run (resumable); returns the data written to diagnosis.json (and
    diagnosis.png)."""

    run = load_run(c)
    num_timesteps = run.diffusion.diffusion_steps
    too_late = [t for t in c.timesteps if t >= num_timesteps]
    if too_late:
        raise ValueError(f"--timesteps {' '.join(map(str, too_late))}: the run's chain has {num_timesteps} "
                         f"steps (0..{num_timesteps - 1})")
    if model_config(run.model, run.diffusion)["num_classes"] is None:
        raise ValueError(f"--model_dir {c.model_dir}: the run's model is unconditional; the diagnosis "
                         "compares the class label with the null label")
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise NotADirectoryError(f"--out {c.out} is a file; pass a folder")
    batch = select_batch(c.data_dir, c.slices, c.seed, run.model)
    settings = settings_of(c, run, batch)
    path, png = os.path.join(c.out, DIAG_JSON), os.path.join(c.out, DIAG_PNG)
    stored = load_diagnosis(path, settings)

    torch.manual_seed(c.seed)
    model, diffusion = create_from_configs(run.model, run.diffusion)
    blocks = measured_blocks(model)
    zero_init = {n: zero_init_names(model, n) for n, info in blocks.items() if info["kind"] == "hae"}
    model.to(_device())
    draws = make_draws(batch.x, c.timesteps, diffusion.num_timesteps, c.seed)
    data = stored or {"version": DIAG_VERSION, "settings": settings, "seed": c.seed,
                      "model_dir": os.path.abspath(c.model_dir), "run_config": run.record,
                      "batch": {"slice_ids": [list(i) for i in batch.ids], "labels": batch.labels.tolist()},
                      "blocks": {n: {**info, **({"zero_init": zero_init[n]} if n in zero_init else {})}
                                 for n, info in blocks.items()},
                      "checkpoints": [], "rows": []}
    with run_lock(c.out, "--out"):
        for step, ckpt in run.checkpoints:
            sha = file_sha256(ckpt)
            old = [e for e in data["checkpoints"] if e["step"] == step]
            if old and old[0]["sha256"] == sha:
                continue
            if old:
                print(f"step {step}: {ckpt} changed since its rows were computed (sha256 differs); measuring "
                      "it again", flush=True)
            entry, rows = measure_checkpoint(model, diffusion, ckpt, step, batch, draws, c, blocks, zero_init)
            data["checkpoints"] = sorted([*(e for e in data["checkpoints"] if e["step"] != step), entry],
                                         key=lambda e: e["step"])
            data["rows"] = sorted([*(r for r in data["rows"] if r["step"] != step), *rows],
                                  key=lambda r: (r["step"], list(blocks).index(r["block"])))
            atomic_write_json(data, path)
            ratios = [f"{r['block']}: ratio={r['fusion_ratio_mean']['label']:.3g}" for r in rows
                      if r["kind"] == "hae"]
            print(f"step {step}: loss(label)={entry['label']['loss']:.4g} " + " ".join(ratios), flush=True)
        atomic_write_json(data, path)
        write_png(data, png, title=f"block diagnosis of {c.model_dir}")
    print(f"wrote {path} and {png}", flush=True)
    return data


# ---------------------------------------------------------------------------------------------- plot
def plotted_blocks(data: Mapping[str, Any]) -> list[str]:
    """The blocks of the gradient panel: the hybrid blocks and the decoder ResBlocks of their levels (of the
    decoder levels but the finest when the network has no hybrid block)."""

    blocks = data["blocks"]
    hae_levels = {b["level"] for b in blocks.values() if b["kind"] == "hae"}
    levels = hae_levels or {b["level"] for b in blocks.values() if b["part"] == "output" and b["level"] > 0}
    return [n for n, b in blocks.items() if b["part"] == "output" and b["level"] in levels
            and b["kind"] in ("hae", "res")]


def write_png(data: Mapping[str, Any], path: str, title: str = "") -> None:
    """diagnosis.png: fusion ratio, conditioning delta, fusion weight norm and gradient norm against the
    training step; one line per block (label solid, null dashed where both exist)."""

    plt = _pyplot()
    rows = data["rows"]
    steps = sorted({r["step"] for r in rows})
    hae = [n for n, b in data["blocks"].items() if b["kind"] == "hae"]
    panels = ("fusion output / path (mean over t)", "conditioning: |r(label) - r(null)| / path (mean over t)",
              "fusion conv norm (dotted: other zero-init)", "gradient norm of the training loss")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    by = {(r["step"], r["block"]): r for r in rows}

    def series(block: str, get: Any) -> list[float]:
        return [get(by[(s, block)]) if (s, block) in by else np.nan for s in steps]

    for j, name in enumerate(hae):
        color = f"C{j}"
        for cond, style in zip(CONDS, ("-", "--")):
            axes[0][0].plot(steps, series(name, lambda r, k=cond: r["fusion_ratio_mean"][k]), style,
                            marker="o", ms=3, color=color, label=f"{name} ({cond})")
        axes[0][1].plot(steps, series(name, lambda r: float(np.mean(list(r["cond_delta"].values())))), "-",
                        marker="o", ms=3, color=color, label=name)
        axes[0][2].plot(steps, series(name, lambda r: r["fusion_weight_norm"]), "-", marker="o", ms=3,
                        color=color, label=f"{name} fusion")
        axes[0][2].plot(steps, series(name, lambda r: r["zero_init_norm"]), ":", color=color,
                        label=f"{name} other")
    for j, name in enumerate(plotted_blocks(data)):
        for cond, style in zip(CONDS, ("-", "--")):
            axes[0][3].plot(steps, series(name, lambda r, k=cond: r["grad_norm"][k]), style, marker="o", ms=3,
                            color=f"C{j}", label=f"{name} ({data['blocks'][name]['kind']}, {cond})")
    for k, (ax, name) in enumerate(zip(axes[0], panels)):
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("training step", fontsize=7)
        ax.tick_params(labelsize=6)
        if ax.lines:  # the gradient panel's many lines: its legend beside it
            ax.legend(fontsize=4, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if k == 3 else {}))
        else:
            ax.text(0.5, 0.5, "no hybrid blocks", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
        values = [v for line in ax.lines for v in line.get_ydata() if np.isfinite(v)]
        if k == 3 and values and min(values) > 0:
            ax.set_yscale("log")
    fig.suptitle(title or "block diagnosis (scripts/diagnose_blocks.py)", fontsize=8, y=1.04)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- entry
def parse(argv: Sequence[str]) -> DiagnoseConfig:
    """The DiagnoseConfig of the command line (``--help`` prints the flags and exits 0)."""

    parser = ArgumentParser(prog="diagnose_blocks.py", allow_abbrev=False,
                            description="Per checkpoint of a training run: the hybrid blocks' fusion output "
                            "and weights, and the gradient norm per block "
                            "(docs/hae.md, 'Diagnosing a collapse')")
    add_flags(parser, DiagnoseConfig)
    return from_args(DiagnoseConfig, parser.parse_args(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/diagnose_blocks.py: parse the flags and diagnose (errors: see cli.run_cli)."""

    diagnose(parse(sys.argv[1:] if argv is None else argv))
    return 0
