"""Training as a library: ``train(args)`` builds the model, diffusion and data and runs ``TrainLoop``.

The entry points (``scripts/train.py``, ``scripts/train_hae_v2.py``) only parse flags and call
``main`` through ``guided_diffusion.cli.run_cli``, which turns expected errors into one line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from . import dist_util, logger
from .script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    model_config,
)

SYNTHETIC_HINT = "python scripts/make_synthetic_brats.py --out DIR"
DESCRIPTION = """Train a (classifier-free guided) diffusion model on preprocessed BraTS/ATLAS slices.

Runs as a single process (CPU or one GPU), under ``torchrun --nproc-per-node N`` or ``mpiexec -n N``.
Logs and checkpoints go to ``--log_dir`` / ``$OPENAI_LOGDIR``; ``--resume auto`` (default) continues
from the newest complete checkpoint found there.
"""


def train_defaults() -> dict[str, Any]:
    """Training flags (anofpdm_spec.md §4.1) besides the model/diffusion flags."""
    return dict(
        data_dir="",
        log_dir="",
        image_dir="",
        name="brats",
        mixed=True,
        ret_lab=True,
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=100,
        save_interval=100,
        resume_checkpoint="",
        resume="auto",
        precision="",
        grad_clip=0.0,
        n_unhealthy_patients=-1,
        n_healthy_patients=-1,
        total_epochs=1000,
        max_steps=0,
        threshold=-1.0,
        seed=0,
        num_workers=2,
        preview_steps=50,
        noise_type="gaussian",
        ddpm_sampling=False,
    )


def build_arg_parser() -> argparse.ArgumentParser:
    """All flags: model/diffusion defaults, the training flags, --sample_shape and --w."""
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dict_to_argparser(parser, {**model_and_diffusion_defaults(), **train_defaults()})
    for action in parser._actions:
        if action.dest == "precision":
            action.help = "fp32 | bf16 | fp16 (empty: fp16 if --use_fp16 else fp32)"
        elif action.dest == "resume":
            action.help = "auto: continue from the newest complete checkpoint in the log dir; never: restart"
        elif action.dest == "threshold":
            action.help = "label-dropout probability during training (<= 0: off)"
        elif action.dest == "noise_type":
            action.choices = ["gaussian"]
    parser.add_argument("--sample_shape", type=int, nargs="*", default=[],
                        help="N C H W of preview samples at each save (empty: no previews)")
    parser.add_argument("--w", type=float, nargs="*", default=[],
                        help="guidance strengths for the previews (empty or -1: no guidance)")
    return parser


def _resolve_precision(args: argparse.Namespace) -> str:
    if args.precision:
        if args.use_fp16 and args.precision != "fp16":
            raise ValueError(f"--use_fp16 True conflicts with --precision {args.precision}; pass only one")
        return args.precision
    return "fp16" if args.use_fp16 else "fp32"


def _validate(args: argparse.Namespace) -> None:
    if not args.data_dir:
        raise ValueError("--data_dir is required (preprocessed data root); for a small synthetic dataset "
                         f"run `{SYNTHETIC_HINT}`")
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(
            f"--data_dir {args.data_dir} does not exist; preprocess BraTS with scripts/preprocess.py or "
            f"build a synthetic dataset with `{SYNTHETIC_HINT}`"
        )
    if args.sample_shape:
        if len(args.sample_shape) != 4 or min(args.sample_shape) <= 0:
            raise ValueError(f"--sample_shape {args.sample_shape}: expected 4 positive integers N C H W "
                             f"(e.g. 12 {args.in_channels} {args.image_size} {args.image_size}) or nothing")
        if args.sample_shape[1] != args.in_channels:
            raise ValueError(f"--sample_shape channel count {args.sample_shape[1]} must equal --in_channels "
                             f"{args.in_channels}")
        if args.sample_shape[2:] != [args.image_size, args.image_size]:
            raise ValueError(f"--sample_shape size {args.sample_shape[2:]} must be --image_size "
                             f"{args.image_size} x {args.image_size}")
    if args.num_classes and not args.ret_lab:
        raise ValueError("a class-conditional model (--num_classes > 0) needs labels: pass --ret_lab True, "
                         "or --num_classes 0 for an unconditional model")


def _preview_diffusion(args: argparse.Namespace) -> Any:
    flags = {k: getattr(args, k) for k in diffusion_defaults() if k != "timestep_respacing"}
    flags["steps"] = flags.pop("diffusion_steps")
    n = min(args.preview_steps, args.diffusion_steps)
    try:
        return create_gaussian_diffusion(**flags, timestep_respacing=f"ddim{n}")
    except ValueError:  # no exact DDIM stride: evenly spaced steps instead
        return create_gaussian_diffusion(**flags, timestep_respacing=str(n))


def train(args: argparse.Namespace) -> None:
    """Build everything from parsed flags and run the training loop."""
    args = argparse.Namespace(**vars(args))  # never mutate the caller's namespace
    precision = _resolve_precision(args)
    _validate(args)
    from .data.brats import get_train_loader
    from .io_util import atomic_write_bytes
    from .resample import create_named_schedule_sampler
    from .train_util import TrainLoop, image_grid_png, seed_everything

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    log_dir = logger.get_dir()
    image_dir = args.image_dir or os.path.join(log_dir, "images")
    args.class_cond = bool(args.num_classes and args.num_classes > 0)
    if not args.class_cond:
        args.num_classes = 0
    if args.class_cond and args.threshold <= 0:
        logger.warn("--threshold <= 0: the null condition is never trained, so classifier-free guidance "
                    "will not work (the paper uses --threshold 0.1)")
    seed_everything(args.seed)  # same initial weights on every rank

    logger.log("creating model and diffusion...")
    md_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**md_flags)
    model.to(dist_util.dev())
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"unet_ver {args.unet_ver}: {n_params:,} parameters ({n_params / 1024 ** 2:.2f} M)")
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = get_train_loader(
        args.data_dir,
        args.batch_size,
        seed=args.seed,
        in_channels=args.in_channels,
        mixed=args.mixed,
        ret_lab=args.ret_lab,
        num_workers=args.num_workers,
        n_unhealthy_patients=args.n_unhealthy_patients,
        n_healthy_patients=args.n_healthy_patients,
    )
    loader = data[0] if isinstance(data, tuple) else data
    first = loader.dataset[0][0]  # read one slice here so that a bad file fails with a plain message
    if first.shape[0] != args.in_channels:
        raise ValueError(f"the training data in {args.data_dir} has {first.shape[0]} channels but "
                         f"--in_channels is {args.in_channels}; pass --in_channels {first.shape[0]}")
    logger.log(f"{len(loader.dataset)} training slices, {len(loader)} batches per epoch per rank")

    preview_shape = args.sample_shape or None
    if preview_shape and dist_util.is_main_process():
        x0 = next(iter(loader))[0][: preview_shape[0]]
        atomic_write_bytes(image_grid_png(x0.float()), os.path.join(image_dir, f"real_{args.name}_train.png"))

    train_flags = {k: getattr(args, k) for k in train_defaults()}
    train_flags.update(sample_shape=args.sample_shape, w=args.w, precision=precision)
    config = {
        "model": model_config(md_flags),
        "diffusion": {k: md_flags[k] for k in diffusion_defaults()},
        "train": train_flags,
    }
    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        resume=args.resume,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        schedule_sampler=schedule_sampler,
        label_dropout=args.threshold,
        grad_clip=args.grad_clip,
        precision=precision,
        max_steps=args.max_steps,
        total_epochs=args.total_epochs,
        seed=args.seed,
        config=config,
        log_dir=log_dir,
        image_dir=image_dir,
        preview_shape=preview_shape,
        preview_w=args.w,
        preview_diffusion=_preview_diffusion(args) if preview_shape else None,
        ddpm_preview=args.ddpm_sampling,
        num_classes=args.num_classes or None,
    ).run_loop()
    logger.log("done")
    dist_util.cleanup()


_UNSET = object()
HAE_V2_FORCED: dict[str, Any] = {"unet_ver": "hae_v2"}


def parse_args(
    argv: Sequence[str] | None = None, forced: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """Parse the training flags; ``forced`` (flag -> value, e.g. {"unet_ver": "hae_v2"} for a wrapper
    script) fixes flags: passing one of them with another value is refused."""
    parser = build_arg_parser()
    forced = dict(forced or {})
    unknown = [k for k in forced if parser.get_default(k) is None and k not in ("w", "sample_shape")]
    if unknown:
        raise KeyError(f"forced flag {unknown[0]!r} is not a training flag")
    parser.set_defaults(**{k: _UNSET for k in forced})
    args = parser.parse_args(None if argv is None else list(argv))
    for key, value in forced.items():
        given = getattr(args, key)
        if given is not _UNSET and given != value:
            raise ValueError(f"--{key} {given} contradicts this script, which always trains --{key} {value}; "
                             f"drop --{key} or use scripts/train.py")
        setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None, forced: Mapping[str, Any] | None = None) -> int:
    """Parse ``argv`` and train; errors propagate (``cli.run_cli`` prints expected ones as one line)."""
    train(parse_args(argv, forced))
    return 0


def hae_v2_summary(args: argparse.Namespace) -> str:
    """One line with the HAE V2 settings and the parameter counts of the model the flags build
    (built on the meta device: no memory used)."""
    import torch

    from .hae_blocks import HybridCNNTransformerBlockBase, check_bottleneck_ratio

    check_bottleneck_ratio(args.bottleneck_ratio)
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags["class_cond"] = bool(flags.get("num_classes") and flags["num_classes"] > 0)
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    total = sum(p.numel() for p in model.parameters())
    hybrid = sum(p.numel() for m in model.modules() if isinstance(m, HybridCNNTransformerBlockBase)
                 for p in m.parameters())
    return (f"HAE V2: unet_ver={flags['unet_ver']} use_hae={flags['use_hae']} "
            f"bottleneck_ratio={flags['bottleneck_ratio']} parameters={total:,} ({total / 1e6:.2f} M; "
            f"hybrid blocks {hybrid:,})")


def main_hae_v2(argv: Sequence[str] | None = None) -> int:
    """``main`` with ``--unet_ver hae_v2`` fixed; prints the HAE V2 settings before training."""
    args = parse_args(argv, HAE_V2_FORCED)
    print(hae_v2_summary(args), flush=True)
    train(args)
    return 0
