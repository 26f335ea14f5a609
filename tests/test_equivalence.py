"""Process-count equivalence on CPU (gloo): training and evaluation give the same results with 1 and 2
processes.

Training (1 process vs ``torchrun --nproc-per-node 2``, global batch 4 both times, 3 steps):
    TrainLoop draws timesteps, noise and label dropout from generators seeded by (seed, rank, step), so a
    2-process run does NOT see the same noise as a 1-process run and plain runs are not comparable. The
    test therefore makes the random draws a function of the *sample* (a wrapper diffusion derives t and the
    noise of every sample from a key stored in its pixels; no dropout, no label dropout). The global batch of
    every step is the same set of samples in both runs (DistributedSampler shards the same permutation), so
    the only remaining difference is the floating-point summation order: DDP averages two half-batch means
    across ranks, one process takes one mean over the whole batch, and the convolution weight gradients sum
    over 2 instead of 4 samples. Tolerances (measured differences in the final report, far below them):
      * gradients of each step: max |g1 - g2| <= 1e-5 * max |g1| (float32 rounding is ~1e-7 relative; the
        bound leaves room for the differing reduction trees);
      * parameters after 3 AdamW steps (lr 1e-3), two tiers. Adam divides by sqrt(v) + 1e-8, so an element
        whose gradient is mathematically zero but carries rounding noise (~1e-10 here, e.g. norm layers in
        front of zero-initialised convs) takes a step of a noise-dependent size; such elements are bounded
        only by Adam's step size. Hence: elements whose gradient is >= 1e-7 (10x Adam's eps) in both runs
        at every step, or exactly 0 in both: max |p1 - p2| <= 5e-6 (measured ~4e-7); all elements:
        max |p1 - p2| <= 1e-3 = one Adam step (measured ~6e-5). A wrong shard or a missing all-reduce fails
        the gradient check; a loss scale error is invisible to Adam but fails the gradient check too.
Evaluation: metrics and calibration of ``scripts/translation_FPDM.py`` are identical (bitwise JSON) with one
plain process and with ``mpiexec -n 2``
(tests/anofpdm/test_translation.py compares torchrun 1 vs 2): every slice has
its own noise generator, seeded from (seed, split, dataset index), so sharding does not change any number.

This file is also the training worker: ``python tests/test_equivalence.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TIMEOUT = 180
GRAD_RTOL = 1e-5
PARAM_ATOL_CONDITIONED = 5e-6
PARAM_ATOL_ALL = 1e-3  # = lr: one Adam step
WELL_CONDITIONED_GRAD = 1e-7


# ------------------------------------------------------------------------------------------ training worker
class KeyedSlices(torch.utils.data.Dataset):
    """8 random 2-channel 16 px slices; pixel [0, 0, 0] holds the sample's integer key (its index)."""

    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(42)
        self.x = torch.rand(n, 2, 16, 16, generator=g) * 2 - 1
        self.x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
        self.y = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"y": self.y[i]}


class KeyedDiffusion:
    """Wraps a diffusion: every sample's timestep and noise depend only on the sample's key."""

    def __init__(self, base):
        self.base = base
        self.num_timesteps = base.num_timesteps

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, generator=None):
        keys = x_start[:, 0, 0, 0].round().long().tolist()
        t = torch.tensor([(7 * k + 3) % self.num_timesteps for k in keys], device=x_start.device)
        noise = torch.stack([torch.randn(x_start.shape[1:], generator=torch.Generator().manual_seed(1000 + k))
                             for k in keys]).to(x_start.device)
        return self.base.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)


