#!/usr/bin/env python
"""Where the time of one AnoFPDM forward step goes: one network call on 2B samples, profiled.

The forward process makes one network call per step on 2B samples (conditional + null halves), so the
cost of that call is the cost of the method. For each network and variant this times the call (median of
``--reps`` after a warm-up), counts its floating-point operations (torch.utils.flop_counter, counted on
one image and scaled), and profiles one call with torch.profiler: the top kernels by device time and their
shares grouped by kind (convolution, matrix product, attention, normalisation, other), so a missed speed
target can be traced to what would close it.

Variants: fp32 (as evaluated; cuDNN may use TF32 for convolutions, torch's default), bf16 (autocast), and
bf16_cl (autocast with the network and input in channels_last). ``slices_per_s_at_600`` is the forward
process's rate this call allows at the paper's 600 steps (B / (600 * call time)), ignoring the statistics;
``flops_ceiling_slices_per_s_at_600_per_100tflops`` is the rate a device would give per 100 TFLOP/s it
sustained on this network, an arithmetic bound that no kernel tuning can pass.

Usage:
    python benchmarks/profile_step.py --config brats --device cuda --batch 64 --json profile_step.json
    python benchmarks/profile_step.py --config tiny --device cpu --batch 2 --reps 1
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.measure import device_description
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.utils.io_util import atomic_write_json
from guided_diffusion.utils.precision import autocast, to_channels_last


def _bench_inference_configs() -> dict[str, dict[str, Any]]:
    """bench_inference's network configurations (the same networks, read from the file beside this one)."""
    path = Path(__file__).with_name("bench_inference.py")
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIGS


CONFIGS = _bench_inference_configs()

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": dict(precision="fp32", channels_last=False),
    "bf16": dict(precision="bf16", channels_last=False),
    "bf16_cl": dict(precision="bf16", channels_last=True),
}
FORWARD_STEPS = 600
NOT_KERNELS = ("Command Buffer Full",)  # runtime markers the profiler lists beside the kernels
# kernel-name fragments -> kind (first match wins; names differ between cuDNN, cuBLAS, CUTLASS and CPU)
KINDS = (
    ("attention", ("flash", "fmha", "attention", "efficient_attention", "softmax")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "xmma_fprop", "dgrad", "wgrad", "fprop")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "addmm", "aten::mm", "bmm", "matmul")),
    ("normalisation", ("norm",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def build(config: str, ver: str, device: str, channels_last: bool) -> torch.nn.Module:
    """The network of ``config`` with small random perturbations (so no output layer stays zero)."""
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**CONFIGS[config], "unet_ver": ver})
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.to(device).eval()
    return to_channels_last(model) if channels_last else model


def inputs(config: str, batch: int, device: str, channels_last: bool) -> dict[str, torch.Tensor]:
    """One forward step's call: x [2B, C, H, W], t, y and the null flags (second half)."""
    flags = CONFIGS[config]
    n, size = 2 * batch, flags["image_size"]
    x = torch.rand(n, flags["in_channels"], size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    null = torch.arange(n, device=device) >= batch
    return dict(x=x, t=torch.full((n,), 10, device=device), y=torch.zeros(n, dtype=torch.long, device=device),
                null=null)


def flops_per_image(model: torch.nn.Module, call: dict[str, torch.Tensor]) -> int:
    one = {k: v[:1] for k, v in call.items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(one["x"], one["t"], y=one["y"], null=one["null"])
    return int(counter.get_total_flops())


def measure(args: argparse.Namespace, ver: str, variant: str) -> dict[str, Any]:
    spec = VARIANTS[variant]
    cuda = args.device.startswith("cuda")
    if cuda:  # the previous row's network is gone: start from an empty cache and a fresh peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(args.config, ver, args.device, spec["channels_last"])
    call = inputs(args.config, args.batch, args.device, spec["channels_last"])
    dev = torch.device(args.device)

    def step() -> torch.Tensor:
        with torch.no_grad(), autocast(dev, spec["precision"]):
            return model(call["x"], call["t"], y=call["y"], null=call["null"])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    if cuda:  # the kernels themselves (an operator's row would count its kernels' time a second time)
        key = lambda e: e.self_device_time_total  # noqa: E731
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and key(e) > 0
                  and e.key not in NOT_KERNELS]
    else:  # on the CPU the operators are the kernels
        key = lambda e: e.self_cpu_time_total  # noqa: E731
        events = [e for e in prof.key_averages() if key(e) > 0 and e.key.startswith(("aten::", "mkldnn"))]
    total_us = sum(key(e) for e in events) or 1.0
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + key(e) / total_us
    top = sorted(events, key=key, reverse=True)[: args.top]
    flops = flops_per_image(model, call)
    n = 2 * args.batch
    row = {
        "model": ver,
        "variant": variant,
        **spec,
        "samples_per_call": n,
        "seconds_per_call": sec,
        "images_per_s": n / sec,
        "gflops_per_image": flops / 1e9,
        "achieved_tflops": flops * n / sec / 1e12,
        "slices_per_s_at_600": args.batch / (sec * FORWARD_STEPS),
        "flops_ceiling_slices_per_s_at_600_per_100tflops": 100e12 / (flops * 2 * FORWARD_STEPS),
        "profiled_ms": total_us / 1e3,
        "share_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": e.key[:120], "ms": key(e) / 1e3, "share": key(e) / total_us,
                         "kind": kind_of(e.key), "calls": e.count} for e in top],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    return row


