"""dist_util without a process group, and 2-process training under torchrun and mpiexec (gloo, CPU).

The multi-process tests are marked slow (informational only): they must run in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion.training import checkpoint
from guided_diffusion.utils import dist_util, logger

REPO = Path(__file__).resolve().parents[2]

WORKER = str(REPO / "tests" / "training" / "test_train.py")
TIMEOUT = 180


def _env() -> dict:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(
                   filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OPENAI_LOGDIR"):
        env.pop(k, None)
    return env


def test_single_process_has_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_util.launcher() == "single"
    dist_util.setup_dist()
    try:
        assert not torch.distributed.is_initialized()
        assert dist_util.get_world_size() == 1 and dist_util.get_rank() == 0 and dist_util.is_main_process()
        assert dist_util.dev().type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert dist_util.all_gather_object({"a": 1}) == [{"a": 1}]
        assert dist_util.broadcast_object(7) == 7
        p = torch.ones(3)
        dist_util.sync_params([p])
        dist_util.barrier()
        assert torch.equal(p, torch.ones(3))
    finally:
        dist_util.cleanup()


def test_launcher_detection(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PMI_RANK", "0")
    assert dist_util.launcher() == "mpi"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist_util.launcher() == "torchrun"


def test_logger_outputs_and_new_csv_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path))
    logger.configure(format_strs="log,csv")
    assert logger.get_dir() == str(tmp_path)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 3.0)
    assert logger.dumpkvs() == {"loss": 2.0}
    logger.logkv("loss", 1.5)
    logger.logkv("lr", 0.1)  # a key that appears later
    logger.dumpkvs()
    logger.log("hello", 3)
    logger.close()
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert rows == ["loss,lr", "2.0,", "1.5,0.1"]
    assert "hello 3" in (tmp_path / "log.txt").read_text()
    with pytest.raises(ValueError, match="unknown"):
        logger.configure(str(tmp_path), ["nonsense"])


def _check_synced(out: Path) -> None:
    r0 = json.loads((out / "params-rank0.json").read_text())
    r1 = json.loads((out / "params-rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 4
    assert r0["sha256"] == r1["sha256"] and r0["sum"] == r1["sum"]
    assert r0["first_batch"] != r1["first_batch"]  # each rank reads its own shard
    assert checkpoint.list_checkpoints(out) == [3, 4]
    assert (out / "log-rank001.txt").is_file() and (out / "log.txt").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(dist_util.find_free_port()), WORKER,
           str(out), "4", "3"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, timeout=TIMEOUT, cwd=REPO)
    assert res.returncode == 0, res.stderr.decode()[-4000:]
    _check_synced(out)


@pytest.mark.slow
def test_mpiexec_two_processes_stay_in_sync(tmp_path):
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.fail("mpiexec not found (install the mpich wheel: pip install mpich mpi4py)")
    out = tmp_path / "run"
    cmd = [mpiexec, "-n", "2", sys.executable, WORKER, str(out), "4", "3"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, timeout=TIMEOUT, cwd=REPO)
    assert res.returncode == 0, (res.stdout.decode()[-2000:], res.stderr.decode()[-4000:])
    _check_synced(out)
