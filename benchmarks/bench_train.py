#!/usr/bin/env python
"""Training step rate (images/s) per mode side by side, and the training loader's own rate (issue 11).

Modes: fp32 eager, bf16 autocast, channels_last, compile (torch.compile; eager fallback with one line), or
any of them joined by "+"; "+loop" times the training library's own step (TrainLoop.run_step: label dropout,
EMA, logging, host batch uploaded each step) instead of the bare loss/backward/AdamW step. For every network
of ``--models`` (unet_ver), each mode builds the same seeded network and runs ``--warmup`` then ``--steps``
timed optimiser steps (AdamW on the diffusion training loss); "x base" is images/s over the first mode of
the list for the same network ("ratio_to_fp32" is also given where fp32 is in the list). With ``--data_dir``
the training DataLoader (``get_train_loader``) is iterated without the model for ``--loader_batches``
batches first, and its images/s is printed beside the step rates, so one sees whether the loader keeps up.
The JSON is rewritten after every row, so a run stopped by a time limit keeps the rows it finished.

Usage:
    python benchmarks/bench_train.py --config small --data_dir DATA --json out.json
    python benchmarks/bench_train.py --config brats --device cuda --batch 14 --models v2,hae_v2 \
        --modes bf16,bf16+channels_last,bf16+channels_last+compile+loop
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from guided_diffusion import script_util as su
from guided_diffusion.experiments.measure import device_description
from guided_diffusion.utils.io_util import atomic_write_json
from guided_diffusion.utils.precision import autocast, maybe_compile, to_channels_last

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=16, num_channels=16, in_channels=4, channel_mult="1,2", attention_resolutions="8",
                 num_heads=1, num_res_blocks=1, diffusion_steps=40),
    "small": dict(image_size=64, num_channels=32, in_channels=4, channel_mult="1,2,4,8",
                  attention_resolutions="16,8", num_heads=4, num_res_blocks=2, diffusion_steps=1000),
    "brats": dict(image_size=128, num_channels=128, in_channels=4, channel_mult="1,1,2,3,4",
                  attention_resolutions="32,16,8", num_heads=4, num_res_blocks=2, diffusion_steps=1000),
}
MODES = ("fp32", "bf16", "channels_last", "compile")


def parse_mode(mode: str) -> dict[str, Any]:
    """'bf16+channels_last+compile' -> {precision, channels_last, compile}; ValueError on unknown parts."""
    out: dict[str, Any] = {"precision": "fp32", "channels_last": False, "compile": False, "loop": False}
    for part in mode.split("+"):
        if part in ("fp32", "bf16", "fp16"):
            out["precision"] = part
        elif part in ("channels_last", "compile", "loop"):
            out[part] = True
        else:
            raise ValueError(f"--modes: unknown part {part!r} in {mode!r}; use fp32|bf16|fp16, "
                             "channels_last, compile, loop joined by +")
    return out


def train_loop_step(model: torch.nn.Module, diffusion: Any, x: torch.Tensor, y: torch.Tensor,
                    opts: dict[str, Any], log_dir: str) -> Callable[[], torch.Tensor]:
    """One step of the training library itself (TrainLoop.run_step: label dropout 0.1, EMA 0.9999,
    logging), on the host batch ``x`` [B,C,H,W], ``y`` [B] (pinned on CUDA, as the loader gives it)."""
    from guided_diffusion.training.train_util import TrainLoop
    from guided_diffusion.utils import logger

    logger.configure(log_dir, [])
    loop = TrainLoop(model=model, diffusion=diffusion, data=[], batch_size=x.shape[0], lr=1e-4,
                     ema_rate="0.9999", label_dropout=0.1, precision=opts["precision"], resume="never",
                     max_steps=10**9, log_dir=log_dir, compile=opts["compile"],
                     channels_last=opts["channels_last"])
    if x.device.type == "cpu" and torch.cuda.is_available():
        x, y = x.pin_memory(), y.pin_memory()

    def one() -> torch.Tensor:
        loop.run_step((x, {"y": y}))
        return torch.tensor(logger.dumpkvs()["loss"])  # no outputs configured: returns and clears

    return one


def step_rate(config: str, mode: str, batch: int, steps: int, warmup: int, device: str,
              unet_ver: str = "v2") -> dict[str, Any]:
    """images/s of ``steps`` timed training steps of network ``unet_ver`` in ``mode`` (after ``warmup``)."""
    opts = parse_mode(mode)
    flags = {**su.model_and_diffusion_defaults(), **CONFIGS[config], "class_cond": True, "num_classes": 2,
             "unet_ver": unet_ver}
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**flags)
    model.to(device).train()
    size, ch = flags["image_size"], flags["in_channels"]
    if opts["loop"]:
        with tempfile.TemporaryDirectory() as log_dir:
            one = train_loop_step(model, diffusion, torch.randn(batch, ch, size, size),
                                  torch.randint(0, 2, (batch,)), opts, log_dir)
            return {"model": unet_ver, "mode": mode, **opts, **_timed(one, batch, steps, warmup, device)}
    if opts["channels_last"]:
        to_channels_last(model)
    net = maybe_compile(model, opts["compile"], log=lambda line: print(line, file=sys.stderr))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fmt = torch.channels_last if opts["channels_last"] else torch.preserve_format
    x = torch.randn(batch, ch, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def one() -> torch.Tensor:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device, generator=gen)
        opt.zero_grad(set_to_none=True)
        with autocast(device, opts["precision"]):
            losses = diffusion.training_losses(net, x, t, model_kwargs={"y": y})
        loss = losses["loss"].float().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return {"model": unet_ver, "mode": mode, **opts, **_timed(one, batch, steps, warmup, device)}


def _timed(one: Callable[[], torch.Tensor], batch: int, steps: int, warmup: int,
           device: str) -> dict[str, Any]:
    """Timings of ``steps`` calls of ``one`` (a training step returning its loss) after ``warmup`` calls."""
    cuda = torch.device(device).type == "cuda"
    t_warm = time.perf_counter()
    for _ in range(warmup):
        one()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - t_warm  # compilation included
    t0 = time.perf_counter()
    for _ in range(steps):
        last = one()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images_per_s": batch * steps / seconds,
            "step_s": seconds / steps, "warmup_s": warmup_s, "final_loss": float(last),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


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


def add_ratios(rows: list[dict[str, Any]], base_mode: str) -> None:
    """Set each row's ratio_to_base / ratio_to_fp32: images/s over the same network's ``base_mode`` / fp32
    row (None while that row is missing)."""
    rate = {(r["model"], r["mode"]): r["images_per_s"] for r in rows}
    for r in rows:
        for key, mode in (("ratio_to_base", base_mode), ("ratio_to_fp32", "fp32")):
            ref = rate.get((r["model"], mode))
            r[key] = r["images_per_s"] / ref if ref else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, e.g. fp32,bf16+channels_last; "
                   "the first is the base of the 'x base' ratio")
    p.add_argument("--models", default="v2", help="comma-separated unet_ver values, e.g. v2,hae_v2")
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
        try:
            parse_mode(m)
        except ValueError as err:
            p.error(str(err))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        p.error("--models needs at least one unet_ver")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"config": args.config, "device": args.device, "batch": args.batch,
                           "steps": args.steps, "torch": torch.__version__,
                           "device_name": device_description(args.device), "base_mode": modes[0],
                           "train": rows, "loader": None}

    def save() -> None:
        if args.json:
            atomic_write_json(out, args.json)

    if args.data_dir:
        out["loader"] = loader_rate(args.data_dir, args.batch, args.loader_batches, args.num_workers,
                                    CONFIGS[args.config]["in_channels"])
        save()
    for ver in models:
        for m in modes:
            rows.append(step_rate(args.config, m, args.batch, args.steps, args.warmup, args.device, ver))
            add_ratios(rows, modes[0])
            print(f"{ver} {m}: {rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
            save()
    print(f"{'model':<9}{'mode':<28}{'images/s':>12}{'x base':>9}{'x fp32':>9}")
    for r in rows:
        base, fp32 = (f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("ratio_to_base", "ratio_to_fp32"))
        print(f"{r['model']:<9}{r['mode']:<28}{r['images_per_s']:>12.2f}{base:>9}{fp32:>9}")
    if out["loader"]:
        print(f"{'':<9}{'loader only':<28}{out['loader']['images_per_s']:>12.2f}")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