def train_worker(out: str) -> None:
    from torch.utils.data import DataLoader, DistributedSampler

    from guided_diffusion import script_util as su
    from guided_diffusion.training.train_util import TrainLoop
    from guided_diffusion.utils import dist_util, logger

    torch.set_num_threads(1)
    dist_util.setup_dist()
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(
        image_size=16, in_channels=2, num_channels=16, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="8", num_heads=1, class_cond=True, num_classes=2, diffusion_steps=50,
        dropout=0.0)
    data = KeyedSlices()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=4 // world, sampler=sampler, drop_last=True)
    logger.configure(os.path.join(out, "log"), ["log"])
    loop = TrainLoop(model=model.to(dist_util.dev()), diffusion=KeyedDiffusion(diffusion),
                     data=(loader, sampler), batch_size=4, lr=1e-3, ema_rate="0.9", log_interval=100,
                     save_interval=100, max_steps=3, label_dropout=-1.0, resume="never", seed=0,
                     log_dir=os.path.join(out, "log"))
    grads, batches = [], []
    optimize, run_step = loop._optimize, loop.run_step

    def spy_optimize(*args) -> None:
        grads.append([p.grad.detach().clone() for p in loop.params])
        optimize(*args)

    def spy_step(batch) -> None:
        batches.append(dist_util.all_gather_object(sorted(batch[0][:, 0, 0, 0].round().long().tolist())))
        run_step(batch)

    loop._optimize, loop.run_step = spy_optimize, spy_step
    init = [p.detach().clone() for p in loop.params]
    loop.run_loop()
    if rank == 0:
        torch.save({"params": [p.detach().clone() for p in loop.params], "grads": grads, "init": init,
                    "batches": [sorted(k for part in b for k in part) for b in batches], "world": world},
                   os.path.join(out, "result.pt"))
    dist_util.cleanup()


# ---------------------------------------------------------------------------------------------- helpers
def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(
                   filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "PMI_RANK", "OMPI_COMM_WORLD_RANK", "OPENAI_LOGDIR", "TRAIN_DEBUG"):
        env.pop(key, None)
    return env


def run_all(jobs: list[tuple[list[str], str]]) -> None:
    """Run the commands concurrently (they are independent); each must exit 0 within TIMEOUT seconds."""
    procs = [(subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True), cmd, what) for cmd, what in jobs]
    try:
        for proc, cmd, what in procs:
            try:
                _, err = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what} did not finish within {TIMEOUT}s (hang?): {' '.join(cmd)}")
            assert proc.returncode == 0, f"{what} failed:\n{err[-3000:]}"
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def torchrun(nproc: int, *args: str) -> list[str]:
    from guided_diffusion.utils.dist_util import find_free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(find_free_port()), *args]


def find_mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found (the CI installs it with `pip install mpich mpi4py`)")
    return found


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_training_one_vs_two_processes(tmp_path):
    script = str(Path(__file__).resolve())
    run_all([([sys.executable, script, str(tmp_path / "one")], "1-process training"),
             (torchrun(2, script, str(tmp_path / "two")), "2-process torchrun training")])
    one = torch.load(tmp_path / "one" / "result.pt")
    two = torch.load(tmp_path / "two" / "result.pt")
    assert (one["world"], two["world"]) == (1, 2)
    assert one["batches"] == two["batches"] and len(one["batches"]) == 3  # same samples every step
    assert len(one["grads"]) == len(two["grads"]) == 3
    worst_grad = 0.0
    for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
        scale = max(float(g.abs().max()) for g in g1)
        diff = max(float((a - b).abs().max()) for a, b in zip(g1, g2))
        worst_grad = max(worst_grad, diff / scale)
        assert diff <= GRAD_RTOL * scale, f"step {step + 1}: gradients differ by {diff:.3e} ({scale=:.3e})"
    all_diff, cond_diff, n_cond = 0.0, 0.0, 0
    for i, (a, b) in enumerate(zip(one["params"], two["params"])):
        ok = torch.ones_like(a, dtype=torch.bool)
        for g1, g2 in zip(one["grads"], two["grads"]):
            both_zero = (g1[i] == 0) & (g2[i] == 0)
            ok &= both_zero | (torch.minimum(g1[i].abs(), g2[i].abs()) >= WELL_CONDITIONED_GRAD)
        diff = (a - b).abs()
        all_diff = max(all_diff, float(diff.max()))
        if ok.any():
            cond_diff = max(cond_diff, float(diff[ok].max()))
        n_cond += int(ok.sum())
    total = sum(p.numel() for p in one["params"])
    assert n_cond > total // 3, (n_cond, total)  # the sharp tier covers a good part of the network
    assert cond_diff <= PARAM_ATOL_CONDITIONED, f"well-conditioned parameters differ by {cond_diff:.3e}"
    assert all_diff <= PARAM_ATOL_ALL, f"parameters differ by {all_diff:.3e} after 3 steps"
    moved = max(float((a - b).abs().max()) for a, b in zip(one["params"], one["init"]))
    assert moved >= 1e-3, moved  # 3 Adam steps of lr 1e-3 moved the parameters
    print(f"\nmax relative gradient difference {worst_grad:.3e}; parameter difference: well-conditioned "
          f"{cond_diff:.3e} ({n_cond}/{total} elements), all {all_diff:.3e}")


