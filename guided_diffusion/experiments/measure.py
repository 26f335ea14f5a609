"""Side-by-side cost of several denoisers: parameters, training-step time and peak memory, in ONE process.

Every model is built from the same model/diffusion flags (only ``unet_ver`` and a network's own options,
e.g. ``use_hae`` or ``bottleneck_ratio``, differ), takes the same batch, and one training step = diffusion
training loss (random t, label dropout) + backward + AdamW step. The models are alternated round-robin in
every repetition (so a load change on a shared machine hits all of them alike); the median step time after
``warmup`` is reported. Peak memory of one step above what was allocated before it: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set size (VmHWM, reset through
/proc/self/clear_refs; NaN where /proc does not allow it). The CPU figure needs
``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0`` (``CPU_ENV``) from the process start, so
that freed memory goes back to the OS and the RSS follows the allocator; without them glibc keeps freed
pages and later networks reuse them (measured: peaks of 40-140 MiB for networks that need 219-234), so the
CPU peak is NaN there. ``python -m guided_diffusion.experiments.measure SPEC.json OUT.json`` restarts
itself with ``CPU_ENV``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from guided_diffusion import nn as nn_util
from guided_diffusion.cli import ArgumentParser, run_cli
from guided_diffusion.resample import UniformSampler
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.utils.io_util import atomic_write_json

CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def device_description(device: str | torch.device) -> str:
    """What ran a benchmark: the GPU's name, or the CPU's model name and the SIMD level torch's kernels use
    (float results differ in the last bits between e.g. AVX-512 and AVX2 kernels)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def _status_kib(name: str) -> int:
    match = re.search(rf"^{name}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {name} line")
    return int(match.group(1))


def cpu_env_active() -> bool:
    """Whether this process has ``CPU_ENV`` in its environment (glibc reads it at the start)."""
    return all(os.environ.get(name) == value for name, value in CPU_ENV.items())


def _peak_mib(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not cpu_env_active():
        step()  # RSS would not follow the allocator: no figure rather than a wrong one
        return math.nan
    try:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, RuntimeError):
        step()
        return math.nan
    step()
    return max(0, _status_kib("VmHWM") - base) / 1024


def measure_models(
    flags: Mapping[str, Any],
    unet_vers: Sequence[str] = (),
    *,
    batch: int,
    reps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    label_dropout: float = 0.1,
    seed: int = 0,
    networks: Mapping[str, Mapping[str, Any]] | None = None,
    baseline: str | None = None,
    cpu_fused_attention: bool = False,
) -> dict[str, dict[str, float]]:
    """Measure every network side by side.

    Args:
        flags: the model/diffusion flags all networks share (``create_model_and_diffusion``'s names).
        unet_vers: networks named by their ``unet_ver`` alone (or give ``networks``, not both).
        networks: {name: the flags that make this network, ``unet_ver`` and its own options, e.g.
            {"unet_ver": "hae", "use_hae": False}}; ``flags`` updated with them builds it.
        batch: images of ``flags["image_size"]`` px per training step.
        baseline: the network the ratios are taken to (default: the first; a JSON spec written with
            sorted keys loses the order, so name it there).
        cpu_fused_attention: time the steps with attention in the fused kernel on the CPU too
            (``--cpu_fused_attention`` of training; no effect on a GPU).

    Returns {name: {"params", "step_s" (median), "peak_mib", "step_s_ratio", "peak_mib_ratio",
    "params_ratio"}}; ratios to ``baseline``.
    """

    if batch < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"batch and reps must be >= 1 and warmup >= 0, got {batch}, {reps}, {warmup}")
    if networks is not None and unet_vers:
        raise ValueError("give the networks as unet_vers or as networks, not both")
    specs = {v: {"unet_ver": v} for v in unet_vers} if networks is None else dict(networks)
    if not specs or any("unet_ver" not in spec for spec in specs.values()):
        raise ValueError(f"every network needs a unet_ver, got {specs or 'none'}")
    unet_vers = list(specs)  # the names below
    if baseline is not None and baseline not in specs:
        raise ValueError(f"baseline {baseline!r} is not one of the networks {unet_vers}")
    g = torch.Generator().manual_seed(seed)
    size, chans = int(flags["image_size"]), int(flags["in_channels"])
    x = torch.rand(batch, chans, size, size, generator=g).mul(2).sub(1).to(device)
    y = (torch.arange(batch) % 2).to(device)
    built = {}
    for ver in unet_vers:
        torch.manual_seed(seed)
        model, diffusion = create_model_and_diffusion(**{**flags, **specs[ver]})
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        built[ver] = (model, diffusion, opt, UniformSampler(diffusion))

    def step(ver: str) -> None:
        model, diffusion, opt, sampler = built[ver]
        t, _ = sampler.sample(batch, device)
        loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y, "threshold": label_dropout})
        opt.zero_grad(set_to_none=True)
        loss["loss"].mean().backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {v: [] for v in unet_vers}
    with nn_util.cpu_fused_attention(cpu_fused_attention):
        for ver in unet_vers:  # first step allocates the optimizer state: not part of the memory figure
            step(ver)
        peaks = {ver: _peak_mib(lambda v=ver: step(v), device) for ver in unet_vers}
        for rep in range(warmup + reps):
            for ver in unet_vers:
                t0 = time.perf_counter()
                step(ver)
                if rep >= warmup:
                    times[ver].append(time.perf_counter() - t0)
    base = unet_vers[0] if baseline is None else baseline
    out = {}
    for ver in unet_vers:
        params = sum(p.numel() for p in built[ver][0].parameters())
        out[ver] = {"params": params, "step_s": statistics.median(times[ver]), "peak_mib": peaks[ver]}
    for ver in unet_vers:
        for key in ("params", "step_s", "peak_mib"):
            b = out[base][key]
            out[ver][f"{key}_ratio"] = out[ver][key] / b if b and math.isfinite(b) else math.nan
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m guided_diffusion.experiments.measure SPEC OUT``: SPEC is a JSON of measure_models'
    arguments."""

    p = ArgumentParser(prog="python -m guided_diffusion.experiments.measure",
                       description="Measure the networks of a spec in this (fresh) process.")
    p.add_argument("spec", help="JSON file of measure_models' keyword arguments (+ threads)")
    p.add_argument("out", help="JSON file the measurements are written to")
    args = p.parse_args(argv)
    argv = [args.spec, args.out]
    if not cpu_env_active():  # the CPU memory figure needs CPU_ENV from the process start
        os.execve(sys.executable, [sys.executable, "-m", "guided_diffusion.experiments.measure", *argv],
                  {**os.environ, **CPU_ENV})
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(int(spec.pop("threads")))
    spec.pop("threads", None)
    atomic_write_json(measure_models(**spec), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
