"""Resume reconciliation for ``TrainLoop``: which checkpoint to continue from, whether it was made with
the same run-changing flags, and restoring the loop's weights, EMA, optimizer, data position and RNG.

``--resume never`` refuses a log dir that already holds checkpoints (a later ``auto`` run would pick up
a stale newer step) unless ``clear_checkpoints`` deletes them first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import blobfile as bf

from guided_diffusion.data.fingerprint import data_fingerprint, explain
from guided_diffusion.script_util import drop_foreign_options
from guided_diffusion.training import checkpoint
from guided_diffusion.training.rng import seed_everything, seed_for
from guided_diffusion.utils import dist_util, logger

# keys of the saved "train" section that change the trained weights (a resume must match them; the
# global batch_size too: the data order and the step size depend on it, while the number of processes may
# change); max_steps/total_epochs (train longer), intervals, workers, previews and paths may change freely
RUN_CHANGING_TRAIN_KEYS = (
    "seed", "batch_size", "lr", "weight_decay", "lr_anneal_steps", "microbatch", "ema_rate", "precision",
    "grad_clip", "threshold", "schedule_sampler", "mixed", "ret_lab", "n_unhealthy_patients",
    "n_healthy_patients", "noise_type", "simplex_frequency",
)


def clear_or_refuse(log_dir: str, clear: bool) -> None:
    """For ``--resume never``: delete the checkpoint files in ``log_dir`` when ``clear``, else refuse."""
    if not os.path.isdir(log_dir):
        return
    names = [n for n in os.listdir(log_dir) if checkpoint.parse_checkpoint_name(n) is not None]
    if not names:
        return
    if not clear:
        steps = checkpoint.list_model_steps(log_dir)
        raise ValueError(
            f"--resume never: {log_dir} already holds checkpoints (steps {', '.join(map(str, steps))}); "
            "use a new --log_dir, --resume auto to continue, or --clear_checkpoints True to delete them"
        )
    for name in names:
        os.remove(os.path.join(log_dir, name))
    logger.log(f"--clear_checkpoints: deleted {len(names)} checkpoint file(s) in {log_dir}")


def find_resume_checkpoint(
    log_dir: str, resume: str, resume_checkpoint: str, ema_rates: list[str]
) -> checkpoint.TrainingCheckpoint | None:
    """The checkpoint to continue from: ``resume_checkpoint`` if given, else (``resume`` "auto") the newest
    complete one in ``log_dir`` (rank 0 looks, every rank loads the same step), else None."""
    if resume_checkpoint:
        return load_named(resume_checkpoint, ema_rates)
    if resume != "auto":
        return None
    step, found = None, None
    if dist_util.is_main_process():
        stale = checkpoint.remove_stale_temp_files(log_dir)
        if stale:
            logger.log(f"removed {len(stale)} temporary file(s) of an interrupted save: {stale}")
        found = checkpoint.latest_complete_checkpoint(log_dir)
        step = found.step if found else None
    step = dist_util.broadcast_object(step)
    if step is None:
        return None
    return found if dist_util.is_main_process() else checkpoint.load_training_checkpoint(log_dir, step)


def load_named(path: str, ema_rates: list[str]) -> checkpoint.TrainingCheckpoint:
    """A ``--resume_checkpoint`` file: a complete checkpoint of this code, or upstream-style weights
    (with the EMA / optimizer files beside it when present)."""
    parsed = checkpoint.parse_checkpoint_name(path)
    if parsed is None or parsed[0] != "model":
        raise ValueError(f"--resume_checkpoint {path}: expected a file named modelNNNNNN.pt")
    step, directory = parsed[2], bf.dirname(path)
    if step in checkpoint.list_checkpoints(directory):
        return checkpoint.load_training_checkpoint(directory, step)
    model_sd = checkpoint.load_state_dict_file(path)
    ema = {}
    for r in ema_rates:
        p = bf.join(directory, f"ema_{r}_{step:06d}.pt")
        if bf.exists(p):
            ema[r] = checkpoint.load_state_dict_file(p)
    opt_path = bf.join(directory, f"opt{step:06d}.pt")
    opt = checkpoint.load_state_dict_file(opt_path) if bf.exists(opt_path) else None
    return checkpoint.TrainingCheckpoint(step=step, model=model_sd, ema=ema, opt=opt, state={}, paths=[path])


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``part.key: checkpoint X, flags Y`` for every model/diffusion entry and run-changing train entry
    present in both configs that differs (entries an older checkpoint lacks are not compared)."""

    diffs = []
    for part in ("model", "diffusion", "train"):
        a, b = saved.get(part), current.get(part)
        if a is None or b is None:
            continue
        if part == "model":  # older checkpoints also list other variants' (unused) options
            a = drop_foreign_options(a)
        keys = sorted(set(a) | set(b)) if part != "train" else [k for k in RUN_CHANGING_TRAIN_KEYS
                                                                 if k in a and k in b]
        diffs += [f"{part}.{k}: checkpoint {a.get(k)!r}, flags {b.get(k)!r}"
                  for k in keys if a.get(k) != b.get(k)]
    return diffs


