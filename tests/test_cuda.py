"""CUDA checks (``pytest -m cuda``; skipped cleanly without a CUDA device, see tests/conftest.py).

* fp16 (autocast + GradScaler) and bf16 (autocast) training steps on CUDA for v2 and hae_v2;
* AnoFPDM forward-process steps on CUDA (fp32 and bf16 autocast), and without any host-device
  synchronisation in the step loop (sync debug mode "error");
* CPU vs CUDA agreement of the forward-process statistics and the anomaly map, fp32 with TF32 off.
  Tolerance: the two devices use different convolution / matmul kernels, so every network call differs
  by float32 rounding (~1e-6 relative); the DDIM inversion carries these differences through the steps.
  Over 8 steps we require the statistics (mse_h, mse_null, div) within rtol 1e-3 and the anomaly map
  within 1e-3 x its maximum, and >= 99 % identical mask pixels (a pixel exactly at the per-sample
  threshold may flip). A real device bug (wrong noise, wrong index, dtype loss) changes these by > 1 %.
* single-rank NCCL process group: init, all-reduce, destroy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from pathlib import Path

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.utils import logger

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
             attention_resolutions="16", num_heads=2, use_scale_shift_norm=True, class_cond=True,
             num_classes=2, in_channels=4, dropout=0.1)


def build(ver: str, device: torch.device = DEVICE, perturb: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = su.create_model(unet_ver=ver, **FLAGS)
    if perturb:  # non-zero output convs, so that every block shows up in the outputs
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(0.03 * torch.randn(p.shape, generator=g))
    return model.to(device)


def batch(n: int = 4, device: torch.device = DEVICE):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 4, 32, 32, generator=g) * 2 - 1
    return x.to(device), (torch.arange(n) % 2).to(device)


@contextlib.contextmanager
def no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("ver", ["v2", "hae_v2"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_step(ver, precision, tmp_path):
    from guided_diffusion.training.train_util import TrainLoop

    model = build(ver, perturb=False)
    logger.configure(str(tmp_path), ["log"])
    loop = TrainLoop(model=model, diffusion=su.create_gaussian_diffusion(steps=100), data=None, batch_size=4,
                     lr=1e-3, ema_rate="0.9", max_steps=3, precision=precision, label_dropout=0.1,
                     resume="never", log_dir=str(tmp_path))
    assert loop.device.type == "cuda"
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    x, y = batch()
    losses = []
    for _ in range(3):
        loop.run_step((x, {"y": y}))
        losses.append(float(logger.dumpkvs()["loss"]))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses), losses
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    if precision == "fp16":
        assert loop.scaler is not None and loop.scaler.get_scale() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_process_on_cuda(precision):
    from guided_diffusion.anofpdm.forward import run_forward_process

    model = build("hae_v2").eval()
    x, _ = batch()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        fr = run_forward_process(model, su.create_gaussian_diffusion(steps=1000), x, ws=[1.0, 2.0],
                                 modality=[0, 3], forward_steps=5,
                                 generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert fr.mse_h.shape == (4, 2, 5, 2) and fr.mse_h.device.type == "cuda"
    for t in (fr.mse_h, fr.mse_null, fr.div):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("ver", ["v2", "hae_v2"])
def test_forward_process_steps_do_not_synchronise(ver):
    """torch.cuda.set_sync_debug_mode("error") raises on any host-device synchronisation (``.item()``,
    ``.cpu()``, a value-dependent Python branch): the step loop must run without one (issue 11)."""
    from guided_diffusion.anofpdm.forward import run_forward_process

    model = build(ver).eval()
    x, _ = batch()
    diffusion = su.create_gaussian_diffusion(steps=1000, timestep_respacing="100")
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    kw = dict(ws=[1.0, 2.0], modality=[0, 3], forward_steps=4, generator=gens)
    run_forward_process(model, diffusion, x, **kw)  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fr = run_forward_process(model, diffusion, x, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(fr.div).all()


@pytest.mark.parametrize("ver", ["v2", "hae_v2"])
def test_cpu_and_cuda_anomaly_maps_agree(ver):
    from guided_diffusion.anofpdm.forward import run_forward_process
    from guided_diffusion.anofpdm.segmentation import segment

    diffusion = su.create_gaussian_diffusion(steps=1000)
    results = {}
    with no_tf32():
        for device in (torch.device("cpu"), DEVICE):
            model = build(ver, device).eval()
            x, _ = batch(device=device)
            fr = run_forward_process(model, diffusion, x, ws=[2.0], modality=[0, 3], forward_steps=8,
                                     generator=[torch.Generator().manual_seed(10 + i) for i in range(4)])
            results[device.type] = fr
    cpu, gpu = results["cpu"], results["cuda"]
    for name in ("mse_h", "mse_null", "div"):
        a, b = getattr(cpu, name), getattr(gpu, name).cpu()
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (name, float((a - b).abs().max()))
    diff_max = cpu.div[:, 0].amax(dim=(0, 1)).clamp_min(1e-6)
    seg_cpu = segment(cpu, w=2.0, thr_01=0.5, diff_max=diff_max)
    assert torch.equal(cpu.end_step, gpu.end_step.cpu())
    gpu = dataclasses.replace(gpu, mse_h=gpu.mse_h.cpu(), mse_null=gpu.mse_null.cpu(), div=gpu.div.cpu(),
                              end_step=gpu.end_step.cpu(), agg={k: v.cpu() for k, v in gpu.agg.items()})
    seg_gpu = segment(gpu, w=2.0, thr_01=0.5, diff_max=diff_max)
    a, b = seg_cpu.anomaly_map.float(), seg_gpu.anomaly_map.float()
    assert float((a - b).abs().max()) <= 1e-3 * max(float(a.abs().max()), 1e-6)
    assert float((seg_cpu.mask == seg_gpu.mask).float().mean()) >= 0.99


def test_nccl_single_rank_process_group():
    import torch.distributed as dist

    from guided_diffusion.utils.dist_util import find_free_port

    if not dist.is_nccl_available():
        pytest.fail("this torch build has no NCCL backend")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port())}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60),
                                device_id=torch.device("cuda", 0))
        t = torch.arange(4.0, device=DEVICE)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0] and dist.get_backend() == "nccl"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
