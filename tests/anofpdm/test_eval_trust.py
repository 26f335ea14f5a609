"""Issue 8 §2/§3/§5-7 and issue 9 on the evaluation: resume never mixes results of other settings, the
calibration is checked (settings and values) and resumable, bad input ends in one line, index.html and the
run config say what produced the results, and a saved run config re-runs to the same result."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_eval import core, make_run, run_argv, write_checkpoint

from guided_diffusion.anofpdm import translation
from guided_diffusion.cli import run_cli
from guided_diffusion.configs.calibration import load_calibrations

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished tiny run (w 1 3, t_e_ratio 1) -> (data, model dir, its log dir)."""
    root = tmp_path_factory.mktemp("trust")
    data, mdir = make_run(root)
    out = root / "base"
    translation.main(run_argv(data, mdir, out, t_e_ratio=("1",)))
    return data, mdir, out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_with_other_settings_stops_naming_them(base, tmp_path):
    data, mdir, out = base
    run = _copy_run(out, tmp_path / "r")
    argv = run_argv(data, mdir, run, t_e_ratio=("1",))
    for extra, name in ((["--median_filter", "False"], "median_filter"), (["--seed", "6"], "seed"),
                        (["--legacy_segmentation", "True"], "legacy_segmentation")):
        with pytest.raises(ValueError, match=f"{name}.*start fresh") as err:
            translation.main([*argv, "--resume", "True", *extra])
        assert "\n" not in str(err.value)
    # a new --t_e_ratio on resume: a one-line ValueError naming it, not a raw KeyError
    with pytest.raises(ValueError, match="t_e_ratio"):
        translation.main([*run_argv(data, mdir, run), "--resume", "True"])
    # unchanged settings resume without a forward pass and reproduce the metrics
    before = core(out)
    (run / "metrics.json").unlink()
    translation.main([*argv, "--resume", "True"])
    assert core(run) == before


def test_new_checkpoint_after_deleting_calibration_is_not_mixed(base, tmp_path):
    data, _, out = base
    run = _copy_run(out, tmp_path / "r")
    mdir = tmp_path / "model2"
    mdir.mkdir()
    write_checkpoint(mdir, weight_seed=7, step=20)
    (run / "calibration.json").unlink()
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        translation.main([*run_argv(data, mdir, run, t_e_ratio=("1",)), "--resume", "True"])
    # starting fresh: metrics.json names the checkpoint whose results it holds
    metrics = translation.main(run_argv(data, mdir, run, t_e_ratio=("1",)))
    assert metrics["run"]["checkpoint"].endswith("model000020.pt")
    stored = json.loads((run / "results" / "fingerprint.json").read_text())
    assert metrics["run"]["checkpoint_sha256"] == stored["checkpoint_sha256"]
    assert core(run) != core(out)


def test_resumed_calibration_mismatch_does_not_mention_an_unused_flag(base, tmp_path):
    data, mdir, out = base
    run = _copy_run(out, tmp_path / "r")
    with pytest.raises(ValueError, match="forward_steps") as err:
        translation.main([*run_argv(data, mdir, run, t_e_ratio=("1",)), "--resume", "True",
                          "--forward_steps", "4"])
    assert "--calibration" not in str(err.value) and "--log_dir" in str(err.value)


def test_calibration_checks_the_diffusion_settings(base, tmp_path):
    data, mdir, out = base
    cal = str(out / "calibration.json")
    for extra, name in ((["--timestep_respacing", "20"], "timestep_respacing"),
                        (["--noise_schedule", "cosine"], "noise_schedule"),
                        (["--modality", "0", "1"], "modality"),
                        (["--diffusion_steps", "80"], "diffusion_steps"),
                        (["--encoding", "ddpm"], "encoding"),
                        (["--image_size", "32", "--attention_resolutions", "16"], "image_size")):
        # another --image_size than the data's slices is refused earlier, at the data (issue 24.4)
        want = f"{name}: calibration .* has"
        if name == "image_size":
            want = "--image_size 32 does not match the data"
        with pytest.raises(ValueError, match=want) as err:
            translation.main([*run_argv(data, mdir, tmp_path / name), "--calibration", cal, *extra])
        assert "\n" not in str(err.value)