def _write_split(root: Path, split: str, lesions: dict[str, list[bool]], rng: np.random.Generator) -> None:
    (root / "data_splits" / split).mkdir(parents=True, exist_ok=True)
    (root / "data_splits" / split / "scans.csv").write_text("".join(f"{p}\n" for p in lesions))
    yy, xx = np.mgrid[:16, :16]
    brain = ((yy - 7.5) / 7) ** 2 + ((xx - 7.5) / 6) ** 2 < 1
    for pid, flags in lesions.items():
        folder = root / f"npy_{split}" / f"patient_{pid}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, lesion in enumerate(flags):
            x = np.stack([brain * (0.5 + 0.1 * c + 0.05 * rng.standard_normal((16, 16))) for c in range(2)])
            y = np.zeros((1, 1, 16, 16), np.float32)
            if lesion:
                cy, cx = rng.integers(5, 10, size=2)
                y[..., cy - 2:cy + 3, cx - 2:cx + 3] = 1
                x[:, cy - 2:cy + 3, cx - 2:cx + 3] += 0.7
            np.savez(folder / f"slice_{k}.npz", x=x[None].astype(np.float32), y=y)


@pytest.mark.slow
def test_evaluation_single_process_vs_mpiexec(tmp_path):
    from guided_diffusion import script_util as su

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    _write_split(data, "val", {"V0": [False, True, True], "V1": [True, False]}, rng)
    _write_split(data, "test", {"P0": [True, False, True], "P1": [False, True]}, rng)
    flags = dict(image_size=16, in_channels=2, num_channels=16, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_heads=1, diffusion_steps=30, num_classes=2)
    torch.manual_seed(0)
    model, _ = su.create_model_and_diffusion(class_cond=True, **flags)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (tmp_path / "model").mkdir()
    torch.save(model.state_dict(), tmp_path / "model" / "model000001.pt")
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    argv += ["--data_dir", str(data), "--model_dir", str(tmp_path / "model"), "--w", "1", "3",
             "--forward_steps", "4", "--modality", "0", "1", "--batch_size", "2", "--batch_size_val", "2",
             "--seed", "5", "--progress", "False", "--num_panels", "0"]
    script = str(REPO / "scripts" / "translation_FPDM.py")
    run_all([([sys.executable, script, *argv, "--log_dir", str(tmp_path / "one")], "1-process evaluation"),
             ([find_mpiexec(), "-n", "2", sys.executable, script, *argv, "--log_dir", str(tmp_path / "mpi")],
              "mpiexec -n 2 evaluation")])
    results = {}
    for name in ("one", "mpi"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        results[name] = ({k: v for k, v in metrics.items() if k != "run" and "timing" not in k},
                         json.loads((tmp_path / name / "calibration.json").read_text()),
                         (tmp_path / name / "slices.csv").read_text())
    assert results["one"][0]["counts"]["n_slices"] == 5
    assert results["one"] == results["mpi"]
    log = (tmp_path / "mpi" / "log.txt").read_text()
    assert log.count("new slices") >= 1


if __name__ == "__main__":
    train_worker(sys.argv[1])
