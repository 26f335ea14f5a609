#!/usr/bin/env python
"""Time and memory of the FPDM UNet (v2) and the HAE variants (hae, hae_lite, hae_v2).

* Time: forward (eval, no grad) and forward+backward (train mode) per model; the models are
  alternated round-robin within every repetition; median of ``--reps`` after ``--warmup``.
* Peak memory above the weights (and above the gradient buffers, which are allocated before the
  measurement): on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step; on
  CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
  step, measured in a fresh subprocess per model and mode, with glibc returning large blocks to the OS
  (MALLOC_MMAP_THRESHOLD_) so that the RSS follows the allocator.
* A scaling table of one HAE V2 MSTB alone (forward+backward time and peak memory) at 16², 32², 64²,
  128² maps, with the attention-score counts of the spatial-reduction attention vs dense attention.

Usage:
    python benchmarks/bench_models.py --config small --threads 2 [--json out.json]
    python benchmarks/bench_models.py --config brats --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guided_diffusion.registry import variant_options
from guided_diffusion.script_util import create_model

MODELS = ("v2", "hae", "hae_lite", "hae_v2")
CONFIGS: dict[str, dict[str, Any]] = {
    # the BraTS training network (docs/method.md, 'Network'), 128 px
    "brats": dict(image_size=128, num_channels=128, num_res_blocks=2, channel_mult="1,1,2,3,4",
                  attention_resolutions="32,16,8", num_heads=4, use_scale_shift_norm=True, dropout=0.1,
                  class_cond=True, num_classes=2, in_channels=4, learn_sigma=False, use_hae=True),
    # a small network for quick CPU runs, 64 px
    "small": dict(image_size=64, num_channels=32, num_res_blocks=2, channel_mult="1,2,4,8",
                  attention_resolutions="16,8", num_heads=4, use_scale_shift_norm=True, dropout=0.1,
                  class_cond=True, num_classes=2, in_channels=4, learn_sigma=False, use_hae=True),
}
DEFAULT_BATCH = {"brats": 1, "small": 2}
MSTB_CHANNELS = 128
MSTB_SIDES = (16, 32, 64, 128)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ----------------------------------------------------------------------------------------------- helpers
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; CPU memory measurement needs Linux")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(name: str, config: str, device: str, bottleneck_ratio: float = 0.25) -> nn.Module:
    torch.manual_seed(0)
    # bottleneck_ratio is an option of the variants declaring it (hae_v2); the others refuse a non-default
    own = {"bottleneck_ratio": bottleneck_ratio} if "bottleneck_ratio" in variant_options(name) else {}
    model = create_model(unet_ver=name, **own, **CONFIGS[config]).to(device)
    # give the zero-initialised convs weights so that the backward pass does all its work
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and not mod.weight.any():
            nn.init.normal_(mod.weight, std=1e-3)
    return model


def make_inputs(config: str, batch: int, device: str) -> dict[str, torch.Tensor]:
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.arange(batch) % 2
    return {"x": x.to(device), "timesteps": t.to(device), "y": y.to(device)}


def forward(model: nn.Module, inp: dict[str, torch.Tensor], device: str, precision: str) -> None:
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        model(inp["x"], inp["timesteps"], y=inp["y"])


def forward_backward(model: nn.Module, inp: dict[str, torch.Tensor], device: str, precision: str) -> None:
    model.train()
    with autocast(device, precision):
        out = model(inp["x"], inp["timesteps"], y=inp["y"], threshold=0.1)
        loss = out.float().square().mean()
    loss.backward()


def allocate_grads(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def peak_memory_mib(step, device: str) -> float:
    """Peak memory (MiB) of ``step()`` above what is allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        base = _status_kib("VmRSS")
        _reset_peak_rss()
    except (OSError, RuntimeError):                  # no /proc/self/clear_refs (non-Linux, some sandboxes)
        step()
        return float("nan")
    step()
    return max(0, _status_kib("VmHWM") - base) / 1024


