"""Run-level plumbing of the AnoFPDM evaluation and guidance selection
(``guided_diffusion.anofpdm.translation``,
``scripts/select_guidance.py``): the log-dir session (one run per folder), the model, the inference
options of issue 11 (``--precision``, ``--compile``, ``--batch_size auto``) and the data summaries.

* ``run_session(run)``: setup_dist, the exclusive run lock on the log dir (rank 0, the whole run),
  logger.configure, LOGDIR/config.json.
* ``prepare_inference(run, model, diffusion)``: checks that ``--precision`` runs on this device (fp16 needs
  CUDA), wraps the network with ``torch.compile`` when asked (one probe call; eager fallback with one
  logged line) and resolves ``--batch_size auto`` / ``--batch_size_val auto`` (batch_size.auto_batch_size
  with one short forward-process probe on CUDA; 8 on CPU). Returns the run with the sizes filled in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
from collections.abc import Iterator

import torch

from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.configs.base import DiffusionConfig, ModelConfig, save_run_config
from guided_diffusion.configs.eval_configs import CheckpointConfig, EvalRun
from guided_diffusion.export.export import WEIGHTS_FILE, is_export_dir, read_export
from guided_diffusion.export.export_load import DIFFUSION_FIELDS, load_export_model
from guided_diffusion.script_util import create_from_configs, model_config
from guided_diffusion.training.checkpoint import (
    find_checkpoint,
    load_model_checkpoint,
    parse_checkpoint_name,
    read_saved_config,
)
from guided_diffusion.utils import dist_util, logger
from guided_diffusion.utils.batch_size import auto_batch_size
from guided_diffusion.utils.io_util import file_sha256
from guided_diffusion.utils.precision import check_precision, compile_mode, maybe_compile
from guided_diffusion.utils.run_lock import refuse_other_runs, run_lock

CPU_BATCH = 8  # --batch_size auto on CPU: larger batches are not faster per slice there


# ---------------------------------------------------------------------------------------------- session
@contextlib.contextmanager
def run_session(run: EvalRun, kind: str = "evaluation") -> Iterator[str]:
    """setup_dist, ``--precision`` checked for the device, the run lock (rank 0 holds it on the log dir
    until the block ends), logger.configure, the resolved run config written to LOGDIR/config.json;
    yields the log dir. A second run on a locked folder stops at once with a RunLockError naming the
    holder (pid, host); a log dir holding another kind of run (``run_lock.RUN_KINDS``: a training run, an
    export, an evaluation for a ``kind`` "guidance selection") is refused before anything is written."""

    dist_util.setup_dist()
    # the process group is destroyed on the way out, error or not: left to the interpreter's exit, gloo's
    # threads die unjoined and a rank aborts ("terminate called without an active exception", exit 6)
    finished = False
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: dist_util.cleanup(wait=finished))
        check_inference_precision(run.forward.precision, dist_util.dev())  # before anything is written
        wanted = run.eval.log_dir or os.environ.get("OPENAI_LOGDIR") or None
        main = dist_util.get_rank() == 0
        if wanted and main:
            refuse_other_runs(wanted, kind)
            stack.enter_context(run_lock(wanted, "--log_dir"))
        logger.configure(dir=wanted)
        log_dir = logger.get_dir()
        if not wanted and main:  # a fresh temporary folder: lock it all the same
            stack.enter_context(run_lock(log_dir, "--log_dir"))
        record = run.record()
        logger.log("config: " + json.dumps(record, sort_keys=True))
        if main:
            save_run_config(os.path.join(log_dir, "config.json"), record)
        yield log_dir
        finished = True


# ---------------------------------------------------------------------------------------------- model
def load_model(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, ckpt: CheckpointConfig):
    """(model, diffusion, checkpoint path, sha256) built from the configs, weights loaded, eval mode.

    ``ckpt.model_dir`` is a training log dir or an export folder (guided_diffusion.export.export_load)."""

    if is_export_dir(ckpt.model_dir):
        return load_export_model(model_cfg, diffusion_cfg, ckpt, dist_util.dev())
    model, diffusion = create_from_configs(model_cfg, diffusion_cfg)
    if not os.path.isdir(ckpt.model_dir):
        raise FileNotFoundError(
            f"--model_dir {ckpt.model_dir} does not exist; point it to the training log dir"
        )
    path = find_checkpoint(ckpt.model_dir, step=ckpt.model_num, ema_rate=ckpt.ema_rate if ckpt.ema else None)
    load_model_checkpoint(model, path, config=model_config(model_cfg, diffusion_cfg))
    check_trained_like(path, model_cfg, diffusion_cfg)
    model.to(dist_util.dev()).eval()
    return model, diffusion, path, file_sha256(path)


def check_trained_like(path: str, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> None:
    """ValueError naming every network / diffusion flag that differs from the config saved with the
    checkpoint ``path`` by its training run: the ones no tensor shape shows (``--num_heads``,
    ``--image_size``, ``--diffusion_steps``, ``--noise_schedule``, ...) would otherwise load and run with
    another meaning. A checkpoint without a saved config (upstream) is not checked."""
    parsed = parse_checkpoint_name(os.path.basename(path))
    saved = read_saved_config(os.path.dirname(path) or ".", parsed[2] if parsed else None)
    if not isinstance(saved, dict) or "forward" in saved:  # none, or an evaluation's record
        return
    have, want = saved.get("model"), model_config(model_cfg, diffusion_cfg)
    diffs = [f"--{k} {want[k]} (trained with {have[k]})" for k in sorted(want)
             if isinstance(have, dict) and k in have and have[k] != want[k]]
    have_d, want_d = saved.get("diffusion"), diffusion_cfg.to_dict()
    diffs += [f"--{k} {want_d[k]} (trained with {have_d[k]})" for k in DIFFUSION_FIELDS
              if isinstance(have_d, dict) and k in have_d and have_d[k] != want_d[k]]
    if diffs:
        raise ValueError(f"{path} was trained with other settings than these flags: {'; '.join(diffs)}; "
                         "pass the training run's values (its run_config.json)")


def checkpoint_step(path: str) -> int | None:
    """The training step in a checkpoint's file name, or the step recorded by the export folder holding
    ``path`` (None when neither has one)."""

    folder = os.path.dirname(path)
    if is_export_dir(folder) and os.path.basename(path) == WEIGHTS_FILE:
        step = (read_export(folder)[0].get("weights") or {}).get("step")
        return int(step) if step is not None else None
    parsed = parse_checkpoint_name(os.path.basename(path))
    return int(parsed[2]) if parsed else None


# ---------------------------------------------------------------------------------------------- inference
def check_inference_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` if the network can run in it on ``device``; else ValueError naming --precision."""
    check_precision(precision)
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (this run uses {kind}); use --precision "
                         "bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16 is not supported by this GPU; use --precision fp16 or fp32")
    return precision


