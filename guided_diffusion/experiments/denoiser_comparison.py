"""The denoiser comparison (issues 10 and 22): does the HAE family keep the FPDM UNet's quality?

Each *row* of the table is a network: a name, a ``unet_ver`` and the flags of its own options
(``NETWORK_ROWS``: the four networks ``v2``, ``hae``, ``hae_lite``, ``hae_v2`` and the ablations
``hae_skeleton`` (the HAE skeleton without hybrid blocks: v2's layout with SiLU ResBlocks),
``hae_v2_b0.5``, ``hae_v2_b1.0`` (the bottleneck ratio; ``hae_v2_b0.25`` is ``hae_v2``, whose default ratio
is 0.25); ``--rows`` picks them, default the four networks). Every (row, training seed) is trained once
with the same data, steps and batch (scripts/train.py into its own model folder, reused by later runs),
segmented with AnoFPDM label-free (scripts/translation_FPDM.py: several ``--w``, the paper's rule picks one
on the validation split) with each evaluation seed, and the rows' cost is measured side by side in one
process (guided_diffusion.experiments.measure). A cell is the mean ± population std over the training seeds
of each training seed's mean over the evaluation seeds; table.json keeps every training seed's values
(``rows.<row>.per_train_seed``). Outputs in ``--out``: table.md / table.csv / table.json, w_selection.png
(Fig. 5-style), denoisers.png, rows/ (one JSON per row, training seed and evaluation seed), models/
(``<row>_train<seed>-<fp12>``), work/, data/.

Presets: ``smoke`` (tests; 16 px, 8 channels, a few steps and slices), ``demo`` (embedded data, 2-core CPU,
32 px, 16 channels, 500 steps), ``recipe`` (the main job's recipe, guided_diffusion/configs/recipe.py:
7,000 steps), ``paper`` (BraTS21: 128 px, 600 forward steps of 1000, batch 64, 210k steps, EMA 0.9999;
needs --data_dir; ``--dry_run`` prints the commands, config/run_compare_denoisers_brats.sh runs them on a
cluster with torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.recipe import RECIPE_DATA, RECIPE_EVAL, RECIPE_MODEL, RECIPE_TRAIN
from guided_diffusion.data.fingerprint import data_fingerprint
from guided_diffusion.experiments import experiments as ex
from guided_diffusion.experiments.measure import CPU_ENV
from guided_diffusion.reporting import plots
from guided_diffusion.utils.io_util import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NetworkRow:
    """One row of the denoiser table: ``name`` (file-name safe, unique), the network ``unet_ver`` and the
    values of that variant's own options (registry options, e.g. ``use_hae``), passed as flags to the
    training, the evaluation and the cost measurement alike."""

    name: str
    unet_ver: str
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def flags(self) -> list[str]:
        """``--unet_ver VER`` and ``--option value`` per option (train.py / translation_FPDM.py flags)."""
        options = [x for k, v in self.options.items() for x in (f"--{k}", str(v))]
        return ["--unet_ver", self.unet_ver, *options]

    def network(self) -> dict[str, Any]:
        """The flags that make this network for ``create_model_and_diffusion`` (measure.py's spec)."""
        return {"unet_ver": self.unet_ver, **self.options}


NETWORK_ROWS: dict[str, NetworkRow] = {r.name: r for r in (
    NetworkRow("v2", "v2", description="the FPDM UNet (upstream ResBlocks, without their SiLUs)"),
    NetworkRow("hae", "hae", description="HAE: SiLU ResBlocks + hybrid CNN-transformer decoder blocks"),
    NetworkRow("hae_lite", "hae_lite", description="HAE Lite"),
    NetworkRow("hae_v2", "hae_v2", description="HAE V2 (bottleneck ratio 0.25, its default)"),
    NetworkRow("hae_skeleton", "hae", {"use_hae": False},
               "the HAE skeleton without hybrid blocks: v2's layout with SiLU ResBlocks"),
    NetworkRow("hae_v2_b0.5", "hae_v2", {"bottleneck_ratio": 0.5}, "HAE V2, bottleneck ratio 0.5"),
    NetworkRow("hae_v2_b1.0", "hae_v2", {"bottleneck_ratio": 1.0}, "HAE V2, bottleneck ratio 1.0"),
)}
# another name of a row: hae_v2's default bottleneck ratio is 0.25 (unet_hae_v2.DEFAULT_BOTTLENECK_RATIO)
ROW_ALIASES = {"hae_v2_b0.25": "hae_v2"}
DENOISERS = ("v2", "hae", "hae_lite", "hae_v2")  # the default rows: the four networks
ABLATIONS = ("hae_skeleton", "hae_v2_b0.5", "hae_v2_b1.0")
COST_BASELINE = NETWORK_ROWS["v2"]  # the ×v2 ratios; measured also when v2 is not a row

_MODEL_COMMON = dict(in_channels=4, num_classes=2, dropout=0.0, diffusion_steps=1000, noise_schedule="linear")
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        model=dict(_MODEL_COMMON, image_size=16, num_channels=8, channel_mult="1,2",
                   attention_resolutions="8", num_heads=2),
        data=dict(subjects=4, slice_step=12), train_steps=4, batch_size=4, lr=5e-4, ema_rate="0.9",
        label_dropout=0.2, timestep_respacing="10", forward_steps=6, w=[1.0, 3.0], eval_seeds=[0, 1, 2],
        train_seeds=[0], num_slices=8, num_slices_val=None, eval_batch=16, cost_batch=4, cost_reps=2,
        save_interval=4),
    "demo": dict(
        model=dict(_MODEL_COMMON, image_size=32, num_channels=16, channel_mult="1,2,2",
                   attention_resolutions="16,8", num_heads=4),
        # 500 steps and a 25-step chain (15 forward = the paper's 60 %) to fit ~40 min on a 2-core CPU:
        # measured 0.6-0.7 s per training step and ~0.5 s per slice at 50/30 (156 test + 36 val slices)
        data=dict(subjects=20, slice_step=2), train_steps=500, batch_size=16, lr=5e-4, ema_rate="0.995",
        label_dropout=0.2, timestep_respacing="25", forward_steps=15, w=[3.0, 6.0, 10.0, 15.0, 20.0],
        eval_seeds=[0, 1, 2], train_seeds=[0, 1, 2], num_slices=None, num_slices_val=None, eval_batch=32,
        cost_batch=16, cost_reps=5, save_interval=200),
    # the main job's recipe (scripts/run_main_job.py takes the same numbers from configs/recipe.py)
    "recipe": dict(
        model=dict(RECIPE_MODEL),
        data={k: RECIPE_DATA[k] for k in ("subjects", "slice_step")}, **RECIPE_TRAIN,
        timestep_respacing=RECIPE_EVAL["timestep_respacing"], forward_steps=RECIPE_EVAL["forward_steps"],
        w=list(RECIPE_EVAL["w"]), eval_seeds=[0, 1, 2], train_seeds=[0, 1, 2], num_slices=None,
        num_slices_val=None, eval_batch=32, cost_batch=RECIPE_TRAIN["batch_size"], cost_reps=5,
        save_interval=1000),
    "paper": dict(
        model=dict(_MODEL_COMMON, image_size=128, num_channels=128, channel_mult="",
                   attention_resolutions="32,16,8", num_heads=4, dropout=0.1),
        data=None, train_steps=210000, batch_size=64, lr=1e-4, ema_rate="0.9999", label_dropout=0.1,
        timestep_respacing="", forward_steps=600, w=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
        eval_seeds=[0, 1, 2], train_seeds=[0, 1, 2], num_slices=None, num_slices_val=1000, eval_batch=50,
        cost_batch=8, cost_reps=10, save_interval=5000),
}
COLUMNS = [
    ex.Column("cost.params", "params (M)", 1e-6, 3, False),
    ex.Column("cost.params_ratio", "params ×v2", 1, 2, False),
    ex.Column("cost.step_s", "train step (ms)", 1e3, 1, False),
    ex.Column("cost.step_s_ratio", "step ×v2", 1, 2, False),
    ex.Column("cost.peak_mib", "peak mem (MiB)", 1, 1, False),
    ex.Column("cost.peak_mib_ratio", "mem ×v2", 1, 2, False),
    ex.Column("seconds_per_slice", "s / slice", 1, 3),
    ex.Column("chosen_w", "chosen w", 1, 1),
    *[ex.Column(f"{s}.{m}", f"{s[:3]}. {m.upper()} (%)", 100, 1)
      for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc")],
    ex.Column("volume.dice_3d_mean", "3-D DICE (%)", 100, 1),
    ex.Column("volume.hd95_mm_mean", "HD95 (mm)", 1, 1),
]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--out", default=None, help="output folder (default runs/compare_denoisers_<preset>)")
    p.add_argument("--data_dir", default=None, help="preprocessed data root (default: build the synthetic "
                   "dataset in OUT/data; required for --preset paper)")
    names = ", ".join([*NETWORK_ROWS, *ROW_ALIASES])
    aliases = ", ".join(f"{a} = {b}" for a, b in ROW_ALIASES.items())
    p.add_argument("--rows", "--denoisers", dest="rows", nargs="+", default=None, metavar="ROW",
                   help=f"table rows, in order (default: {' '.join(DENOISERS)}); each one of {names} "
                   f"(ablations: {' '.join(ABLATIONS)}; {aliases})")
    p.add_argument("--train_seeds", type=int, nargs="+", default=None,
                   help="training seeds, one model per (row, seed) (default: the preset's; demo, recipe, "
                   "paper: 0 1 2)")
    p.add_argument("--train_seed", type=int, default=None, help="one training seed (= --train_seeds S)")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=None, help="default: the preset's (0 1 2)")
    p.add_argument("--train_steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--w", type=float, nargs="+", default=None, help="override the preset's w list")
    p.add_argument("--num_slices", type=int, default=None, help="first N test slices (default: preset's)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute rows stored under other settings (default: refuse with the differences)")
    p.add_argument("--launcher", default="", help="prefix of the train/eval commands, e.g. "
                   "'python -m torch.distributed.run --nproc-per-node 8' (default: plain python)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cost measurement device "
                   "(default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: leave as is)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


def select_rows(names: Sequence[str] | None) -> list[NetworkRow]:
    """The table rows named by ``--rows`` (None: the four networks), aliases resolved; ValueError naming
    the flag for an unknown or repeated row."""
    if names is None:
        return [NETWORK_ROWS[n] for n in DENOISERS]
    rows: list[NetworkRow] = []
    for name in names:
        canonical = ROW_ALIASES.get(name, name)
        if canonical not in NETWORK_ROWS:
            raise ValueError(f"--rows: unknown row {name!r}; expected some of "
                             f"{', '.join([*NETWORK_ROWS, *ROW_ALIASES])}")
        if any(r.name == canonical for r in rows):
            alias = f" ({name} is {canonical})" if name != canonical else ""
            raise ValueError(f"--rows lists {canonical} twice{alias}; expected distinct rows")
        rows.append(NETWORK_ROWS[canonical])
    return rows


def resolve(options: Mapping[str, Any]) -> dict[str, Any]:
    """The preset named by ``options["preset"]`` with the command-line overrides (``build_parser``'s
    options as a dict) applied and checked; ``cfg["rows"]`` holds the selected ``NetworkRow``s."""
    cfg = json.loads(json.dumps(PRESETS[options["preset"]]))
    for key in ("eval_seeds", "train_steps", "w", "num_slices", "train_seeds"):
        if options.get(key) is not None:
            cfg[key] = options[key]
    if options.get("train_seed") is not None:
        if options.get("train_seeds") is not None:
            raise ValueError("--train_seed and --train_seeds: give one of them (--train_seed S is "
                             "--train_seeds S)")
        if options["train_seed"] < 0:
            raise ValueError(f"--train_seed must be >= 0, got {options['train_seed']}")
        cfg["train_seeds"] = [options["train_seed"]]
    if cfg["train_steps"] < 1:
        raise ValueError(f"--train_steps must be >= 1, got {cfg['train_steps']}")
    if len(set(cfg["eval_seeds"])) != len(cfg["eval_seeds"]):
        raise ValueError(f"--eval_seeds has repeated values {cfg['eval_seeds']}")
    seeds = list(cfg["train_seeds"])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--train_seeds has repeated values {seeds}; expected distinct seeds")
    if any(s < 0 for s in seeds):
        raise ValueError(f"--train_seeds must be >= 0, got {seeds}")
    cfg["rows"] = select_rows(options.get("rows"))
    ex.check_run_options(cfg, options)
    data_dir = options.get("data_dir")
    if cfg["data"] is None and not data_dir:
        raise ValueError(f"--preset {options['preset']} needs --data_dir (the preprocessed BraTS21 root)")
    if data_dir and not options.get("dry_run") and not os.path.isdir(os.path.join(data_dir, "data_splits")):
        raise FileNotFoundError(f"--data_dir {data_dir} has no data_splits/: not a preprocessed data root")
    cfg["save_interval"] = min(cfg["save_interval"], cfg["train_steps"])
    return cfg


def _flags(d: Mapping[str, Any]) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def model_flags(cfg: Mapping[str, Any], row: NetworkRow) -> list[str]:
    """The network and diffusion flags train.py and translation_FPDM.py share: the preset's, then the
    row's ``--unet_ver`` and option flags."""
    return [*_flags(cfg["model"]), "--timestep_respacing", cfg["timestep_respacing"], *row.flags()]


def train_command(cfg: Mapping[str, Any], row: NetworkRow, data_dir: str, log_dir: str, seed: int,
                  prefix: Sequence[str]) -> list[str]:
    """scripts/train.py's command for (row, training ``seed``) into ``log_dir`` (resumable)."""
    return [*prefix, "scripts/train.py", "--data_dir", data_dir, "--log_dir", log_dir, *model_flags(cfg, row),
            "--batch_size", str(cfg["batch_size"]), "--lr", str(cfg["lr"]), "--ema_rate", cfg["ema_rate"],
            "--threshold", str(cfg["label_dropout"]), "--max_steps", str(cfg["train_steps"]),
            "--save_interval", str(cfg["save_interval"]), "--log_interval", "100", "--seed", str(seed),
            "--resume", "auto", "--num_workers", "0"]


def eval_command(cfg: Mapping[str, Any], row: NetworkRow, data_dir: str, model_dir: str, log_dir: str,
                 seed: int, prefix: Sequence[str]) -> list[str]:
    """scripts/translation_FPDM.py's command evaluating the model in ``model_dir`` with evaluation
    ``seed`` into ``log_dir`` (resumable)."""
    cmd = [*prefix, "scripts/translation_FPDM.py", "--data_dir", data_dir, "--model_dir", model_dir,
           "--log_dir", log_dir, *model_flags(cfg, row), "--model_num", str(cfg["train_steps"]),
           "--ema", "True", "--ema_rate", cfg["ema_rate"], "--forward_steps", str(cfg["forward_steps"]),
           "--w", *[f"{w:g}" for w in cfg["w"]], "--modality", "0", "3",
           "--batch_size", str(cfg["eval_batch"]),
           "--batch_size_val", str(cfg["eval_batch"]), "--seed", str(seed), "--resume", "True",
           "--progress", "False", "--num_panels", "4"]
    for flag in ("num_slices", "num_slices_val"):
        if cfg[flag]:
            cmd += [f"--{flag}", str(cfg[flag])]
    return cmd


def model_name(row: NetworkRow, train_seed: int) -> str:
    """The name of (row, training seed): its model folder ``models/<name>-<fp12>`` and its row files
    ``rows/<name>_seed<evaluation seed>.json``."""
    return f"{row.name}_train{train_seed}"


def train_settings(base: Mapping[str, Any], row: NetworkRow, train_seed: int) -> dict[str, Any]:
    """The settings that make a trained model (its folder's fingerprint): ``base`` (data, model, training
    flags), the row's network and options, the training seed."""
    settings = {**base, "train_seed": train_seed, "unet_ver": row.unet_ver}
    if row.options:
        settings["model_options"] = dict(row.options)
    return settings


def data_identity(data_dir: str) -> str:
    """The content fingerprint (sha256) of every slice file and split list of the three splits of a data
    root (guided_diffusion/data/fingerprint.py, cached beside the data): changes whenever the data does."""

    return data_fingerprint(data_dir).digest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(vars(args))
    rows, train_seeds = cfg["rows"], list(cfg["train_seeds"])
    out = os.path.abspath(args.out or f"runs/compare_denoisers_{args.preset}")
    pypath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pypath)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(out, "data")
    command = "python scripts/compare_denoisers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        for row in rows:
            for train_seed in train_seeds:
                name = model_name(row, train_seed)
                log_dir = os.path.join(out, "models", f"{name}-<fingerprint>")
                print(shlex.join(train_command(cfg, row, data_dir, log_dir, train_seed, prefix)))
                for seed in cfg["eval_seeds"]:
                    ev = os.path.join(out, "work", f"{name}_seed{seed}-<fingerprint>", "eval")
                    print(shlex.join(eval_command(cfg, row, data_dir, log_dir, ev, seed, prefix)))
        return 0
    if not args.data_dir:
        build_synthetic(data_dir, cfg, env)
    data_id = data_identity(data_dir)
    if not args.recompute:
        ex.refuse_rows_on_other_data(out, data_dir, data_id)
    base = {"preset": args.preset, "data_dir": data_dir, "data_sha256": data_id, "model": cfg["model"],
            "timestep_respacing": cfg["timestep_respacing"],
            **{k: cfg[k] for k in ("train_steps", "batch_size", "lr", "ema_rate", "label_dropout")}}
    eval_set = {k: cfg[k] for k in ("forward_steps", "w", "num_slices", "num_slices_val", "eval_batch")}
    eval_rows, ckpts, models = [], {}, {}
    for row in rows:
        for train_seed in train_seeds:
            name, train_set = model_name(row, train_seed), train_settings(base, row, train_seed)
            log_dir, ckpt = ex.train_once(
                name, lambda d, r=row, t=train_seed: train_command(cfg, r, data_dir, d, t, prefix),
                train_set, os.path.join(out, "models"), cfg["train_steps"], cfg["ema_rate"], str(REPO), env)
            settings = ex.checkpoint_settings({**train_set, **eval_set}, ckpt)
            ckpts[name], models[name] = settings["checkpoint_sha256"], log_dir
            for seed in cfg["eval_seeds"]:
                def evaluate(work: str, r: NetworkRow = row, s: int = seed, m: str = log_dir
                             ) -> dict[str, Any]:
                    ev = os.path.join(work, "eval")
                    ex.run_command(eval_command(cfg, r, data_dir, m, ev, s, prefix), str(REPO), env)
                    return ex.read_anofpdm_metrics(ev)
                meta = {"row": row.name, "train_seed": train_seed, "model_dir": log_dir}
                eval_rows.append(ex.Row(name, seed, settings, evaluate, meta=meta))
    device = args.device or _default_device()
    networks = {COST_BASELINE.name: COST_BASELINE.network(), **{r.name: r.network() for r in rows}}
    cost_set = {"model": cfg["model"], "timestep_respacing": cfg["timestep_respacing"], "networks": networks,
                "batch": cfg["cost_batch"], "reps": cfg["cost_reps"], "device": device,
                "label_dropout": cfg["label_dropout"], "threads": args.threads}
    records = ex.run_rows(eval_rows, out, "recompute" if args.recompute else "refuse")
    # the cost row measures the networks of this table: one of another set of rows is replaced, not refused
    cost_row = ex.Row("cost", 0, cost_set, lambda work: _measure(cost_set, work, env))
    cost = ex.run_rows([cost_row], out, "recompute")[0]["metrics"]
    for rec in records:
        rec["metrics"] = {**rec["metrics"], "cost": cost.get(rec["meta"]["row"], {})}
    agg = ex.aggregate_over_training_seeds(records, [c.key for c in COLUMNS], lambda r: r["meta"]["row"],
                                           lambda r: r["meta"]["train_seed"])
    prov = {"command": command, "preset": args.preset,
            "settings": {"train": base, "train_seeds": train_seeds, "eval": eval_set,
                         "eval_seeds": cfg["eval_seeds"]},
            "rows": {r.name: {"unet_ver": r.unet_ver, "options": dict(r.options),
                              "description": r.description} for r in rows},
            "checkpoint_sha256": ckpts, "model_dirs": models, "cost": cost_set}
    notes = [f"Training seeds {train_seeds}, evaluation seeds {cfg['eval_seeds']} on each trained model; "
             "table.json rows.<row>.per_train_seed holds each training seed's values.",
             "Cost columns: measured once, side by side in one process (models alternated, median step; "
             f"device {device}), one training step = loss + backward + AdamW at batch {cfg['cost_batch']}; "
             "×v2: ratio to v2 measured in the same process.",
             "s / slice: process-seconds of the test-split forward process + segmentation per slice.",
             *[f"{r.name}: {r.description}." for r in rows if r.description]]
    paths = ex.write_tables(out, f"Denoiser comparison ({args.preset} preset)", COLUMNS, agg, prov,
                            notes=notes, std_note=ex.TRAIN_STD_NOTE)

    per_w: dict[str, list[Any]] = {r.name: [] for r in rows}
    chosen: dict[str, list[Any]] = {r.name: [] for r in rows}
    for rec in records:
        per_w[rec["meta"]["row"]].append(rec["metrics"].get("per_w", {}))
        chosen[rec["meta"]["row"]].append(rec["metrics"].get("chosen_w"))
    plots.plot_w_selection(per_w, chosen, os.path.join(out, "w_selection.png"))
    plots.plot_denoisers(agg, os.path.join(out, "denoisers.png"))
    print(open(paths["md"], encoding="utf-8").read().split("\nProduced by")[0])
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}, w_selection.png, denoisers.png in {out}")
    return 0


