"""checkpoint.py: save/list/find/load with clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.training import checkpoint
from guided_diffusion.utils import logger

REPO = Path(__file__).resolve().parents[2]


def _save(tmp_path, step, model=None, rates=("0.9999",)):
    model = model or torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = {r: {n: p.detach() + 1 for n, p in model.named_parameters()} for r in rates}
    return checkpoint.save_checkpoint(str(tmp_path), step, model, ema, opt,
                                      {"config": {"model": {"num_channels": 3}}})


def test_save_writes_four_kinds_and_state_last(tmp_path):
    paths = _save(tmp_path, 50000)
    names = [Path(p).name for p in paths]
    assert names == ["model050000.pt", "ema_0.9999_050000.pt", "opt050000.pt", "state050000.pt"]
    sd = torch.load(tmp_path / "ema_0.9999_050000.pt", weights_only=True)
    assert set(sd) == {"weight", "bias"}  # plain state dict (upstream-compatible)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind
    ck = checkpoint.load_training_checkpoint(str(tmp_path), 50000)
    assert ck.state["config"]["model"]["num_channels"] == 3 and set(ck.ema) == {"0.9999"}


def test_list_ignores_incomplete_steps(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    (tmp_path / "state000020.pt").unlink()  # killed before the state file: incomplete
    assert checkpoint.list_checkpoints(str(tmp_path)) == [10]
    assert checkpoint.list_model_steps(str(tmp_path)) == [10, 20]
    assert checkpoint.latest_complete_checkpoint(str(tmp_path)).step == 10
    assert checkpoint.latest_complete_checkpoint(str(tmp_path / "nothing")) is None


def test_find_checkpoint_paths_and_unpadded_steps(tmp_path):
    _save(tmp_path, 5000, rates=("0.9999", "0.999"))
    _save(tmp_path, 50000, rates=("0.9999",))
    d = str(tmp_path)
    assert checkpoint.find_checkpoint(d).endswith("model050000.pt")
    assert checkpoint.find_checkpoint(d, step=50000).endswith("model050000.pt")
    assert checkpoint.find_checkpoint(d, step="050000").endswith("model050000.pt")
    assert checkpoint.find_checkpoint(d, step=5000, ema_rate=0.999).endswith("ema_0.999_005000.pt")
    assert checkpoint.find_checkpoint(d, ema_rate="0.9999").endswith("ema_0.9999_050000.pt")
    assert checkpoint.find_checkpoint(d, ema_rate="0.999").endswith("ema_0.999_005000.pt")


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.find_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"no checkpoints .* in {tmp_path}"):
        checkpoint.find_checkpoint(str(tmp_path))
    _save(tmp_path, 100)
    _save(tmp_path, 200)
    with pytest.raises(FileNotFoundError, match="steps present: 100, 200"):
        checkpoint.find_checkpoint(str(tmp_path), step=300)
    with pytest.raises(FileNotFoundError, match="EMA rates present: 0.9999"):
        checkpoint.find_checkpoint(str(tmp_path), step=100, ema_rate=0.999)
    with pytest.raises(ValueError, match="not an integer"):
        checkpoint.find_checkpoint(str(tmp_path), step="latest")


def test_upstream_directory_without_state_files(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "ema_0.9999_210000.pt")
    path = checkpoint.find_checkpoint(str(tmp_path), ema_rate=0.9999)
    other = torch.nn.Linear(3, 2)
    checkpoint.load_model_checkpoint(other, path)
    assert torch.equal(other.weight, model.weight)
    assert checkpoint.list_checkpoints(str(tmp_path)) == []


def test_truncated_file_is_a_value_error_naming_it(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    f = tmp_path / "opt000002.pt"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ValueError, match="opt000002.pt: truncated or not a checkpoint"):
        checkpoint.load_state_dict_file(str(f))
    with pytest.raises(ValueError, match="opt000002.pt"):
        checkpoint.load_training_checkpoint(str(tmp_path), 2)
    logger.configure(str(tmp_path / "log"), ["log"])
    assert checkpoint.latest_complete_checkpoint(str(tmp_path)).step == 1
    assert "step 2" in (tmp_path / "log" / "log.txt").read_text()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        checkpoint.load_model_checkpoint(torch.nn.Linear(3, 2), str(tmp_path / "junk.pt"))


def _unet(num_channels):
    flags = {**su.model_and_diffusion_defaults(), "image_size": 16, "num_channels": num_channels,
             "in_channels": 1, "channel_mult": "1,2", "attention_resolutions": "8", "num_heads": 1,
             "num_res_blocks": 1, "num_classes": 2, "class_cond": True}
    return su.create_model_and_diffusion(**flags)[0], su.model_config(flags)


def test_mismatched_model_names_file_keys_and_flags(tmp_path):
    small, small_cfg = _unet(32)
    checkpoint.save_checkpoint(str(tmp_path), 7, small, {}, torch.optim.SGD(small.parameters(), lr=0.1),
                               {"config": {"model": small_cfg}})
    big, big_cfg = _unet(64)
    with pytest.raises(ValueError) as err:
        checkpoint.load_model_checkpoint(big, str(tmp_path / "model000007.pt"), config=big_cfg)
    msg = str(err.value)
    assert "model000007.pt" in msg and "mis-shaped" in msg
    assert "num_channels: saved 32, now 64" in msg
    with pytest.raises(ValueError, match="the run was trained with: .*'num_channels': 32"):
        checkpoint.load_model_checkpoint(big, str(tmp_path / "model000007.pt"))


def test_remove_stale_temp_files_keeps_live_and_real_files(tmp_path):
    """Temp files of dead writers are removed; those of a live process and real checkpoints stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model000004.pt.tmp-{dead_pid}-ab12cd34"
    live = tmp_path / f".opt000004.pt.tmp-{os.getpid()}-00ff00ff"
    real = tmp_path / "model000002.pt"
    for path in (stale, live, real):
        path.write_bytes(b"x")
    removed = checkpoint.remove_stale_temp_files(str(tmp_path))
    assert removed == [stale.name]
    assert not stale.exists() and live.exists() and real.exists()


@pytest.mark.parametrize("fail_at", ["opt", "state"])
def test_failed_save_leaves_no_partial_step(tmp_path, monkeypatch, fail_at):
    """Issue 8 §5 (disk full): ENOSPC while step 20 is written -> OSError naming the step and the kept
    step 10; every file of step 20 and the temp files of its atomic writes are removed."""
    import errno

    _save(tmp_path, 10)
    real_bytes, real_save = checkpoint.atomic_write_bytes, checkpoint.atomic_save

    def full(data_or_obj, path, real):
        if Path(path).name.startswith(fail_at):
            Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}-0badc0de").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data_or_obj, path)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", lambda d, p: full(d, p, real_bytes))
    monkeypatch.setattr(checkpoint, "atomic_save", lambda o, p: full(o, p, real_save))
    with pytest.raises(OSError, match=r"step 20 .*No space left.*last complete checkpoint is step 10"):
        _save(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir() if "000020" in p.name) == []
    assert checkpoint.list_checkpoints(tmp_path) == [10] and checkpoint.list_model_steps(tmp_path) == [10]
    assert checkpoint.load_training_checkpoint(str(tmp_path), 10).step == 10
