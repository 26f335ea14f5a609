"""The denoiser comparison's rows and training seeds (issue 22): the rows' own flags reach the training, the
evaluation and the cost measurement, the ablation rows build the networks they name, and a cell is the
mean ± std over training seeds of each training seed's mean over its evaluation seeds. No training here
(the smoke end-to-end run is tests/experiments/test_experiments.py)."""

from __future__ import annotations

import importlib.util
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.anofpdm.translation_flags import parse_run
from guided_diffusion.experiments import denoiser_comparison as dc
from guided_diffusion.experiments import experiments as ex
from guided_diffusion.experiments.measure import measure_models
from guided_diffusion.hae_blocks import HybridCNNTransformerBlockBase
from guided_diffusion.script_util import create_from_configs, create_model_and_diffusion
from guided_diffusion.training.training_flags import parse_configs_for_training
from guided_diffusion.unet_hae_v2 import DEFAULT_BOTTLENECK_RATIO

OPTION_FLAGS = {"hae_skeleton": "--use_hae False", "hae_v2_b0.5": "--bottleneck_ratio 0.5",
                "hae_v2_b1.0": "--bottleneck_ratio 1.0"}


def _dry_run(capsys, *extra: str) -> list[list[str]]:
    assert dc.main(["--preset", "smoke", "--dry_run", "--out", "/nonexistent/cmp", *extra]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]


def _row_of(cmd: list[str]) -> str:
    """The row name of a dry-run command, from its model folder ``models/<row>_train<seed>-...``."""
    folder = cmd[cmd.index("--model_dir" if "--model_dir" in cmd else "--log_dir") + 1]
    return folder.split("/models/")[1].split("_train")[0]


def test_row_flags_reach_the_train_and_eval_commands(capsys):
    rows = ["v2", "hae_skeleton", "hae_v2_b0.5", "hae_v2_b1.0"]
    cmds = _dry_run(capsys, "--rows", *rows, "--train_seeds", "0", "1", "--eval_seeds", "0", "2")
    assert len(cmds) == len(rows) * 2 * (1 + 2)
    for cmd in cmds:
        row, text = _row_of(cmd), shlex.join(cmd)
        for name, flag in OPTION_FLAGS.items():
            assert (flag in text) == (row == name), (row, flag, text)
        assert ("--use_hae" in text or "--bottleneck_ratio" in text) == (row != "v2")
    train = [c for c in cmds if c[1] == "scripts/train.py"]
    seeds = sorted((_row_of(c), c[c.index("--seed") + 1]) for c in train)
    assert seeds == sorted((r, s) for r in rows for s in ("0", "1"))
    folders = {c[c.index("--log_dir") + 1] for c in train}
    assert len(folders) == len(rows) * 2  # one model folder per (row, training seed)


@pytest.mark.parametrize("name", list(dc.NETWORK_ROWS))
def test_each_row_builds_its_network_in_train_and_eval(capsys, name):
    """train.py's and translation_FPDM.py's parsers read the row's flags into the same network config."""
    cmds = _dry_run(capsys, "--rows", name, "--train_seeds", "3", "--eval_seeds", "0")
    train, evaluation = cmds
    model, diffusion, _ = parse_configs_for_training(train[2:])
    run = parse_run(evaluation[2:])
    assert model.to_dict() == run.model.to_dict()
    row = dc.NETWORK_ROWS[name]
    assert model.unet_ver == row.unet_ver
    with torch.device("meta"):
        net, _ = create_from_configs(model, diffusion)
    hybrid = [m for m in net.modules() if isinstance(m, HybridCNNTransformerBlockBase)]
    if name in ("v2", "hae_skeleton"):
        assert hybrid == []
    else:
        assert hybrid
    if row.unet_ver == "hae_v2":
        assert net.bottleneck_ratio == row.options.get("bottleneck_ratio", 0.25)


def test_hae_skeleton_is_the_v2_layout_with_silu_resblocks():
    flags = dict(image_size=16, in_channels=4, num_classes=2, class_cond=True, num_channels=8,
                 channel_mult="1,2", attention_resolutions="8", num_heads=2, diffusion_steps=100)
    nets = {n: create_model_and_diffusion(**flags, **dc.NETWORK_ROWS[n].network())[0]
            for n in ("v2", "hae_skeleton", "hae")}
    shapes = {n: {k: tuple(v.shape) for k, v in m.state_dict().items()} for n, m in nets.items()}
    assert shapes["hae_skeleton"] == shapes["v2"]  # same layers, same parameters
    assert shapes["hae"] != shapes["v2"]  # the hybrid blocks are what hae adds
    silu = {n: sum(isinstance(x, torch.nn.SiLU) for x in m.modules()) for n, m in nets.items()}
    assert silu["hae_skeleton"] > silu["v2"]  # the ResBlocks' SiLUs that the FPDM UNet lacks
    torch.manual_seed(0)
    with torch.no_grad():  # the same non-zero weights in both (the output conv starts at zero)
        for param in nets["v2"].parameters():
            param.normal_(0.0, 0.2)
    nets["hae_skeleton"].load_state_dict(nets["v2"].state_dict())
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 70]), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(nets["hae_skeleton"](x, t, y=y), nets["v2"](x, t, y=y))