def _probe(run: EvalRun, model, diffusion, steps: int, keep_sam_stack: bool):
    """probe(n): a ``steps``-step forward process on n blank slices with the run's settings."""
    m = run.model

    def probe(n: int) -> None:
        x = torch.zeros(n, m.in_channels, m.image_size, m.image_size, device=dist_util.dev())
        settings = {**run.forward.settings_kwargs(), "forward_steps": steps, "early_stop_patience": 0}
        with torch.no_grad():
            run_forward_process(model, diffusion, x, ws=list(run.forward.w), keep_sam_stack=keep_sam_stack,
                                **settings)

    return probe


def _sam_stack_cap(run: EvalRun, device: torch.device) -> int:
    """Largest batch whose float16/32 SAM stack [B, nW, S, M, H, W] (t_e_ratio != 1) takes at most half of
    the device memory left after the probe (the probe runs only a few of the S steps)."""
    per_slice = (len(run.forward.w) * run.forward.forward_steps * len(run.forward.modality)
                 * run.model.image_size ** 2 * (4 if run.sam_mode == "gradient" else 2))
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, int(free // 2 // per_slice))


def resolve_batch_sizes(run: EvalRun, model, diffusion) -> EvalRun:
    """The run with ``--batch_size auto`` / ``--batch_size_val auto`` replaced by sizes for this device."""
    ev, dev = run.eval, dist_util.dev()
    sizes = {}
    test_stack = any(r != 1 for r in run.segment.t_e_ratio)  # the test pass keeps the SAM stack
    for flag, stack in (("batch_size_val", False), ("batch_size", test_stack)):
        if getattr(ev, flag) is not None:
            continue
        probe = _probe(run, model, diffusion, min(2, run.forward.forward_steps), stack)
        n = auto_batch_size(probe, dev, cpu_batch=CPU_BATCH)
        if stack and dev.type == "cuda":
            n = min(n, _sam_stack_cap(run, dev))
        sizes[flag] = n
        logger.log(f"--{flag} auto: {n} on {dev}")
    return dataclasses.replace(run, eval=ev.replace(**sizes)) if sizes else run


def maybe_compile_model(run: EvalRun, model, diffusion):
    """``torch.compile`` of the network under ``--compile True``, checked by one short probe; the eager
    model (with one logged line) where compilation fails."""
    if not run.eval.compile:
        return model
    mode = compile_mode(dist_util.dev())
    compiled = maybe_compile(model, True, mode=mode, log=logger.log)
    if compiled is model:
        return model
    try:
        _probe(run, compiled, diffusion, 1, False)(1)
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
        logger.log(f"--compile: torch.compile failed on this platform ({type(err).__name__}: "
                   f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); running eagerly")
        return model
    logger.log(f"--compile: the network runs under torch.compile (mode {mode or 'default'})")
    return compiled


def prepare_inference(run: EvalRun, model, diffusion):
    """(run with batch sizes resolved, network to call): precision checked for the device, compiled when
    asked, ``auto`` batch sizes sized to the device."""
    check_inference_precision(run.forward.precision, dist_util.dev())  # also for callers without a session
    model = maybe_compile_model(run, model, diffusion)
    return resolve_batch_sizes(run, model, diffusion), model


def peak_memory() -> int:
    """Peak memory of this process in bytes (CUDA: allocated by torch; CPU: max RSS)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def log_data_summary(dataset) -> str:
    """Log ``dataset.data_summary()`` on rank 0 with the all-zero slices found by every rank; returns it.
    Collective: every rank must call it."""
    zero = dist_util.all_gather_object(sorted(getattr(dataset, "zero_slices", ())))
    dataset.zero_slices = set().union(*map(set, zero))
    text = dataset.data_summary()
    logger.log("data: " + text)
    return text
