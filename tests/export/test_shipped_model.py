"""The HAE V2 model shipped in models/hae_v2_synth32: its weights are the ones recorded, it loads with its
calibration, the main job's recipe flags are the ones it was trained and evaluated with, and it segments the
first test slices of the embedded dataset exactly as the README's full-test run did.

tests/fixtures/shipped_model_first16_slices.csv holds the rows of the first 16 test slices (11 healthy, 5
with a lesion) of that run's slices.csv (the README's "shipped model" tables: the full test split, every w
of the recipe's grid).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from near_golden import assert_near, csv_rows

from guided_diffusion.export.export import load_pretrained

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "hae_v2_synth32"
FIRST16 = REPO / "tests" / "fixtures" / "shipped_model_first16_slices.csv"
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
    assert calibration is not None and sorted(calibration) == config["evaluation"]["forward"]["w"]


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
    assert evaluation["forward"]["w"] == args.w  # the export was evaluated with the recipe's w grid


def _by_setting_and_index(text: str) -> list[dict]:
    return sorted(csv_rows(text), key=lambda r: (r["setting"], int(r["index"])))


def test_shipped_model_segments_the_first_test_slices_as_the_readme_run(tmp_path, run_script):
    """The export alone (its network, diffusion, forward settings and calibration) on the main job's
    embedded dataset reproduces the README run's labels, mask counts, t_e and map maxima slice by slice
    (bit for bit on the export's CPU type; floats within rounding across types, tests/near_golden.py: there
    the synthetic data differ in the last bits, so the export's calibration does not apply and the run
    calibrates on the validation split again)."""
    job = _main_job().build_parser().parse_args([])
    data, out = tmp_path / "data", tmp_path / "eval"
    run_script("scripts/make_synthetic_brats.py", "--out", data, "--subjects", job.subjects, "--seed",
               job.seed, "--image_size", job.image_size, "--slice_step", job.slice_step, "--quiet")
    run_script("scripts/translation_FPDM.py", "--model_dir", SHIPPED, "--data_dir", data, "--log_dir", out,
               "--num_slices", 16, "--progress", "False", timeout=600)
    got = _by_setting_and_index((out / "slices.csv").read_text())
    want = _by_setting_and_index(FIRST16.read_text())
    assert sum(int(r["label"]) == 1 for r in want) == 40  # 5 lesion slices × 8 w
    assert_near(got, want, "slices.csv of the shipped model")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["guidance_selection"]["chosen_w"] == 30.0  # the README's chosen w