def test_cost_measures_each_row_with_its_flags():
    flags = dict(image_size=16, in_channels=4, num_classes=2, class_cond=True, num_channels=8,
                 channel_mult="1,2", attention_resolutions="8", num_heads=2, diffusion_steps=100)
    names = ["v2", "hae_skeleton", "hae_v2", "hae_v2_b1.0"]
    res = measure_models(flags, networks={n: dc.NETWORK_ROWS[n].network() for n in names}, batch=2, reps=1,
                         warmup=0)
    assert list(res) == names
    assert res["hae_skeleton"]["params"] == res["v2"]["params"]
    assert res["hae_v2_b1.0"]["params"] > res["hae_v2"]["params"] > res["v2"]["params"]
    assert res["hae_v2"]["params_ratio"] == pytest.approx(res["hae_v2"]["params"] / res["v2"]["params"])
    reordered = measure_models(flags, networks={n: dc.NETWORK_ROWS[n].network() for n in names[::-1]},
                               batch=2, reps=1, warmup=0, baseline="v2")
    assert reordered["v2"]["params_ratio"] == 1.0
    assert reordered["hae_v2"]["params_ratio"] == pytest.approx(res["hae_v2"]["params_ratio"])
    with pytest.raises(ValueError, match="not both"):
        measure_models(flags, ["v2"], networks={"v2": {"unet_ver": "v2"}}, batch=2)


def test_aliases_and_defaults():
    assert [r.name for r in dc.select_rows(None)] == list(dc.DENOISERS)
    assert [r.name for r in dc.select_rows(["hae_v2_b0.25", "v2"])] == ["hae_v2", "v2"]
    assert DEFAULT_BOTTLENECK_RATIO == 0.25  # what makes hae_v2_b0.25 the hae_v2 row
    assert dc.PRESETS["recipe"]["train_seeds"] == dc.PRESETS["demo"]["train_seeds"] == [0, 1, 2]
    assert len(dc.PRESETS["smoke"]["train_seeds"]) <= 2


def test_recipe_preset_is_the_main_jobs_recipe(capsys):
    """The recipe preset's commands carry run_main_job.py's recipe flags (its parser's defaults)."""
    path = Path(dc.REPO) / "scripts" / "run_main_job.py"
    spec = importlib.util.spec_from_file_location("run_main_job_recipe", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.build_parser().parse_args(["--unet_ver", "v2"])
    assert dc.main(["--preset", "recipe", "--dry_run", "--out", "/nonexistent/r", "--rows", "v2",
                    "--eval_seeds", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 * 2  # train seeds 0 1 2, one evaluation seed each
    train, evaluation = shlex.split(lines[0]), shlex.split(lines[1])

    def value(cmd, flag):
        return cmd[cmd.index(flag) + 1]

    for flag in [*job.model_flags(args)[::2], "--batch_size", "--lr", "--ema_rate", "--threshold",
                 "--max_steps"]:
        assert value(train, flag) == value([*job.model_flags(args), *job.train_flags(args)], flag), flag
    for flag in ("--timestep_respacing", "--forward_steps", "--ema_rate"):
        assert value(evaluation, flag) == value(job.eval_flags(args), flag), flag
    w = evaluation[evaluation.index("--w") + 1:evaluation.index("--modality")]
    assert [float(v) for v in w] == args.w


def test_aggregate_over_training_seeds_averages_evaluation_seeds_first():
    rng = np.random.default_rng(0)
    records, values = [], {}
    for row in ("v2", "hae_v2"):
        for ts in (0, 1, 2):
            evals = (0, 1) if ts < 2 else (0, 1, 2, 3)  # unequal counts: a flat mean would differ
            for es in evals:
                v = float(rng.uniform())
                values.setdefault((row, ts), []).append(v)
                meta = {"row": row, "train_seed": ts}
                records.append({"name": f"{row}_train{ts}", "seed": es, "meta": meta,
                                "metrics": {"unhealthy": {"dice": v}}})
    agg = ex.aggregate_over_training_seeds(records, ["unhealthy.dice"], lambda r: r["meta"]["row"],
                                           lambda r: r["meta"]["train_seed"])
    assert list(agg) == ["v2", "hae_v2"]
    for row in ("v2", "hae_v2"):
        per_seed = [float(np.mean(values[(row, ts)])) for ts in (0, 1, 2)]
        cell = agg[row]["unhealthy.dice"]
        assert cell["mean"] == pytest.approx(np.mean(per_seed)) and cell["n"] == 3
        assert cell["std"] == pytest.approx(np.std(per_seed))
        flat = np.mean([v for ts in (0, 1, 2) for v in values[(row, ts)]])
        assert not math.isclose(cell["mean"], flat)
        assert agg[row]["seeds"] == [0, 1, 2] and agg[row]["eval_seeds"]["2"] == [0, 1, 2, 3]
        assert agg[row]["per_train_seed"]["1"]["unhealthy.dice"] == pytest.approx(per_seed[1])


def test_train_seed_is_one_training_seed(capsys):
    one = _dry_run(capsys, "--rows", "hae", "--train_seed", "5", "--eval_seeds", "0")
    assert one == _dry_run(capsys, "--rows", "hae", "--train_seeds", "5", "--eval_seeds", "0")
    assert one[0][one[0].index("--seed") + 1] == "5" and len(one) == 2
