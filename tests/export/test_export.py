"""export.py / scripts/export_model.py: safetensors export, model card, load_pretrained, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guided_diffusion.configs.calibration import Calibration, save_calibrations
from guided_diffusion.export.export import export_run, load_pretrained
from guided_diffusion.script_util import create_model_and_diffusion, diffusion_defaults, model_config
from guided_diffusion.training import checkpoint
from guided_diffusion.utils.io_util import file_sha256

REPO = Path(__file__).resolve().parents[2]
FLAGS = dict(image_size=16, in_channels=2, num_channels=8, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=1, diffusion_steps=30, num_classes=2, class_cond=True)


def _run_dir(tmp_path: Path, with_cal: bool = True) -> tuple[Path, torch.nn.Module, dict]:
    """A tiny run: random model, EMA = model + 0.01 noise, saved with checkpoint.save_checkpoint."""
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**FLAGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    flags = {**FLAGS}
    config = {"model": model_config(flags),
              "diffusion": {k: flags.get(k, v) for k, v in diffusion_defaults().items()},
              "train": {"data_dir": "synthetic", "batch_size": 4, "lr": 1e-4, "max_steps": 7}}
    run = tmp_path / "run"
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_checkpoint(str(run), 7, model, {"0.9999": ema}, opt, {"config": config})
    if with_cal:
        cal = Calibration(thr_01=0.9, n_min=1, accuracy=0.9, q=0.05, diff_min=[0.1, 0.1], diff_max=[0.5, 0.6],
                          n_val=10, n_healthy=5, n_unhealthy=5, w=2.0, forward_steps=5, modality=[0, 1])
        save_calibrations(str(run / "calibration.json"), {2.0: cal})
    return run, model, ema


def _out(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 16, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([3, 11]), y=torch.tensor([0, 1]))


def test_export_reload_bit_identical(tmp_path):
    run, model, ema = _run_dir(tmp_path)
    metrics = tmp_path / "metrics.json"
    ema_file = run / "ema_0.9999_000007.pt"  # --metrics must come from the exported weights (issue 24)
    metrics.write_text(json.dumps({"mixed": {"dice": 0.25, "auroc": 0.9}, "primary_setting": "w=2",
                                   "run": {"checkpoint": str(ema_file),
                                           "checkpoint_sha256": file_sha256(str(ema_file))}}))
    out = tmp_path / "export"
    export_run(str(run), str(out), metrics=str(metrics))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "calibration.json", "config.json",
                                                     "model.safetensors"]
    loaded, diffusion, cal = load_pretrained(str(out))
    ref, _ = create_model_and_diffusion(**FLAGS)
    ref.load_state_dict({**model.state_dict(), **ema})
    ref.eval()
    assert torch.equal(_out(loaded), _out(ref))  # EMA weights, bit-identical outputs
    model.eval()
    assert not torch.equal(_out(loaded), _out(model))  # and not the raw weights
    assert diffusion.num_timesteps == 30 and set(cal) == {2.0} and cal[2.0].thr_01 == 0.9
    card = (out / "README.md").read_text()
    assert "unet_ver=v2" in card and "step 7" in card and "| 0.2500 |" in card and "0.9000" in card
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weights"]["kind"] == "ema" and cfg["model"] == model_config(FLAGS)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_run(str(run), str(out))
    export_run(str(run), str(out), weights="model", overwrite=True)
    raw, _, _ = load_pretrained(str(out))
    assert torch.equal(_out(raw), _out(model))


def test_tampered_config_and_weights_are_refused(tmp_path):
    run, _, _ = _run_dir(tmp_path, with_cal=False)
    out = tmp_path / "export"
    export_run(str(run), str(out))
    assert load_pretrained(str(out))[2] is None
    cfg_path = out / "config.json"
    good = json.loads(cfg_path.read_text())
    bad = json.loads(json.dumps(good))
    bad["model"]["num_channels"] = 16
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"does not fit the model of its config.json: .* mis-shaped") as e:
        load_pretrained(str(out))
    assert "\n" not in str(e.value)
    bad = json.loads(json.dumps(good))
    bad["weights"]["sha256"] = "0" * 64
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="sha256"):
        load_pretrained(str(out))
    bad = json.loads(json.dumps(good))
    bad["model"]["channel_mult"] = "1,2"  # not a resolved model config
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="channel_mult must be a list of numbers"):
        load_pretrained(str(out))
    bad["model"]["channel_mult"] = [1.0, 2.0]
    bad["model"]["class_cond"] = True  # a flag, not a key of the resolved model config
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="round-trip"):
        load_pretrained(str(out))
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_pretrained(str(run))


def test_export_script_cli(tmp_path, capsys):
    run, _, _ = _run_dir(tmp_path)
    from guided_diffusion.cli import run_cli
    from guided_diffusion.export.export import main

    out = tmp_path / "e"
    trained_by = "python scripts/train.py --data_dir D --seed 3"
    assert run_cli(main, [str(run), "--out", str(out), "--rate", "0.9999", "--trained_by", trained_by]) == 0
    assert "exported ema weights of step 7" in capsys.readouterr().out
    made = json.loads((out / "config.json").read_text())["provenance"]
    assert made == {"trained_by": trained_by,
                    "exported_by": f"python scripts/export_model.py {run} --out {out} --rate 0.9999"}
    card = (out / "README.md").read_text()
    assert f"Trained by:\n\n```bash\n{trained_by}\n```" in card and made["exported_by"] in card
    assert load_pretrained(str(out))[0] is not None  # the provenance record does not disturb loading
    assert run_cli(main, [str(run), "--out", str(tmp_path / "f"), "--rate", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no EMA checkpoint with rate 0.5") and err.count("\n") == 1


def test_export_of_a_real_training_run(tmp_path):
    """scripts/train.py saves the config export reads: the export reproduces the EMA checkpoint exactly."""
    from fake_data import write_fake_brats

    from guided_diffusion.training.run import main as train_main

    data = write_fake_brats(tmp_path / "data")
    log = tmp_path / "log"
    assert train_main(["--data_dir", str(data), "--log_dir", str(log), "--image_size", "16",
                       "--num_channels", "8", "--in_channels", "2", "--num_classes", "2",
                       "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "1",
                       "--num_res_blocks", "1", "--diffusion_steps", "40", "--batch_size", "4",
                       "--max_steps", "2", "--save_interval", "2", "--log_interval", "1",
                       "--num_workers", "0", "--lr", "1e-3"]) == 0
    export_run(str(log), str(tmp_path / "export"))
    loaded, diffusion, _ = load_pretrained(str(tmp_path / "export"))
    flags = {**FLAGS, "num_channels": 8, "diffusion_steps": 40}
    ref, _ = create_model_and_diffusion(**flags)
    checkpoint.load_model_checkpoint(ref, checkpoint.find_checkpoint(str(log), ema_rate="0.9999"))
    ref.eval()
    assert torch.equal(_out(loaded), _out(ref)) and diffusion.num_timesteps == 40


def test_bad_export_inputs_write_nothing(tmp_path):
    run, _, _ = _run_dir(tmp_path, with_cal=False)
    out = tmp_path / "export"
    with pytest.raises(FileNotFoundError, match="--calibration"):
        export_run(str(run), str(out), calibration=str(tmp_path / "missing.json"))
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="--metrics .* not valid JSON"):
        export_run(str(run), str(out), metrics=str(tmp_path / "m.json"))
    assert not out.exists()


def test_monai_and_safetensors_are_pinned_and_imported_lazily():
    """Both are pinned in requirements.txt (installed by the Quickstart) and only imported when used."""
    import subprocess
    import sys

    reqs = (REPO / "requirements.txt").read_text().splitlines()
    assert "monai==1.6.1" in reqs and "safetensors==0.8.0" in reqs
    code = ("import sys, guided_diffusion, guided_diffusion.anofpdm.translation, "
            "guided_diffusion.export.export, guided_diffusion.export.export_load, "
            "guided_diffusion.metrics.volume_metrics, guided_diffusion.metrics.volume_outputs; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'safetensors'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
