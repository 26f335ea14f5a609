#!/usr/bin/env python
"""Training step rate (images/s) per mode side by side, and the training loader's own rate (issue 11).

Modes: fp32 eager, bf16 autocast, channels_last, compile (torch.compile; eager fallback with one line).
Each mode builds the same seeded network and runs ``--warmup`` then ``--steps`` timed optimiser steps
(AdamW on the diffusion training loss); the ratio column is images/s over fp32 eager. With ``--data_dir``
the training DataLoader (``get_train_loader``) is iterated without the model for ``--loader_batches``
batches and its images/s is printed beside the step rates, so one sees whether the loader keeps up.

Usage:
    python benchmarks/bench_train.py --config small --data_dir DATA --json out.json
    python benchmarks/bench_train.py --config brats --device cuda --modes fp32,bf16,bf16+channels_last
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from guided_diffusion import script_util as su
from guided_diffusion.io_util import atomic_write_json
from guided_diffusion.precision import autocast, maybe_compile, to_channels_last

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=16, num_channels=16, in_channels=2, channel_mult="1,2", attention_resolutions="8",
                 num_heads=1, num_res_blocks=1, diffusion_steps=40),
    "small": dict(image_size=64, num_channels=32, in_channels=4, channel_mult="1,2,4,8",
                  attention_resolutions="16,8", num_heads=4, num_res_blocks=2, diffusion_steps=1000),
    "brats": dict(image_size=128, num_channels=128, in_channels=4, channel_mult="1,1,2,3,4",
                  attention_resolutions="32,16,8", num_heads=4, num_res_blocks=2, diffusion_steps=1000),
}
MODES = ("fp32", "bf16", "channels_last", "compile")


def parse_mode(mode: str) -> dict[str, Any]:
    """'bf16+channels_last+compile' -> {precision, channels_last, compile}; ValueError on unknown parts."""
    out: dict[str, Any] = {"precision": "fp32", "channels_last": False, "compile": False}
    for part in mode.split("+"):
        if part in ("fp32", "bf16", "fp16"):
            out["precision"] = part
        elif part in ("channels_last", "compile"):
            out[part] = True
        else:
            raise ValueError(f"--modes: unknown part {part!r} in {mode!r}; use fp32|bf16|fp16, "
                             "channels_last, compile joined by +")
    return out


def step_rate(config: str, mode: str, batch: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """images/s of ``steps`` timed training steps in ``mode`` (after ``warmup`` steps)."""
    opts = parse_mode(mode)
    flags = {**su.model_and_diffusion_defaults(), **CONFIGS[config], "class_cond": True, "num_classes": 2}
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**flags)
    model.to(device).train()
    if opts["channels_last"]:
        to_channels_last(model)
    net = maybe_compile(model, opts["compile"], log=lambda line: print(line, file=sys.stderr))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fmt = torch.channels_last if opts["channels_last"] else torch.preserve_format
    size, ch = flags["image_size"], flags["in_channels"]
    x = torch.randn(batch, ch, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def one() -> float:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device, generator=gen)
        opt.zero_grad(set_to_none=True)
        with autocast(device, opts["precision"]):
            losses = diffusion.training_losses(net, x, t, model_kwargs={"y": y})
        loss = losses["loss"].float().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(warmup):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = one()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"mode": mode, **opts, "images_per_s": batch * steps / seconds, "final_loss": float(last)}


def loader_rate(data_dir: str, batch: int, n_batches: int, num_workers: int,
                in_channels: int) -> dict[str, Any]:
    """images/s of the training DataLoader alone (no model) over ``n_batches`` batches."""
    from guided_diffusion.data.brats import get_train_loader

    data = get_train_loader(data_dir, batch, in_channels=in_channels, num_workers=num_workers)
    loader = data[0] if isinstance(data, tuple) else data
    n_images, done = 0, 0
    t0 = time.perf_counter()
    while done < n_batches:
        for x, _ in loader:
            n_images, done = n_images + x.shape[0], done + 1
            if done >= n_batches:
                break
    seconds = time.perf_counter() - t0
    return {"data_dir": data_dir, "batches": done, "num_workers": num_workers,
            "images_per_s": n_images / max(seconds, 1e-9)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, e.g. fp32,bf16+channels_last")
    p.add_argument("--data_dir", default="", help="preprocessed data root for the loader-only rate")
    p.add_argument("--loader_batches", type=int, default=20)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--json", default="", help="write the results here (atomically)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1 and --warmup >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        parse_mode(m)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = [step_rate(args.config, m, args.batch, args.steps, args.warmup, args.device) for m in modes]
    base = next((r["images_per_s"] for r in rows if r["mode"] == "fp32"), None)
    for r in rows:
        r["ratio_to_fp32"] = r["images_per_s"] / base if base else None
    out: dict[str, Any] = {"config": args.config, "device": args.device, "batch": args.batch,
                           "steps": args.steps, "torch": torch.__version__, "train": rows, "loader": None}
    if args.data_dir:
        out["loader"] = loader_rate(args.data_dir, args.batch, args.loader_batches, args.num_workers,
                                    CONFIGS[args.config]["in_channels"])
    print(f"{'mode':<28}{'images/s':>12}{'x fp32':>9}")
    for r in rows:
        ratio = f"{r['ratio_to_fp32']:.2f}" if r["ratio_to_fp32"] is not None else "-"
        print(f"{r['mode']:<28}{r['images_per_s']:>12.2f}{ratio:>9}")
    if out["loader"]:
        print(f"{'loader only':<28}{out['loader']['images_per_s']:>12.2f}{'':>9}")
    if args.json:
        atomic_write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
