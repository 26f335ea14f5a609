"""scripts/forward_window_study.py (guided_diffusion.experiments.forward_window) on the tiny seeded model of
tests/tiny_eval.py (16 px, 8 channels, 8 validation and 7 test slices): the truncation property the window
part relies on, the window numbers against real passes, the calibration-size part against
translation_FPDM.py, determinism and the resume / refusal rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_eval as te
import torch

from guided_diffusion.anofpdm import translation
from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.anofpdm.pipeline import slice_generators
from guided_diffusion.cli import run_cli
from guided_diffusion.experiments import forward_window as fw
from guided_diffusion.script_util import create_model_and_diffusion

WS = (1.0, 3.0)
MODALITY = (0, 3)


@pytest.fixture(scope="module")
def tiny_net():
    """(model, diffusion with a 10-step chain, x0 [4, 4, 16, 16], labels [4]) with seeded random weights."""
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**te.MODEL_KW, timestep_respacing="10")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x0 = torch.rand(4, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, diffusion, x0, torch.tensor([1, 0, 1, 1])


def _pass(net, steps: int):
    model, diffusion, x0, _ = net
    return run_forward_process(model, diffusion, x0, ws=WS, modality=MODALITY, forward_steps=steps,
                               generator=slice_generators(3, "test", range(4)))


def test_first_steps_of_the_whole_chain_are_the_shorter_pass(tiny_net):
    whole = _pass(tiny_net, 9)  # the most a 10-step chain allows
    assert whole.div.shape == (4, len(WS), 9, len(MODALITY))
    for steps in (2, 4, 6, 9):
        short = _pass(tiny_net, steps)
        assert torch.equal(short.div, whole.div[:, :, :steps])  # bit for bit: the encoding is sequential
        assert torch.equal(short.mse_h, whole.mse_h[:, :, :steps])
        assert torch.equal(short.mse_null, whole.mse_null[:, :steps])
        assert torch.equal(short.end_step, fw.first_argmax(whole.div, steps))
    assert (whole.end_step > 0).any()  # not a trivial all-zero argmax


def test_inside_share_of_a_window_equals_the_pass_with_that_window(tiny_net):
    labels = tiny_net[3]
    whole = _pass(tiny_net, 9)
    positions = fw.chain_positions(tiny_net[1], 9, 40)
    assert positions[0] == 0 and positions[-1] == pytest.approx(tiny_net[1].timestep_map[8].item() / 39)
    summary = fw.window_summary(whole.div, labels, positions, 10, WS, MODALITY)
    for wi, w in enumerate(WS):
        for row in summary["per_w"][f"{w:g}"]["windows"]:
            f = row["F"]
            recorded = _pass(tiny_net, f).end_step[:, wi].max(dim=-1).values  # slices.csv's t_e
            expect = float(((recorded > 0) & (recorded < f - 1))[labels == 1].double().mean())
            assert row["unhealthy"] == pytest.approx(expect, abs=0)
        rows = summary["per_w"][f"{w:g}"]["windows"]
        assert rows[-1]["F"] == 9  # share 1.0: the whole chain
        assert rows[-1]["unhealthy_chain_peak_inside"] == rows[-1]["unhealthy"]
        held = [r["unhealthy_chain_peak_inside"] for r in rows]
        assert held == sorted(held)  # a longer window holds every peak a shorter one holds
        te_whole = whole.end_step[:, wi].max(dim=-1).values[labels == 1]
        rec = summary["per_w"][f"{w:g}"]["peak_position"]["unhealthy"]["recorded"]
        assert rec["n"] == 3 and sum(rec["hist"]) == 3
        assert rec["share_at_last_step"] == pytest.approx(float((te_whole == 8).double().mean()))
        curve = summary["per_w"][f"{w:g}"]["mean_curve"]["unhealthy"]
        assert len(curve) == 9 and max(curve) <= 1 + 1e-12


def test_stratified_subsets():
    labels = np.array([0] * 5 + [1] * 3)
    for n in (2, 3, 5, 8):
        for d in range(5):
            pick = fw.draw_subset(labels, n, np.random.default_rng(np.random.SeedSequence([0, n, d])))
            assert pick.size == n == np.unique(pick).size
            assert 0 < labels[pick].sum() < n  # both labels
    assert fw.draw_subset(labels, 4, np.random.default_rng(1)).tolist() == \
        fw.draw_subset(labels, 4, np.random.default_rng(1)).tolist()


# ---------------------------------------------------------------------------------------------- script
def _flags(data: Path, mdir: Path) -> list[str]:
    return [*te.MODEL_FLAGS, "--data_dir", str(data), "--model_dir", str(mdir), "--w", "1", "3",
            "--forward_steps", "5", "--modality", "0", "3", "--timestep_respacing", "10", "--batch_size", "3",
            "--batch_size_val", "4", "--seed", "5"]


def _study(data: Path, mdir: Path, out: Path, *extra: str) -> int:
    return run_cli(fw.main, [*_flags(data, mdir), "--out", str(out), "--respacings", "6", "10",
                             "--val_sizes", "2", "4", "8", "--draws", "3", *extra])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("fw")
    data, mdir = te.make_run(root)
    assert _study(data, mdir, root / "a") == 0
    return data, mdir, root


def test_full_validation_equals_the_evaluation(study):
    data, mdir, root = study
    argv = [*_flags(data, mdir), "--log_dir", str(root / "eval"), "--progress", "False", "--num_panels", "0"]
    translation.main(argv)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    cals = {c["w"]: c for c in json.loads((root / "eval" / "calibration.json").read_text())["calibrations"]}
    full = json.loads((root / "a" / "calibration_size.json").read_text())["full"]
    w = metrics["guidance_selection"]["chosen_w"]
    assert full["chosen_w"] == w and full["n"] == 8
    assert full["thr_01"] == cals[w]["thr_01"] and full["diff_max"] == cals[w]["diff_max"]
    assert full["val_accuracy_by_w"] == {f"{v:g}": cals[v]["accuracy"] for v in cals}
    assert full["dice"] == pytest.approx(metrics["unhealthy"]["dice"], abs=1e-12)
    assert full["image_accuracy"] == pytest.approx(metrics["image"]["accuracy"], abs=1e-12)
    if full["auprc"] is not None:
        assert full["auprc"] == pytest.approx(metrics["unhealthy"]["auprc"], abs=1e-9)


def test_outputs_determinism_resume_and_refusal(study, capsys):
    data, mdir, root = study
    a = root / "a"
    for name in ("window.json", "window.png", "calibration_size.json", "calibration_size.png", "study.md",
                 "curves_R6.npz", "curves_R10.npz"):
        assert (a / name).is_file(), name
    win = json.loads((a / "window.json").read_text())
    cal = json.loads((a / "calibration_size.json").read_text())
    for part in (win, cal):
        assert len(part["model_sha256"]) == 64 and len(part["data_sha256"]) == 64 and part["seed"] == 5
        assert "--respacings 6 10" in part["command"]
    assert sorted(win["chains"]) == ["10", "6"] and win["chains"]["10"]["forward_steps"] == 9
    assert sorted(cal["sizes"], key=int) == ["2", "4", "8"] and len(cal["sizes"]["2"]["draws"]) == 3
    assert all(r["n"] == 2 for r in cal["sizes"]["2"]["draws"])
    # a second folder: the same numbers
    assert _study(data, mdir, root / "b") == 0
    win_b = json.loads((root / "b" / "window.json").read_text())
    cal_b = json.loads((root / "b" / "calibration_size.json").read_text())
    for r in win["chains"]:  # everything but the wall time
        assert win_b["chains"][r]["groups"] == win["chains"][r]["groups"]
        assert win_b["chains"][r]["positions"] == win["chains"][r]["positions"]
    assert (root / "b" / "study.md").read_text().split("## Where")[1] == \
        (a / "study.md").read_text().split("## Where")[1]
    assert cal_b["sizes"] == cal["sizes"] and cal_b["full"] == cal["full"]
    # curves files without their key (written before it) are reused only beside a window.json of the same
    # settings apart from the chain list
    npz = root / "b" / "curves_R6.npz"
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files if k != "key"}
    np.savez(npz, **arrays)
    capsys.readouterr()
    assert run_cli(fw.main, [*_flags(data, mdir), "--out", str(root / "b"), "--respacings", "6",
                             "--val_sizes", "2", "4", "8", "--draws", "3", "--overwrite"]) == 0
    assert "chain R=6 reused" in capsys.readouterr().out
    np.savez(npz, **arrays)
    flags = _flags(data, mdir)
    flags[flags.index("--seed") + 1] = "6"
    assert run_cli(fw.main, [*flags, "--out", str(root / "b"), "--respacings", "6", "--val_sizes", "2",
                             "--draws", "1", "--overwrite"]) == 0
    assert "chain R=6 (5 forward steps" in capsys.readouterr().out
    # a rerun reuses both parts
    capsys.readouterr()
    assert _study(data, mdir, a) == 0
    out = capsys.readouterr().out
    assert "chain R=6 reused" in out and "chain R=10 reused" in out and "calibration size: reused" in out
    # other settings: refused naming them, accepted with --overwrite
    argv = [*_flags(data, mdir), "--out", str(a), "--respacings", "6", "10", "--val_sizes", "2", "4", "8",
            "--draws", "2"]
    assert run_cli(fw.main, argv) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "draws: stored 3, now 2" in err
    assert run_cli(fw.main, [*argv, "--overwrite"]) == 0
    assert len(json.loads((a / "calibration_size.json").read_text())["sizes"]["2"]["draws"]) == 2
    assert "chain R=6 reused" in capsys.readouterr().out  # the curves are keyed by their own settings
    argv[argv.index("--respacings") + 2] = "8"  # another chain list: only the new chain is computed
    assert run_cli(fw.main, [*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "chain R=6 reused" in out and "chain R=8 (7 forward steps" in out
    assert sorted(json.loads((a / "window.json").read_text())["chains"], key=int) == ["6", "8"]
