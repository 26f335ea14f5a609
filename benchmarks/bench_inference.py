#!/usr/bin/env python
"""Inference cost of the AnoFPDM forward process: faithful batched calls vs the upstream call pattern.

Modes (same model, same inputs, same noise; anofpdm.run_forward_process):
  faithful         call_pattern="batched": ONE network call per step on 2B samples (conditional + null),
                   the null prediction reused for the UGP and the DDIM inversion; streaming statistics.
  upstream         call_pattern="upstream": 4 calls per step on B samples (conditional, null, UGP, inversion;
                   3 at the last step) and the float32 x̂ stacks [B, S, M, H, W] kept, as upstream does.
                   Same x̂ sequences as faithful (checked: max |ΔM_t| is reported).
  legacy           call_pattern="batched", legacy_indexing=True: upstream's off-by-one inversion, one call
                   per step on 3B samples (this step's two predictions + the next step's inversion).
  upstream_legacy  (optional) the upstream pattern with legacy indexing (upstream's exact schedule).
  bf16, fp16       (optional) faithful with the network under autocast (statistics stay fp32).
  compile          (optional) faithful with the network wrapped by torch.compile (eager fallback logged), in
                   the mode translation uses (precision.compile_mode: CUDA graphs on CUDA).
  bf16_compile     (optional) both: bf16 autocast and torch.compile (the fast evaluation setting).
  early_stop       (optional) faithful with early_stop_patience=--patience (changes results; see
                   run_forward_process). Every mode is compared with faithful (fp32 eager, full run):
                   max |ΔM_t|, the fraction of identical end steps t_e, and the fraction of identical
                   mask pixels: segmentation.segment's ungated mask for w, with diff_max taken from the
                   faithful run (max_t M_t per modality) as a stand-in calibration shared by every mode.

Timing: the modes alternate within every repetition (rotated order), after one short warm-up per mode
(its seconds, compilation included, are "warmup_s"); the median wall time per slice (= run time / batch) is
reported, with the speed-up relative to upstream. With --json the file is rewritten after every repetition
("complete": false, "repeats_done"), so a run stopped by a time limit keeps what it measured.

Peak memory above what is allocated before the forward process (the model weights and the input):
  * CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before, in
    the main process (max over the repetitions);
  * CPU: in a fresh subprocess per mode (so modes cannot inherit each other's heap), after a 1-step
    warm-up: the peak resident set size VmHWM (reset through /proc/self/clear_refs) minus VmRSS before the
    run, with glibc told to serve large blocks by mmap and not to cache freed memory
    (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), so the RSS follows the live tensors. Where
    clear_refs is not writable the value is NaN.
The CPU memory runs use ``--memory_steps`` (default: --forward_steps) steps: upstream's stacks grow linearly
with S while the activations of one call do not, so at small S the faithful mode's single 2B-sample call
can peak higher than upstream's B-sample calls; at the paper's S = 600 the stacks dominate.
"state MiB" is the deterministic size of the tensors the forward process keeps (ForwardResult.state_bytes).

Usage:
    python benchmarks/bench_inference.py --config small --threads 2 --json bench_inference.json
    python benchmarks/bench_inference.py --config brats --device cuda --batch 16 --forward_steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.anofpdm.segmentation import segment
from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.measure import device_description
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.utils.io_util import atomic_write_json
from guided_diffusion.utils.precision import compile_mode, maybe_compile

CONFIGS: dict[str, dict[str, Any]] = {
    # the paper's BraTS network (docs/method.md, 'Paper configuration'), 128 px, 1000 linear steps
    "brats": dict(
        image_size=128,
        num_channels=128,
        num_res_blocks=2,
        channel_mult="",
        attention_resolutions="32,16,8",
        num_heads=4,
        in_channels=4,
        num_classes=2,
        class_cond=True,
        diffusion_steps=1000,
        noise_schedule="linear",
    ),
    # a small network for quick CPU runs (~1-2 min on 2 idle threads with the defaults), 32 px
    "small": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2,2",
        attention_resolutions="8",
        num_heads=4,
        in_channels=4,
        num_classes=2,
        class_cond=True,
        diffusion_steps=1000,
        noise_schedule="linear",
    ),
    # a toy network for tests
    "tiny": dict(
        image_size=16,
        num_channels=16,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=1,
        in_channels=4,
        num_classes=2,
        class_cond=True,
        diffusion_steps=50,
        noise_schedule="linear",
    ),
}
DEFAULTS = {  # batch, forward_steps
    "brats": (8, 100),
    "small": (4, 30),
    "tiny": (2, 3),
}
MODES: dict[str, dict[str, Any]] = {
    "faithful": dict(call_pattern="batched", legacy_indexing=False),
    "upstream": dict(call_pattern="upstream", legacy_indexing=False),
    "legacy": dict(call_pattern="batched", legacy_indexing=True),
    "upstream_legacy": dict(call_pattern="upstream", legacy_indexing=True),
    "bf16": dict(call_pattern="batched", legacy_indexing=False, precision="bf16"),
    "fp16": dict(call_pattern="batched", legacy_indexing=False, precision="fp16"),
    "compile": dict(call_pattern="batched", legacy_indexing=False, compile=True),
    "bf16_compile": dict(call_pattern="batched", legacy_indexing=False, precision="bf16", compile=True),
    "early_stop": dict(call_pattern="batched", legacy_indexing=False, early_stop=True),
}
REFERENCE = "faithful"
BASELINE = "upstream"
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MODALITY = [0, 3]
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated - memory_allocated before the run (max over repeats)"
CPU_MEMORY_METHOD = (
    "fresh subprocess per mode after a 1-step warm-up: VmHWM (reset via /proc/self/clear_refs) - VmRSS "
    "before the run; glibc mmap threshold 64 KiB, no trimming cache"
)
W = 2.0


# ----------------------------------------------------------------------------------------------- setup
def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """(model in eval mode, diffusion, x0 [B, 4, H, W] in [-1, 1]) — identical in every process."""
    torch.manual_seed(0)
    flags = {**CONFIGS[args.config], "unet_ver": args.unet_ver}
    model, diffusion = create_model_and_diffusion(**flags)
    with torch.no_grad():  # random output layers (not zero-initialised) so eps_y != eps_null
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.to(args.device).eval()
    size, ch = flags["image_size"], flags["in_channels"]
    x0 = torch.rand(args.batch, ch, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return model, diffusion, x0.to(args.device)


def run_mode(model, diffusion, x0: torch.Tensor, mode: str, steps: int, patience: int = 10, compiled=None):
    """One forward process of ``mode`` over x0 -> ForwardResult (``compiled``: the compiled model)."""
    kw = dict(MODES[mode])
    net = compiled if kw.pop("compile", False) and compiled is not None else model
    if kw.pop("early_stop", False):
        kw["early_stop_patience"] = patience
    return run_forward_process(
        net,
        diffusion,
        x0,
        ws=[W],
        modality=MODALITY,
        forward_steps=steps,
        generator=torch.Generator().manual_seed(3),
        **kw,
    )


def masks(fr, ref) -> torch.Tensor:
    """Ungated AnoFPDM masks [B, 1, H, W] of ``fr`` for w = W, calibrated by the reference run ``ref``
    (diff_max = its max_t M_t per modality; the same stand-in calibration for every mode)."""
    diff_max = ref.div[:, 0].amax(dim=(0, 1)).float().cpu().clamp(min=1e-12)
    return segment(fr, thr_01=1.0, diff_max=diff_max, w=W).mask_all


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field} line (CPU peak memory needs Linux)")
    return int(found.group(1))


def cpu_peak_child(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: peak RSS (MiB) of one forward process of ``args.child_mode``."""
    model, diffusion, x0 = build(args)
    wants_compile = bool(MODES[args.child_mode].get("compile"))
    compiled = maybe_compile(model, wants_compile, mode=compile_mode(args.device),
                             log=lambda m: print(m, file=sys.stderr))
    # warm-up: thread pools, lazy initialisation
    run_mode(model, diffusion, x0, args.child_mode, 1, args.patience, compiled)
    try:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except (OSError, RuntimeError):
        return {"mode": args.child_mode, "peak_mib": math.nan}
    run_mode(model, diffusion, x0, args.child_mode, args.forward_steps, args.patience, compiled)
    return {"mode": args.child_mode, "peak_mib": max(0, _status_kib("VmHWM") - base) / 1024}