def build_synthetic(data_dir: str, cfg: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Build the preset's synthetic dataset in ``data_dir`` unless a complete build of it is there.

    The marker ``synthetic_build.json`` is written after a successful build, so a killed build (whose
    data_splits/ already exists) is rebuilt, and a build made with other settings is replaced."""

    want = {**cfg["data"], "seed": 0, "image_size": cfg["model"]["image_size"]}
    marker = os.path.join(data_dir, "synthetic_build.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == want:
                return
    ex.run_command([sys.executable, "scripts/make_synthetic_brats.py", "--out", data_dir, "--subjects",
                    str(want["subjects"]), "--seed", "0", "--image_size", str(want["image_size"]),
                    "--slice_step", str(want["slice_step"]), "--quiet", "--overwrite"], str(REPO), env)
    atomic_write_json(want, marker)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _measure(cost_set: Mapping[str, Any], work: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Run measure.py in a fresh process on the networks of ``cost_set`` -> {row name: cost}."""
    flags = {**cost_set["model"], "timestep_respacing": cost_set["timestep_respacing"], "class_cond": True}
    spec = {"flags": flags, "networks": cost_set["networks"], "baseline": COST_BASELINE.name,
            "batch": cost_set["batch"],
            "reps": cost_set["reps"], "device": cost_set["device"],
            "label_dropout": cost_set["label_dropout"], "threads": cost_set["threads"]}
    spec_path, out_path = os.path.join(work, "spec.json"), os.path.join(work, "cost.json")
    atomic_write_json(spec, spec_path)
    ex.run_command([sys.executable, "-m", "guided_diffusion.experiments.measure", spec_path, out_path],
                   str(REPO), {**env, **CPU_ENV})
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)