def data_record(data_dir: str) -> dict[str, Any]:
    """The "data" section of the saved config: the content fingerprint of the training split
    (guided_diffusion/data/fingerprint.py), which a resume must match."""

    return {"data_dir": os.path.abspath(data_dir), "splits": ["train"],
            "data_sha256": data_fingerprint(data_dir, ("train",)).digest}


def data_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """One line naming what changed in the training data since ``saved`` (configs with a "data" section);
    None when either lacks it (an older checkpoint) or the fingerprints are equal."""
    a, b = saved.get("data") or {}, current.get("data") or {}
    old, new = a.get("data_sha256"), b.get("data_sha256")
    if not old or not new or old == new:
        return None

    data_dir = str(b.get("data_dir", ""))
    try:
        return explain(data_dir, str(old), data_fingerprint(data_dir, ("train",)))
    except (OSError, ValueError):
        return f"the data in {data_dir} changed (fingerprint {str(old)[:8]} -> {str(new)[:8]})"


def check_config(ck: checkpoint.TrainingCheckpoint, config: Mapping[str, Any], log_dir: str) -> None:
    """ValueError naming every differing setting when ``ck`` was trained with other flags, or naming what
    changed when it was trained on other data (the training split's content fingerprint)."""
    change = data_difference(ck.state.get("config") or {}, config)
    if change is not None:
        where = bf.dirname(ck.paths[0]) if ck.paths else log_dir
        raise ValueError(f"the checkpoint at step {ck.step} in {where} was trained on other data: {change}; "
                         "use a new --log_dir to train on this data, or restore the data it was trained on")
    diffs = config_differences(ck.state.get("config") or {}, config)
    if diffs:
        where = bf.dirname(ck.paths[0]) if ck.paths else log_dir
        raise ValueError(
            f"the checkpoint at step {ck.step} in {where} was trained with different flags: "
            + "; ".join(diffs) + "; use the original flags, or a new --log_dir to start a new run"
        )


def apply_checkpoint(loop: Any, ck: checkpoint.TrainingCheckpoint) -> None:
    """Load ``ck`` into ``loop`` (a TrainLoop): weights, EMA, optimizer, scaler, step, data position, RNG."""

    path = ck.paths[0] if ck.paths else "checkpoint"
    checkpoint.check_state_dict_fits(loop.model, ck.model, path, loop.config.get("model"))
    loop.model.load_state_dict(ck.model)
    named = dict(loop.model.named_parameters())
    for r in loop.ema_rates:
        source = ck.ema.get(r)
        if source is None:
            logger.warn(f"no EMA weights for rate {r} at step {ck.step}; that EMA starts from the model")
        for n in loop.param_names:
            loop.ema[r][n].copy_(source[n] if source is not None else named[n].detach())
    if ck.opt is not None:
        loop.opt.load_state_dict(ck.opt)
    else:
        logger.warn(f"no optimizer state for step {ck.step}; AdamW moments start from zero")
    loop.step = loop.last_saved_step = ck.step
    state = ck.state
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    data = state.get("data")
    n_batches = loop.batches_per_epoch()
    if data:
        epoch, batch = int(data["epoch"]), int(data["batch_index"])
        if int(data.get("global_batch", loop.global_batch)) != loop.global_batch:
            logger.warn("global batch size changed since the checkpoint; data order will differ from "
                        "an uninterrupted run")
            batch = batch * int(data["global_batch"]) // loop.global_batch
    else:  # upstream checkpoint: infer the position from the step (same batch size assumed)
        epoch, batch = divmod(ck.step, n_batches) if n_batches else (0, 0)
    if n_batches and batch >= n_batches:
        epoch, batch = epoch + 1, 0
    loop.epoch, loop.batch_index = epoch, batch
    rng = state.get("rng")
    if rng and len(rng) == loop.world_size:
        loop.pending_rng = rng[loop.rank]
    else:
        if rng:
            logger.warn(f"checkpoint has RNG states for {len(rng)} ranks, this run has "
                        f"{loop.world_size}; reseeding")
        seed_everything(seed_for(loop.seed, loop.rank, loop.step))
    logger.log(f"resumed from step {ck.step} ({ck.paths[0] if ck.paths else loop.log_dir}); "
               f"epoch {loop.epoch}, batch {loop.batch_index}")