def cpu_peak(args: argparse.Namespace, mode: str) -> float:
    """Run cpu_peak_child for ``mode`` in a subprocess -> peak MiB."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--config",
        args.config,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--forward_steps",
        str(args.memory_steps),
        "--threads",
        str(args.threads),
        "--unet_ver",
        args.unet_ver,
        "--patience",
        str(args.patience),
        "--child_mode",
        mode,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV}, timeout=args.child_timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for mode {mode} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


# ----------------------------------------------------------------------------------------------- benchmark
def benchmark(args: argparse.Namespace,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time (alternating modes) and memory of every mode -> results dict (see module docstring).

    ``on_progress`` gets the results so far after every repetition ("complete": False; CPU memory is
    measured only at the end), so a run stopped by a time limit keeps what it measured."""
    model, diffusion, x0 = build(args)
    wants_compile = any(MODES[m].get("compile") for m in args.modes)
    compiled = maybe_compile(model, wants_compile, mode=compile_mode(args.device),
                             log=lambda m: print(m, file=sys.stderr))
    cuda = args.device.startswith("cuda")
    stats: dict[str, dict[str, Any]] = {}
    results = {}
    for mode in args.modes:  # warm-up: thread pools, lazy initialisation (and compilation)
        t0 = time.perf_counter()
        run_mode(model, diffusion, x0, mode, min(2, args.forward_steps), args.patience, compiled)
        sync(args.device)
        stats[mode] = {**MODES[mode], "times_s": [], "peaks_mib": [], "warmup_s": time.perf_counter() - t0}
    for rep in range(args.repeats):
        order = args.modes[rep % len(args.modes) :] + args.modes[: rep % len(args.modes)]
        for mode in order:
            if cuda:
                sync(args.device)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(args.device)
            t0 = time.perf_counter()
            fr = run_mode(model, diffusion, x0, mode, args.forward_steps, args.patience, compiled)
            sync(args.device)
            stats[mode]["times_s"].append(time.perf_counter() - t0)
            if cuda:
                stats[mode]["peaks_mib"].append((torch.cuda.max_memory_allocated() - base) / 2**20)
            print(f"{mode}: {stats[mode]['times_s'][-1]:.2f} s", file=sys.stderr, flush=True)
            if mode not in results:  # the per-mode constants, from the first timed run
                results[mode] = fr
                stats[mode].update(
                    calls_per_step=fr.calls / args.forward_steps,
                    samples_per_step=sum(fr.samples_per_call) / args.forward_steps,
                    state_mib=fr.state_bytes() / 2**20,
                    steps_run=fr.steps_run,
                )
            del fr
        if on_progress is not None and rep + 1 < args.repeats:
            on_progress(summarise(args, stats, results, rep + 1, final=False))
    return summarise(args, stats, results, args.repeats, final=True)