def attention_shapes(model: torch.nn.Module, call: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """(batch, heads, tokens, head width) of every distinct attention call of the network on ``call``."""
    shapes: set[tuple[int, int, int, int]] = set()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        b, c, *spatial = args[0].shape
        tokens = 1
        for n in spatial:
            tokens *= n
        shapes.add((b, module.num_heads, tokens, c // module.num_heads))

    blocks = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    handles = [m.register_forward_pre_hook(hook) for m in blocks]
    with torch.no_grad():
        model(call["x"], call["t"], y=call["y"], null=call["null"])
    for h in handles:
        h.remove()
    return sorted(shapes)


def attention_layouts(args: argparse.Namespace, ver: str) -> list[dict[str, Any]]:
    """Scaled dot-product attention at the network's shapes: inputs as the AttentionBlock passes them
    (transposed views of [B, heads, d, T], last dimension strided) against contiguous [B, heads, T, d]
    (the layout the fused flash / memory-efficient kernels take), in fp32 and bf16."""
    cuda = args.device.startswith("cuda")
    model = build(args.config, ver, args.device, False)
    shapes = attention_shapes(model, inputs(args.config, args.batch, args.device, False))
    del model
    rows = []
    for b, h, t, d in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            row: dict[str, Any] = dict(batch=b, heads=h, tokens=t, head_width=d, dtype=str(dtype)[6:])
            for layout in ("strided", "contiguous"):
                g = torch.Generator(device=args.device).manual_seed(0)
                shape = (b, h, d, t) if layout == "strided" else (b, h, t, d)
                q, k, v = (torch.randn(shape, generator=g, device=args.device, dtype=dtype) for _ in range(3))
                if layout == "strided":
                    q, k, v = (z.transpose(-1, -2) for z in (q, k, v))
                times = []
                for i in range(args.reps + 1):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v)
                    if cuda:
                        torch.cuda.synchronize()
                    if i:  # the first call is a warm-up
                        times.append(time.perf_counter() - t0)
                row[f"{layout}_ms"] = 1e3 * statistics.median(times)
            row["strided_over_contiguous"] = row["strided_ms"] / row["contiguous_ms"]
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="brats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64, help="slices per forward step (the call sees 2x this)")
    p.add_argument("--models", nargs="+", default=["v2", "hae_v2"])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="kernels listed per row")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--attention_layouts", action="store_true",
                   help="also time attention on strided vs contiguous inputs at the first model's shapes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("batch", "warmup", "reps", "top"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"config": args.config, "device": args.device,
                           "device_name": device_description(args.device), "torch": torch.__version__,
                           "batch": args.batch, "reps": args.reps, "rows": []}
    for ver in args.models:
        for variant in args.variants:
            row = measure(args, ver, variant)
            out["rows"].append(row)
            kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["share_by_kind"].items())
            print(f"{ver:<7} {variant:<8} {1e3 * row['seconds_per_call']:8.1f} ms/call "
                  f"{row['images_per_s']:8.1f} img/s {row['achieved_tflops']:7.1f} TFLOP/s "
                  f"{row['slices_per_s_at_600']:.3f} slices/s@600 | {kinds}", flush=True)
            if args.json:  # rewritten after every row: a run stopped by a time limit keeps what it measured
                atomic_write_json(out, str(args.json))
    if args.attention_layouts:
        out["attention_layouts"] = {ver: attention_layouts(args, ver) for ver in args.models[:1]}
        for r in out["attention_layouts"][args.models[0]]:
            shape = f"{r['batch']}x{r['heads']}x{r['tokens']}x{r['head_width']}"
            print(f"attention {shape} {r['dtype']}: strided {r['strided_ms']:.2f} ms, "
                  f"contiguous {r['contiguous_ms']:.2f} ms", flush=True)
        if args.json:
            atomic_write_json(out, str(args.json))
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