# ------------------------------------------------------------------------------------------------ timing
def time_models(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    models = {name: build_model(name, args.config, args.device, args.bottleneck_ratio)
              for name in args.models}
    inp = make_inputs(args.config, args.batch, args.device)
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in models}
    for rep in range(args.warmup + args.reps):
        for name, model in models.items():              # round-robin: every model once per repetition
            for mode, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
                model.zero_grad(set_to_none=True)
                sync(args.device)
                t0 = clock()
                fn(model, inp, args.device, args.precision)
                sync(args.device)
                if rep >= args.warmup:
                    times[name][mode].append(clock() - t0)
    return {n: {m: statistics.median(v) for m, v in d.items()} for n, d in times.items()}


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside a fresh process: peak memory of one model and mode."""
    name, mode = args.child_model, args.child_mode
    model = build_model(name, args.config, args.device, args.bottleneck_ratio)
    allocate_grads(model)
    inp = make_inputs(args.config, args.batch, args.device)
    fn = forward if mode == "fwd" else forward_backward
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak = peak_memory_mib(lambda: fn(model, inp, args.device, args.precision), args.device)
    return {"model": name, "mode": mode, "peak_above_weights_mib": peak, "weights_mib": weights_mib}


def mstb_child(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs inside a fresh process: one HAE V2 MSTB alone at several map sizes."""
    from guided_diffusion.unet_hae_v2 import MultiScaleSparseTransformerBlockV2

    torch.manual_seed(0)
    block = MultiScaleSparseTransformerBlockV2(MSTB_CHANNELS, args.bottleneck_ratio, dropout=0.0)
    block = block.to(args.device)
    allocate_grads(block)
    rows = []
    for side in args.mstb_sides:
        z = torch.randn(1, MSTB_CHANNELS, side, side, device=args.device, requires_grad=True)

        def step(z=z):
            with autocast(args.device, args.precision):
                out = block(z)
            out.float().square().mean().backward()

        step()                                            # warm-up
        z.grad = None
        mem = peak_memory_mib(step, args.device)
        samples = []
        for _ in range(args.mstb_reps):
            z.grad = None
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            samples.append(time.perf_counter() - t0)
        hw = side * side
        regional = sum(math.ceil(side / p) ** 2 for p in block.patch_sizes)
        rows.append({"side": side, "tokens": hw, "regional_tokens": regional,
                     "fwd_bwd_s": statistics.median(samples), "peak_mib": mem,
                     "scores_sparse": hw * regional, "scores_dense": hw * hw})
        del z
    return rows


def run_child(args: argparse.Namespace, extra: list[str]) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--device", args.device,
           "--precision", args.precision, "--batch", str(args.batch), "--threads", str(args.threads),
           "--bottleneck_ratio", str(args.bottleneck_ratio), *extra]
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_top_ops(args: argparse.Namespace, names: tuple[str, ...] = ("v2", "hae_v2"),
                    top: int = 15) -> str:
    """torch.profiler table (self CPU time) of one forward+backward of each model."""
    from torch.profiler import ProfilerActivity, profile

    inp = make_inputs(args.config, args.batch, args.device)
    parts = []
    for name in names:
        model = build_model(name, args.config, args.device, args.bottleneck_ratio)
        forward_backward(model, inp, args.device, args.precision)
        model.zero_grad(set_to_none=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            forward_backward(model, inp, args.device, args.precision)
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        parts.append(f"-- {name}: top {top} ops by self time (one forward+backward)\n"
                     + prof.key_averages().table(sort_by=key, row_limit=top))
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: brats 1, small 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock, or process CPU time (steadier on a shared CPU; CPU device only)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--bottleneck_ratio", type=float, default=0.25)
    p.add_argument("--mstb_sides", type=int, nargs="*", default=list(MSTB_SIDES),
                   help="map sides for the MSTB scaling table (empty: skip it)")
    p.add_argument("--mstb_reps", type=int, default=3)
    p.add_argument("--skip_memory", action="store_true", help="skip the per-model memory subprocesses")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops for v2 and hae_v2")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--child_timeout", type=int, default=600)
    p.add_argument("--child_model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_mstb", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.config]
    if args.batch < 1 or args.reps < 1 or args.threads < 1:
        p.error("--batch, --reps and --threads must be >= 1")
    if args.device == "cuda" and args.timer == "cpu":
        p.error("--timer cpu measures host CPU time; use --timer wall with --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available; use --device cpu")
    return args