def summarise(args: argparse.Namespace, stats: dict[str, dict[str, Any]], results: dict[str, Any],
              repeats_done: int, final: bool) -> dict[str, Any]:
    """The results dict from the timings of the first ``repeats_done`` repetitions (``stats`` is
    completed in place); CPU memory subprocesses run only when ``final``."""
    cuda = args.device.startswith("cuda")
    for mode in args.modes:
        s = stats[mode]
        s["s_per_slice"] = statistics.median(s["times_s"]) / args.batch
        if cuda:
            s["peak_mib"] = max(s["peaks_mib"])
        elif args.skip_memory or not final:
            s["peak_mib"] = math.nan
        else:
            s["peak_mib"] = cpu_peak(args, mode)
    if REFERENCE in results:
        ref = results[REFERENCE]
        ref_mask = masks(ref, ref)
        for mode, fr in results.items():
            stats[mode]["max_abs_div_diff_vs_faithful"] = float((fr.div - ref.div).abs().max())
            stats[mode]["same_end_step_fraction"] = float((fr.end_step == ref.end_step).float().mean())
            stats[mode]["same_mask_pixel_fraction"] = float((masks(fr, ref) == ref_mask).float().mean())
            stats[mode]["speedup_vs_faithful"] = stats[REFERENCE]["s_per_slice"] / stats[mode]["s_per_slice"]
    out: dict[str, Any] = {
        "config": args.config,
        "model_flags": {**CONFIGS[args.config], "unet_ver": args.unet_ver},
        "device": args.device,
        "device_name": device_description(args.device),
        "threads": args.threads,
        "patience": args.patience,
        "batch": args.batch,
        "forward_steps": args.forward_steps,
        "memory_steps": args.forward_steps if cuda else args.memory_steps,
        "repeats": args.repeats,
        "repeats_done": repeats_done,
        "complete": final,
        "w": W,
        "modality": MODALITY,
        "torch": torch.__version__,
        "memory_method": CUDA_MEMORY_METHOD if cuda else CPU_MEMORY_METHOD,
        "modes": stats,
    }
    if BASELINE in stats:
        base = stats[BASELINE]
        for s in stats.values():
            s["speedup_vs_upstream"] = base["s_per_slice"] / s["s_per_slice"]
            s["memory_ratio_vs_upstream"] = (
                s["peak_mib"] / base["peak_mib"] if base["peak_mib"] and base["peak_mib"] > 0 else math.nan
            )
        if "faithful" in results:
            diff = (results["faithful"].div - results[BASELINE].div).abs().max()
            out["max_abs_div_diff_faithful_vs_upstream"] = float(diff)
    return out


