"""Train the noise-aware classifier of the classifier-guided DDIM baseline (Wolleb et al. 2022).

Single process (CPU or one GPU). Every step: x_t = q_sample(x_0, t) at uniform random t, cross-entropy
of the classifier's logits against the image-level labels (0 healthy, 1 unhealthy) of the train split.
Defaults are upstream's ``config/run_train_brats_clf.sh`` classifier (width 128, depth 2, attention
pooling, ResBlock up/down, scale-shift norm). Writes ``classifier_{step:06d}.pt`` (state dict, atomic)
and ``classifier_config.json`` to --log_dir, and a ``step loss acc`` line every --log_interval steps.
"""


from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from guided_diffusion.baselines.classifier import classifier_defaults, classifier_loss, create_classifier
from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.base import require, require_finite
from guided_diffusion.data.brats import get_train_loader
from guided_diffusion.script_util import add_dict_to_argparser, create_gaussian_diffusion
from guided_diffusion.utils.io_util import atomic_torch_save, atomic_write_json


def train_classifier_defaults() -> dict[str, Any]:
    """Classifier, diffusion and loop flags (guided-diffusion names)."""
    return dict(classifier_defaults(), data_dir="", log_dir="", diffusion_steps=1000, noise_schedule="linear",
                noised=True, lr=3e-4, weight_decay=0.05, batch_size=4, max_steps=1000, log_interval=100,
                save_interval=1000, seed=0, num_workers=0, device="")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, train_classifier_defaults())
    return parser


def check_options(o: Mapping[str, Any]) -> None:
    """ValueError naming the flag for a value the training loop cannot run with (``o``: the parsed flags as
    a dict); --log_dir must not hold the checkpoints of an earlier run (they would be written over)."""
    for flag in ("max_steps", "batch_size", "log_interval", "save_interval", "diffusion_steps"):
        require(o[flag] >= 1, f"--{flag} must be >= 1, got {o[flag]}")
    require(o["num_workers"] >= 0, f"--num_workers must be >= 0, got {o['num_workers']}")
    require(o["seed"] >= 0, f"--seed must be >= 0, got {o['seed']}")
    require_finite("lr", o["lr"])
    require(o["lr"] > 0, f"--lr must be > 0, got {o['lr']}")
    require_finite("weight_decay", o["weight_decay"], 0.0)
    try:
        torch.device(o["device"] or "cpu")
    except RuntimeError:
        raise ValueError(f"--device {o['device']!r}: expected cpu, cuda or cuda:N (empty: cuda when "
                         "available)") from None
    out = Path(o["log_dir"])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--log_dir {out} is a file; expected a folder")
    held = sorted(p.name for p in out.glob("classifier_*.pt"))
    if held:
        raise FileExistsError(f"--log_dir {out} already holds classifier checkpoints ({', '.join(held[:3])}"
                              f"{', ...' if len(held) > 3 else ''}); pass a new --log_dir")


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if not args.data_dir or not args.log_dir:
        raise ValueError("--data_dir and --log_dir are required (a preprocessed dataset and an output "
                         "folder)")
    check_options(vars(args))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model_flags = {k: getattr(args, k) for k in classifier_defaults()}
    model = create_classifier(**model_flags).to(device)
    diffusion = create_gaussian_diffusion(steps=args.diffusion_steps, noise_schedule=args.noise_schedule)
    loader, sampler = get_train_loader(args.data_dir, args.batch_size, seed=args.seed,
                                       in_channels=args.in_channels, mixed=True, ret_lab=True,
                                       num_workers=args.num_workers, world_size=1, rank=0,
                                       image_size=args.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out = Path(args.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dict(model_flags, diffusion_steps=args.diffusion_steps,
                           noise_schedule=args.noise_schedule), str(out / "classifier_config.json"))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    step, epoch = 0, 0
    while step < args.max_steps:
        sampler.set_epoch(epoch)
        for x, cond in loader:
            terms = classifier_loss(model, diffusion, x.to(device), cond["y"].to(device), generator=gen,
                                    noised=args.noised)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            if step % args.log_interval == 0 or step == args.max_steps:
                print(f"step {step} loss {float(terms['loss'].detach()):.4f} acc {float(terms['acc']):.3f}",
                      flush=True)
            if step % args.save_interval == 0 or step == args.max_steps:
                atomic_torch_save(model.state_dict(), str(out / f"classifier_{step:06d}.pt"))
            if step >= args.max_steps:
                break
        epoch += 1
    return 0