def ratio_table(times: dict[str, dict[str, float]], mem: dict[str, dict[str, float]]) -> str:
    head = (f"{'model':<9} {'fwd ms':>9} {'x v2':>6} {'fwd+bwd ms':>11} {'x v2':>6} "
            f"{'fwd mem MiB':>12} {'x v2':>6} {'f+b mem MiB':>12} {'x v2':>6}")
    lines = [head, "-" * len(head)]
    base_t = times.get("v2")
    base_m = mem.get("v2")
    for name, t in times.items():
        m = mem.get(name, {})

        def rel(value, base, key):
            return f"{value / base[key]:>6.2f}" if base and base.get(key) else f"{'-':>6}"

        lines.append(
            f"{name:<9} {1e3 * t['fwd']:>9.1f} {rel(t['fwd'], base_t, 'fwd')} {1e3 * t['fwd_bwd']:>11.1f} "
            f"{rel(t['fwd_bwd'], base_t, 'fwd_bwd')} "
            f"{m.get('fwd', float('nan')):>12.1f} {rel(m.get('fwd', float('nan')), base_m, 'fwd')} "
            f"{m.get('fwd_bwd', float('nan')):>12.1f} "
            f"{rel(m.get('fwd_bwd', float('nan')), base_m, 'fwd_bwd')}"
        )
    return "\n".join(lines)


def mstb_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'map':>8} {'HW tokens':>10} {'regional':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} "
            f"{'scores sparse':>14} {'scores dense':>14} {'ratio':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['side']:>4}x{r['side']:<3} {r['tokens']:>10} {r['regional_tokens']:>9} "
            f"{1e3 * r['fwd_bwd_s']:>11.1f} "
            f"{r['peak_mib']:>9.1f} {r['scores_sparse']:>14,} {r['scores_dense']:>14,} "
            f"{r['scores_sparse'] / r['scores_dense']:>7.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_model:
        print(json.dumps(memory_child(args)))
        return {}
    if args.child_mstb:
        print(json.dumps(mstb_child(args)))
        return {}

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"== bench_models: config {args.config}, batch {args.batch}, {args.precision}, {device_name}, "
          f"reps {args.reps} (median) after {args.warmup} warm-up, round-robin, {args.timer} time")
    t0 = time.perf_counter()
    times = time_models(args)
    mem: dict[str, dict[str, float]] = {}
    weights: dict[str, float] = {}
    if not args.skip_memory:
        for name in args.models:
            mem[name] = {}
            for mode in ("fwd", "fwd_bwd"):
                if args.device == "cuda":             # the CUDA allocator's statistics are exact in-process
                    args.child_model, args.child_mode = name, mode
                    res = memory_child(args)
                    args.child_model = args.child_mode = None
                    torch.cuda.empty_cache()
                else:
                    res = run_child(args, ["--child_model", name, "--child_mode", mode])
                mem[name][mode] = res["peak_above_weights_mib"]
                weights[name] = res["weights_mib"]
    print(ratio_table(times, mem))
    how = "CUDA allocator" if args.device == "cuda" else "peak RSS delta, fresh process per model/mode"
    if args.skip_memory:
        how = "not measured (--skip_memory)"
    print(f"memory: peak above weights and gradient buffers ({how})")
    result: dict[str, Any] = {
        "config": args.config, "flags": CONFIGS[args.config], "batch": args.batch, "device": device_name,
        "precision": args.precision, "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
        "timer": args.timer,
        "time_s": times, "peak_above_weights_mib": mem, "weights_mib": weights,
    }
    if "v2" in times:
        result["ratio_to_v2"] = {
            n: {"fwd_time": times[n]["fwd"] / times["v2"]["fwd"],
                "fwd_bwd_time": times[n]["fwd_bwd"] / times["v2"]["fwd_bwd"],
                **({"fwd_mem": mem[n]["fwd"] / mem["v2"]["fwd"],
                    "fwd_bwd_mem": mem[n]["fwd_bwd"] / mem["v2"]["fwd_bwd"]} if mem else {})}
            for n in times
        }
    if args.mstb_sides:
        rows = run_child(args, ["--child_mstb", "--mstb_sides", *map(str, args.mstb_sides),
                                "--mstb_reps", str(args.mstb_reps)])
        print(f"\n== one HAE V2 MSTB alone (C={MSTB_CHANNELS}, batch 1, forward+backward); "
              "scores = query-key pairs per head group (computed)")
        print(mstb_table(rows))
        result["mstb_scaling"] = rows
    if args.profile:
        text = profile_top_ops(args)
        print("\n" + text)
        result["profile"] = text
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        from guided_diffusion.utils.io_util import atomic_write_json

        atomic_write_json(result, args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
