"""The HAE V2 model shipped in models/hae_v2_synth32: its weights are the ones recorded, it loads with its
calibration, and the main job's recipe flags are the ones it was trained and evaluated with."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from guided_diffusion.export.export import load_pretrained

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "hae_v2_synth32"
SHA256 = "3f4d1e9c13db2e8cdfc626c73a8432e2deefd6d0827ce986ff57421759ef6f54"


def _main_job():
    spec = importlib.util.spec_from_file_location("run_main_job", REPO / "scripts" / "run_main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_weights_are_the_recorded_ones():
    digest = hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()
    config = json.loads((SHIPPED / "config.json").read_text())
    assert digest == SHA256 == config["weights"]["sha256"]
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 25 * 2**20


def test_shipped_model_loads_with_its_calibration():
    model, diffusion, calibration = load_pretrained(str(SHIPPED))
    n = sum(p.numel() for p in model.parameters())
    config = json.loads((SHIPPED / "config.json").read_text())
    assert n == config["weights"]["n_parameters"] and diffusion.num_timesteps == 1000
    assert calibration is not None and len(calibration) > 0


def test_main_job_recipe_is_the_shipped_models():
    job = _main_job()
    args = job.build_parser().parse_args([])
    config = json.loads((SHIPPED / "config.json").read_text())
    assert Path(args.model).resolve() == SHIPPED.resolve()
    assert config["model"]["unet_ver"] == args.unet_ver
    assert config["model"]["num_channels"] == args.num_channels
    assert config["model"]["image_size"] == args.image_size
    assert config["model"]["channel_mult"] == [int(c) for c in args.channel_mult.split(",")]
    train = config["train"]
    assert train["max_steps"] == args.train_steps == job.RECIPE_STEPS
    assert (train["lr"], train["batch_size"], train["threshold"], train["seed"]) == (
        args.lr, args.batch_size, args.label_dropout, args.seed)
    assert train["ema_rate"] == args.ema_rate == config["weights"]["ema_rate"]
    evaluation = config["evaluation"]
    assert evaluation["forward"]["forward_steps"] == args.forward_steps
    assert evaluation["diffusion"]["timestep_respacing"] == args.timestep_respacing