def table(res: dict[str, Any]) -> str:
    """Plain-text table of the modes (speed-up and memory ratio relative to upstream)."""
    head = (
        f"{'mode':<16}{'calls/step':>11}{'samples/step':>13}{'s/slice':>10}{'speed-up':>10}"
        f"{'peak MiB':>10}{'mem ratio':>10}{'state MiB':>11}"
        f"{'x faithful':>11}{'max|dM_t|':>11}{'same t_e':>9}{'same mask':>10}"
    )
    lines = [head, "-" * len(head)]
    for mode, s in res["modes"].items():
        lines.append(
            f"{mode:<16}{s['calls_per_step']:>11.2f}{s['samples_per_step']:>13.1f}{s['s_per_slice']:>10.4f}"
            f"{s.get('speedup_vs_upstream', math.nan):>9.2f}x{s['peak_mib']:>10.1f}"
            f"{s.get('memory_ratio_vs_upstream', math.nan):>10.2f}{s['state_mib']:>11.2f}"
            f"{s.get('speedup_vs_faithful', math.nan):>10.2f}x"
            f"{s.get('max_abs_div_diff_vs_faithful', math.nan):>11.2e}"
            f"{s.get('same_end_step_fraction', math.nan):>9.3f}"
            f"{s.get('same_mask_pixel_fraction', math.nan):>10.4f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch", type=int, default=None, help="slices per forward process (default per config)")
    p.add_argument("--forward_steps", type=int, default=None, help="S (default per config; the paper: 600)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per mode (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--unet_ver", default="v2", help="v2 (FPDM UNet) or an HAE variant (hae_v2, ...)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["faithful", "upstream", "legacy"])
    p.add_argument("--patience", type=int, default=10, help="early_stop mode: steps past the maximum")
    p.add_argument("--skip_memory", action="store_true", help="CPU: skip the per-mode memory subprocesses")
    p.add_argument(
        "--memory_steps",
        type=int,
        default=None,
        help="CPU: forward steps of the memory subprocesses (default --forward_steps); upstream's stacks "
        "grow with S while the activations do not, so the memory ratio depends on it",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file (atomically)")
    p.add_argument("--child_timeout", type=int, default=900)
    p.add_argument("--child_mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch, steps = DEFAULTS[args.config]
    args.batch = args.batch or batch
    args.forward_steps = args.forward_steps or steps
    args.memory_steps = args.memory_steps or args.forward_steps
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.repeats < 1 or args.batch < 1 or args.forward_steps < 1:
        raise ValueError("--repeats, --batch and --forward_steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_mode is not None:
        print(json.dumps(cpu_peak_child(args)))
        return None
    res = benchmark(args, on_progress=(lambda r: atomic_write_json(r, args.json)) if args.json else None)
    print(
        f"AnoFPDM forward process: config {res['config']} ({res['device_name']}, {args.threads} threads), "
        f"batch {args.batch}, {args.forward_steps} steps, {args.repeats} repeats, unet {args.unet_ver}"
    )
    print(table(res))
    if "max_abs_div_diff_faithful_vs_upstream" in res:
        print(f"max |M_t(faithful) - M_t(upstream)| = {res['max_abs_div_diff_faithful_vs_upstream']:.3g}")
    print(f"peak memory ({res['memory_steps']} steps): {res['memory_method']}")
    if args.json:
        atomic_write_json(res, args.json)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
