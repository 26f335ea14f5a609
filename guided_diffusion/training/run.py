"""Training as a library: ``train(model_cfg, diffusion_cfg, train_cfg)`` builds the model, diffusion and
data from typed configs and runs ``TrainLoop``; ``main(argv)`` parses the flags into those configs.

The entry points (``scripts/train.py``, ``scripts/train_hae_v2.py``) only call ``main`` through
``guided_diffusion.cli.run_cli``, which turns expected errors into one line. Every run writes its resolved
configs to ``run_config.json`` in its log dir; ``--config FILE`` runs it again (flags override values).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from guided_diffusion.configs.base import (
    DiffusionConfig,
    ModelConfig,
    save_run_config,
)
from guided_diffusion.configs.train_config import TrainConfig
from guided_diffusion.data.brats import get_train_loader
from guided_diffusion.hae_blocks import HybridCNNTransformerBlockBase, check_bottleneck_ratio
from guided_diffusion.nn import count_parameters, cpu_fused_attention, format_param_count
from guided_diffusion.reporting.previews import image_grid_png
from guided_diffusion.reporting.training_plots import ScalarWriter, write_loss_curves_png
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import create_from_configs, create_gaussian_diffusion, model_config
from guided_diffusion.simplex import simplex_noise_like
from guided_diffusion.training.rng import seed_everything
from guided_diffusion.training.train_resume import data_record
from guided_diffusion.training.train_util import TrainLoop
from guided_diffusion.training.training_flags import parse_configs_for_training
from guided_diffusion.utils import dist_util, logger
from guided_diffusion.utils.io_util import atomic_write_bytes
from guided_diffusion.utils.run_lock import refuse_other_runs, run_lock

SYNTHETIC_HINT = "python scripts/make_synthetic_brats.py --out DIR"
RUN_CONFIG = "run_config.json"


def _validate(m: ModelConfig, t: TrainConfig) -> None:
    if not t.data_dir:
        raise ValueError("--data_dir is required (preprocessed data root); for a small synthetic dataset "
                         f"run `{SYNTHETIC_HINT}`")
    if not os.path.isdir(t.data_dir):
        raise FileNotFoundError(
            f"--data_dir {t.data_dir} does not exist; preprocess BraTS with scripts/preprocess.py or "
            f"build a synthetic dataset with `{SYNTHETIC_HINT}`"
        )
    if t.sample_shape:
        if t.sample_shape[1] != m.in_channels:
            raise ValueError(f"--sample_shape channel count {t.sample_shape[1]} must equal --in_channels "
                             f"{m.in_channels}")
        if list(t.sample_shape[2:]) != [m.image_size, m.image_size]:
            raise ValueError(f"--sample_shape size {list(t.sample_shape[2:])} must be --image_size "
                             f"{m.image_size} x {m.image_size}")
    if m.num_classes and not t.ret_lab:
        raise ValueError("a class-conditional model (--num_classes > 0) needs labels: pass --ret_lab True, "
                         "or --num_classes 0 for an unconditional model")


def _preview_diffusion(d: DiffusionConfig, t: TrainConfig) -> Any:
    flags = {k: v for k, v in d.to_dict().items() if k != "timestep_respacing"}
    flags["steps"] = flags.pop("diffusion_steps")
    n = min(t.preview_steps, d.diffusion_steps)
    try:
        return create_gaussian_diffusion(**flags, timestep_respacing=f"ddim{n}")
    except ValueError:  # no exact DDIM stride: evenly spaced steps instead
        return create_gaussian_diffusion(**flags, timestep_respacing=str(n))


def saved_config(m: ModelConfig, d: DiffusionConfig, t: TrainConfig) -> dict[str, Any]:
    """The config saved with every checkpoint (keys: the flag names): resolved architecture, diffusion and
    training flags; a resume compares it with the current one."""
    out = {"model": model_config(m, d), "diffusion": d.to_dict(), "train": t.to_dict()}
    if t.data_dir and os.path.isdir(t.data_dir):  # what a resume must have been trained on (train_resume)

        out["data"] = data_record(t.data_dir)
    return out


def train(m: ModelConfig, d: DiffusionConfig, t: TrainConfig) -> None:
    """Build model, diffusion and data from the configs and run the training loop (holding the log dir's
    run lock on rank 0 for the whole run)."""
    _validate(m, t)
    dist_util.setup_dist()
    log_dir = t.log_dir or os.environ.get("OPENAI_LOGDIR") or None
    finished = False
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: dist_util.cleanup(wait=finished))  # no rank waits on one that failed
        if log_dir and dist_util.is_main_process():
            refuse_other_runs(log_dir, "training run")
            stack.enter_context(run_lock(log_dir, "--log_dir"))
        logger.configure(dir=log_dir)
        _train_in(logger.get_dir(), m, d, t)
        finished = True


def _train_in(log_dir: str, m: ModelConfig, d: DiffusionConfig, t: TrainConfig) -> None:
    image_dir = t.image_dir or os.path.join(log_dir, "images")
    if m.num_classes and t.threshold <= 0:
        logger.warn("--threshold <= 0: the null condition is never trained, so classifier-free guidance "
                    "will not work (the paper uses --threshold 0.1)")
    if dist_util.is_main_process():
        save_run_config(os.path.join(log_dir, RUN_CONFIG), {"model": m, "diffusion": d, "train": t})
    seed_everything(t.seed)  # same initial weights on every rank

    logger.log("creating model and diffusion...")
    model, diffusion = create_from_configs(m, d)
    model.to(dist_util.dev())
    logger.log(f"unet_ver {m.unet_ver}: {format_param_count(count_parameters(model))}")

    logger.log("creating data loader...")
    data = get_train_loader(t.data_dir, t.batch_size, seed=t.seed, in_channels=m.in_channels, mixed=t.mixed,
                            ret_lab=t.ret_lab, num_workers=t.num_workers,
                            n_unhealthy_patients=t.n_unhealthy_patients,
                            n_healthy_patients=t.n_healthy_patients, image_size=m.image_size)
    loader = data[0] if isinstance(data, tuple) else data
    first = loader.dataset[0][0]  # read one slice here so that a bad file fails with a plain message
    if first.shape[0] != m.in_channels:
        raise ValueError(f"the training data in {t.data_dir} has {first.shape[0]} channels but "
                         f"--in_channels is {m.in_channels}; pass --in_channels {first.shape[0]}")
    logger.log(f"{len(loader.dataset)} training slices, {len(loader)} batches per epoch per rank")
    logger.log(f"data: {loader.dataset.data_summary()}")

    preview_shape = list(t.sample_shape) or None
    if preview_shape and dist_util.is_main_process():
        x0 = next(iter(loader))[0][: preview_shape[0]]
        atomic_write_bytes(image_grid_png(x0.float()), os.path.join(image_dir, f"real_{t.name}_train.png"))

    logger.log("training...")
    with training_extras(log_dir, t), cpu_fused_attention(t.cpu_fused_attention):
        _loop(TrainLoop, model, diffusion, data, log_dir, image_dir, preview_shape, m, d, t)
    logger.log(f"data: {loader.dataset.data_summary()}")  # now with the all-zero reads of every worker
    logger.log("done")


class _ScalarOutput:
    """A logger output forwarding every dumped row to a ``ScalarWriter`` (step from the ``step`` key)."""

    def __init__(self, writer: Any):
        self.writer, self.count = writer, 0

    def writekvs(self, kvs: dict[str, Any]) -> None:
        self.writer.log_scalars(int(kvs.get("step", self.count)), kvs)
        self.count += 1

    def writeseq(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def training_extras(log_dir: str, t: TrainConfig) -> Iterator[None]:
    """Rank 0: TensorBoard events under LOG_DIR/tb while training (when tensorboard is importable, else
    nothing) and LOG_DIR/loss_curves.png from progress.csv at the end of the run (issue 12)."""

    main_rank = dist_util.is_main_process()
    out = _ScalarOutput(ScalarWriter(os.path.join(log_dir, "tb"))) if main_rank else None
    current = logger._get() if out is not None and out.writer.enabled else None
    if current is not None:
        current.outputs.append(out)
    try:
        yield
    finally:
        if current is not None:
            current.outputs.remove(out)
        if out is not None:
            out.close()
    progress = os.path.join(log_dir, "progress.csv")
    if main_rank and os.path.isfile(progress):
        try:
            write_loss_curves_png(progress, os.path.join(log_dir, "loss_curves.png"), title=t.name)
        except (ValueError, ImportError) as err:
            logger.warn(f"loss_curves.png not written: {err}")


def _loop(TrainLoop: Any, model: Any, diffusion: Any, data: Any, log_dir: str, image_dir: str,
          preview_shape: list[int] | None, m: ModelConfig, d: DiffusionConfig, t: TrainConfig) -> None:

    schedule_sampler = create_named_schedule_sampler(t.schedule_sampler, diffusion)
    if t.noise_type == "simplex":
        diffusion = SimplexTrainingDiffusion(diffusion, {"frequency": t.simplex_frequency})
    TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=t.batch_size, microbatch=t.microbatch,
        lr=t.lr, ema_rate=t.ema_rate, log_interval=t.log_interval, save_interval=t.save_interval,
        resume_checkpoint=t.resume_checkpoint, resume=t.resume, clear_checkpoints=t.clear_checkpoints,
        weight_decay=t.weight_decay, lr_anneal_steps=t.lr_anneal_steps, schedule_sampler=schedule_sampler,
        label_dropout=t.threshold, grad_clip=t.grad_clip, precision=t.precision, max_steps=t.max_steps,
        total_epochs=t.total_epochs, seed=t.seed, config=saved_config(m, d, t), log_dir=log_dir,
        image_dir=image_dir, preview_shape=preview_shape, preview_w=list(t.w),
        preview_diffusion=_preview_diffusion(d, t) if preview_shape else None,
        ddpm_preview=t.ddpm_sampling, num_classes=m.num_classes or None,
        compile=t.compile, channels_last=t.channels_last,
    ).run_loop()


class SimplexTrainingDiffusion:
    """A diffusion whose ``training_losses`` draws multi-octave simplex noise (from the loop's generator)
    instead of N(0, I) (AnoDDPM (S), Wyatt et al. 2022); every other attribute is the wrapped diffusion's."""

    def __init__(self, diffusion: Any, simplex_kwargs: Mapping[str, Any]):
        self._diffusion, self._kwargs = diffusion, dict(simplex_kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._diffusion, name)

    def training_losses(self, model: Any, x_start: Any, t: Any, model_kwargs: dict | None = None,
                        noise: Any = None, generator: Any = None) -> dict[str, Any]:

        if noise is None:
            noise = simplex_noise_like(x_start, generator=generator, **self._kwargs)
        return self._diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise,
                                               generator=generator)