def test_resumed_calibration_from_another_validation_pass_is_refused(base, tmp_path):
    """--num_slices_val or --seed changed on resume: the stored calibration (made from the old validation
    pass) is not reused under the new settings' name."""
    data, mdir, out = base
    run = _copy_run(out, tmp_path / "r")
    argv = run_argv(data, mdir, run, t_e_ratio=("1",))
    for extra, name in ((["--num_slices_val", "4"], "num_slices_val"), (["--seed", "6"], "seed")):
        with pytest.raises(ValueError, match=f"another validation pass .*{name}: calibration .* has") as err:
            translation.main([*argv, "--resume", "True", *extra])
        assert "--calibration" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, shown", [
    ("thr_01", float("nan"), "thr_01"), ("thr_01", "0.5", "thr_01"),
    ("diff_max", [math.inf, 1.0], "diff_max"), ("diff_max", [-1.0, 1.0], "diff_max"),
    ("forward_steps", 0, "forward_steps"), ("accuracy", 2.0, "accuracy"),
])
def test_calibration_values_are_checked(base, tmp_path, key, value, shown):
    data = json.loads((base[2] / "calibration.json").read_text())
    data["calibrations"][0][key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path.name}.*{shown}"):
        load_calibrations(str(path))


def test_calibration_file_not_json_or_string_names_the_file(tmp_path):
    for name, text in (("broken.json", "{ not json"), ("string.json", '"abc"')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            load_calibrations(str(tmp_path / name))


def test_calibration_pass_resumes_after_a_kill(base, tmp_path, monkeypatch):
    data, mdir, out = base
    run = tmp_path / "r"
    real = translation.run_forward_process
    calls: list[int] = []

    def dies_on_second(*a, **k):
        calls.append(a[2].shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(translation, "run_forward_process", dies_on_second)
    argv = run_argv(data, mdir, run, t_e_ratio=("1",))
    with pytest.raises(KeyboardInterrupt):
        translation.main(argv)
    calls.clear()
    monkeypatch.setattr(translation, "run_forward_process", lambda *a, **k: calls.append(a[2].shape[0])
                        or real(*a, **k))
    translation.main([*argv, "--resume", "True"])
    assert calls == [4, 3, 3, 1]  # one validation batch left, then the 7 test slices
    assert core(run) == core(out)
    # other statistics settings never reuse the saved batches
    (run / "calibration.json").unlink()
    calls.clear()
    translation.main([*argv, "--forward_steps", "4", "--log_dir", str(run)])
    assert sum(calls[:2]) == 8


def test_index_html_says_what_produced_the_results(base):
    text = (base[2] / "panels" / "index.html").read_text()
    metrics = json.loads((base[2] / "metrics.json").read_text())
    sha = metrics["run"]["checkpoint_sha256"]
    assert sha in text and "model000010.pt" in text and "checkpoint step" in text and ">10<" in text
    assert f"chosen w = {metrics['guidance_selection']['chosen_w']:g}" in text
    for c in metrics["calibration"].values():
        assert f"{c['thr_01']:.6g}" in text and f"{c['diff_max'][0]:.6g}" in text
    assert "forward_steps" in text and "timestep_respacing" in text


def test_saved_run_config_reruns_to_the_same_result(base, tmp_path):
    _, _, out = base
    config = json.loads((out / "config.json").read_text())
    assert config["forward"]["w"] == [1.0, 3.0] and config["eval"]["seed"] == 5
    translation.main(["--config", str(out / "config.json"), "--log_dir", str(tmp_path / "again")])
    assert core(tmp_path / "again") == core(out)
    assert (tmp_path / "again" / "slices.csv").read_text() == (out / "slices.csv").read_text()
    rerun = json.loads((tmp_path / "again" / "config.json").read_text())
    assert rerun["eval"]["log_dir"] == str(tmp_path / "again") and rerun["forward"] == config["forward"]


def test_bad_values_end_in_one_line(base, capsys):
    data, mdir, out = base
    argv = run_argv(data, mdir, out / "never")
    for extra, expect in ((["--t_e_ratio", "0"], "--t_e_ratio must be > 0"),
                          (["--w", "-1"], "--w must be >= 0"),
                          (["--num_batches", "2"], "--num_slices"),
                          (["--num_channels", "0"], "--num_channels must be >= 1")):
        assert run_cli(translation.main, [*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


def test_entry_points_exit_2_with_one_line(tmp_path):
    for script in ("translation_FPDM.py", "select_guidance.py"):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--data_dir", str(tmp_path),
                               "--model_dir", str(tmp_path), "--w", "-1"], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "--w must be >= 0" in lines[0], proc.stderr


def test_help_lists_only_meaningful_flags():
    text = translation.create_argparser().format_help()
    for gone in ("--null", "--use_weighted_sampler", "--image_dir", "--num_batches", "--d_reverse",
                 "--dropout", "--use_fp16", "--resblock_updown", "--use_new_attention_order", "--class_cond",
                 "--use_kl"):
        assert gone + " " not in text and gone + "\n" not in text, gone
    for kept in ("--w", "--t_e_ratio", "--timestep_respacing", "--config", "--resume", "--calibration"):
        assert kept in text
    # upstream spellings still parse (mapped, or ignored with a warning)
    run = translation.parse_args(["--data_dir", "d", "--model_dir", "m", "--w", "1", "--d_reverse", "False",
                                  "--dropout", "0.1", "--image_dir", "x"])
    assert run.forward.encoding == "ddpm"


def test_old_calibration_file_still_loads_with_one_warning(base, tmp_path):
    data, mdir, out = base
    old = json.loads((out / "calibration.json").read_text())
    for entry in old["calibrations"]:
        entry.pop("settings")  # files written before the typed configs hold only the forward settings
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="timestep_respacing"):
        metrics = translation.main([*run_argv(data, mdir, tmp_path / "o", t_e_ratio=("1",)),
                                    "--calibration", str(path)])
    assert metrics["primary_setting"] == core(out)["primary_setting"]
    assert core(tmp_path / "o")["settings_results"] == core(out)["settings_results"]
    assert (tmp_path / "o" / "slices.csv").read_text() == (out / "slices.csv").read_text()


def test_panels_say_why_a_predicted_unhealthy_mask_is_empty(base, tmp_path):
    """index.html captions each panel; an empty mask of a slice predicted unhealthy names its cause: the
    size filter (pixels above the threshold, all in small components) or no pixel above the threshold."""
    import csv
    import re

    data, mdir, out = base
    cal = json.loads((out / "calibration.json").read_text())
    for entry in cal["calibrations"]:
        entry["thr_01"] = 0.999999  # every slice's cosine is below: all predicted unhealthy
    cal_path = tmp_path / "cal.json"
    cal_path.write_text(json.dumps(cal))
    log = tmp_path / "panels_run"
    argv = run_argv(data, mdir, log, w=("1",), t_e_ratio=("1",))
    argv[argv.index("--num_panels") + 1] = "7"
    translation.main([*argv, "--calibration", str(cal_path), "--min_cc_size", "1000"])
    rows = list(csv.DictReader((log / "slices.csv").open()))
    html_text = (log / "panels" / "index.html").read_text()
    captions = re.findall(r"<br>(patient [^<]*)<br>([^<]*)</p>", html_text)
    assert len(captions) == len(rows) == 7
    reasons = {title.split(" | label")[0]: reason for title, reason in captions}
    for r in rows:
        assert r["pred_label"] == "1" and r["n_pred"] == "0"  # nothing survives a 1000 px filter
        reason = reasons[f"patient {r['patient']} | slice {r['slice']}"]
        if int(r["n_pred_raw"]) > 0:
            assert reason == ("empty mask: every component removed by the size filter "
                              "(components &lt;= 1000 px are dropped)")
        else:
            assert reason == "empty mask: no pixel of the anomaly map reached the threshold"
    assert any(int(r["n_pred_raw"]) > 0 for r in rows) and any(int(r["n_pred_raw"]) == 0 for r in rows)


def test_translation_read_only_log_dir_and_broken_calibration_end_in_one_line(base, tmp_path, capsys,
                                                                              make_read_only):
    """§5 through the entry point: a log dir that cannot be written (EROFS, simulated) names --log_dir; a
    --calibration file that is not JSON names the file; one line each, exit 2."""
    data, mdir, _ = base
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    status = run_cli(translation.main, [*run_argv(data, mdir, tmp_path / "c"), "--calibration", str(broken)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and str(broken) in err and "JSON" in err, err

    log = tmp_path / "ro"
    make_read_only(log)
    status = run_cli(translation.main, run_argv(data, mdir, log))
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"--log_dir {log} is not writable (Read-only file system)" in err, err