HAE_V2_FORCED: dict[str, Any] = {"unet_ver": "hae_v2"}


def main(argv: Sequence[str] | None = None, forced: Mapping[str, Any] | None = None) -> int:
    """Parse ``argv`` and train; errors propagate (``cli.run_cli`` prints expected ones as one line)."""

    train(*parse_configs_for_training(argv, forced))
    return 0


def hae_v2_summary(m: ModelConfig, d: DiffusionConfig) -> str:
    """One line with the HAE V2 settings and the parameter counts of the model the configs build
    (built on the meta device: no memory used)."""


    check_bottleneck_ratio(m.bottleneck_ratio)
    with torch.device("meta"):
        model, _ = create_from_configs(m, d)
    total = count_parameters(model)
    hybrid = sum(p.numel() for mod in model.modules() if isinstance(mod, HybridCNNTransformerBlockBase)
                 for p in mod.parameters())
    return (f"HAE V2: unet_ver={m.unet_ver} use_hae={m.use_hae} bottleneck_ratio={m.bottleneck_ratio} "
            f"{format_param_count(total)}; hybrid blocks {hybrid:,}")


def main_hae_v2(argv: Sequence[str] | None = None) -> int:
    """``main`` with ``--unet_ver hae_v2`` fixed; prints the HAE V2 settings before training."""

    m, d, t = parse_configs_for_training(argv, HAE_V2_FORCED)
    print(hae_v2_summary(m, d), flush=True)
    train(m, d, t)
    return 0
