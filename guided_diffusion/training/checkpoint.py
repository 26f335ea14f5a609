"""Training checkpoints: atomic save, listing, lookup, loading with clear errors.

A checkpoint at step N in a log directory consists of
``model{N:06d}.pt`` (plain state dict, upstream-compatible), ``ema_{rate}_{N:06d}.pt`` per EMA rate
(plain state dicts), ``opt{N:06d}.pt`` (optimizer state) and ``state{N:06d}.pt`` (step, resolved flags,
RNG states, grad-scaler state, data position, and the names/sizes of the other files). Every file is
written atomically and the state file last, so a step is *complete* exactly when its state file exists.
Upstream directories (no state files) remain usable for inference through ``find_checkpoint``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import blobfile as bf
import torch

from guided_diffusion.utils import logger
from guided_diffusion.utils.io_util import atomic_torch_save, atomic_write_bytes, atomic_write_text

__all__ = [
    "atomic_save", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "list_checkpoints",
    "list_model_steps", "find_checkpoint", "load_state_dict_file", "load_model_checkpoint",
    "check_state_dict_fits",
    "latest_complete_checkpoint", "load_training_checkpoint", "read_saved_config", "parse_checkpoint_name",
    "TrainingCheckpoint", "CheckpointError",
]

_NAME_RE = re.compile(r"^(?:(model|opt|state)|ema_([0-9.eE+-]+)_)(\d+)\.pt$")
STATE_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not fit the model."""


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename (readers never see partial files)."""
    atomic_torch_save(obj, path)


def parse_checkpoint_name(path: str) -> tuple[str, str | None, int] | None:
    """("model"|"ema"|"opt"|"state", ema rate string or None, step) for a checkpoint file name, else None."""
    m = _NAME_RE.match(os.path.basename(path))
    if m is None:
        return None
    if m.group(1):
        return m.group(1), None, int(m.group(3))
    return "ema", m.group(2), int(m.group(3))


def _scan(directory: str) -> list[tuple[str, str | None, int, str]]:
    if not bf.isdir(directory):
        return []
    out = []
    for name in bf.listdir(directory):
        parsed = parse_checkpoint_name(name)
        if parsed is not None:
            out.append((*parsed, name))
    return out


def _file_names(step: int, ema_rates: list[str]) -> list[str]:
    return [f"model{step:06d}.pt", *[f"ema_{r}_{step:06d}.pt" for r in ema_rates], f"opt{step:06d}.pt"]


def save_checkpoint(
    log_dir: str,
    step: int,
    model: torch.nn.Module,
    ema_params_by_rate: Mapping[str, Mapping[str, torch.Tensor]],
    opt: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Write the four kinds of files for ``step`` (call on rank 0 only); returns the paths written.

    Args:
        model: the un-wrapped model (its state dict is saved as-is).
        ema_params_by_rate: {rate string: {parameter name: EMA tensor}}; buffers are taken from ``model``.
        extra: goes into the state file (e.g. config, rng, scaler, data position).
    """
    state_dict = model.state_dict()
    objs: list[tuple[str, Any]] = [(f"model{step:06d}.pt", state_dict)]
    for rate, ema in ema_params_by_rate.items():
        sd = {k: (ema[k] if k in ema else v) for k, v in state_dict.items()}
        objs.append((f"ema_{rate}_{step:06d}.pt", sd))
    objs.append((f"opt{step:06d}.pt", opt.state_dict()))
    sizes = {}
    paths = []
    state_path = bf.join(log_dir, f"state{step:06d}.pt")
    try:
        for name, obj in objs:
            path = bf.join(log_dir, name)
            buf = io.BytesIO()
            torch.save(obj, buf)
            atomic_write_bytes(buf.getvalue(), path)
            sizes[name] = buf.getbuffer().nbytes
            paths.append(path)
        state = dict(extra or {})
        state.update(version=STATE_VERSION, step=int(step), ema_rates=list(ema_params_by_rate),
                     file_sizes=sizes)
        atomic_save(state, state_path)  # last: marks the checkpoint complete
    except OSError as err:  # e.g. disk full: leave no partial step behind, keep the older ones
        _remove_step_files(log_dir, [name for name, _ in objs] + [os.path.basename(state_path)])
        kept = list_checkpoints(log_dir)
        raise OSError(
            f"saving the checkpoint of step {step} in {log_dir} failed ({err.strerror or err}); its partial "
            f"files were removed, the last complete checkpoint is "
            f"{f'step {kept[-1]}' if kept else 'none'}; free space and rerun the same command to resume"
        ) from err
    paths.append(state_path)
    return paths


def _remove_step_files(log_dir: str, names: list[str]) -> None:
    """Delete ``names`` in ``log_dir`` and the temporary files of this process's atomic writes of them."""
    if not os.path.isdir(log_dir):
        return
    temp = re.compile(r"\.(" + "|".join(map(re.escape, names)) + rf")\.tmp-{os.getpid()}-[0-9a-f]+")
    for entry in os.listdir(log_dir):
        if entry in names or temp.fullmatch(entry):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(log_dir, entry))


def list_checkpoints(directory: str) -> list[int]:
    """Sorted steps that have a state file (i.e. whose save completed)."""
    return sorted({step for kind, _, step, _ in _scan(directory) if kind == "state"})


def list_model_steps(directory: str) -> list[int]:
    """Sorted steps that have a ``model*.pt`` or ``ema_*.pt`` file (upstream directories included)."""
    return sorted({step for kind, _, step, _ in _scan(directory) if kind in ("model", "ema")})


def _parse_step(step: int | str) -> int:
    try:
        return int(str(step).strip())
    except ValueError:
        raise ValueError(f"checkpoint step {step!r} is not an integer (e.g. 50000 or 050000)") from None


def _same_rate(a: str, b: str | float) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == str(b)


def find_checkpoint(
    model_dir: str, step: int | str | None = None, ema_rate: str | float | None = None
) -> str:
    """Path of the model (``ema_rate`` None) or EMA weights at ``step`` (None = newest available).

    Steps may be given unpadded (50000 → ``model050000.pt``). Raises FileNotFoundError naming the
    directory, the steps present or the EMA rates present.
    """
    if not bf.isdir(model_dir):
        raise FileNotFoundError(f"checkpoint directory {model_dir} does not exist (check --model_dir / path)")
    entries = _scan(model_dir)
    kind = "model" if ema_rate is None else "ema"
    if not [e for e in entries if e[0] in ("model", "ema")]:
        raise FileNotFoundError(
            f"no checkpoints (model*.pt / ema_*.pt) in {model_dir}; train first or point to the run's log dir"
        )
    wanted = None if step is None else _parse_step(step)
    candidates = [e for e in entries if e[0] == kind and (ema_rate is None or _same_rate(e[1], ema_rate))]
    if wanted is not None:
        hits = [e for e in candidates if e[2] == wanted]
        if hits:
            return bf.join(model_dir, hits[0][3])
        steps = sorted({e[2] for e in entries if e[0] in ("model", "ema")})
        if wanted not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {wanted} in {model_dir}; steps present: {_fmt_steps(steps)}"
            )
    elif candidates:
        return bf.join(model_dir, max(candidates, key=lambda e: e[2])[3])
    if ema_rate is not None:
        rates = sorted({e[1] for e in entries if e[0] == "ema" and (wanted is None or e[2] == wanted)})
        where = f"step {wanted}" if wanted is not None else model_dir
        raise FileNotFoundError(
            f"no EMA checkpoint with rate {ema_rate} for {where} in {model_dir}; "
            f"EMA rates present: {', '.join(rates) if rates else 'none (only model*.pt; drop the EMA rate)'}"
        )
    raise FileNotFoundError(
        f"no model{wanted:06d}.pt in {model_dir} (only EMA files for that step; pass an EMA rate)"
        if wanted is not None
        else f"no model*.pt files in {model_dir} (only EMA files; pass an EMA rate)"
    )


def _fmt_steps(steps: list[int]) -> str:
    if len(steps) > 20:
        return ", ".join(map(str, steps[:10])) + ", ..., " + ", ".join(map(str, steps[-5:]))
    return ", ".join(map(str, steps)) if steps else "none"


def load_state_dict_file(path: str, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` through blobfile; a truncated or foreign file raises CheckpointError (a ValueError)."""
    if not bf.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, KeyError) as err:
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({type(err).__name__}: {_first_line(err)}); "
            "delete it and resume from an earlier step, or pick another file"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no details"


def read_saved_config(model_dir: str, step: int | None = None) -> dict[str, Any] | None:
    """The resolved flags saved with a training run (state file of ``step`` or the newest one,
    else ``config.json``), or None for upstream directories."""
    steps = list_checkpoints(model_dir)
    if steps:
        s = step if step in steps else steps[-1]
        try:
            state = load_state_dict_file(bf.join(model_dir, f"state{s:06d}.pt"), weights_only=False)
            cfg = state.get("config") if isinstance(state, dict) else None
            if cfg is not None:
                return cfg
        except (ValueError, FileNotFoundError):
            pass
    path = bf.join(model_dir, "config.json")
    if bf.exists(path):
        with bf.BlobFile(path, "r") as f:
            return json.load(f)
    return None


def _flatten(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v))
        else:
            out[k] = v
    return out


def _guess_flags(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    keys = " ".join(missing + unexpected + mismatched)
    guesses = []
    if "label_emb" in keys or "class_emb" in keys:
        guesses.append("num_classes/class_cond/clf_free")
    if "input_blocks.0.0" in " ".join(mismatched):
        guesses.append("in_channels/num_channels")
    if "out." in " ".join(mismatched):
        guesses.append("in_channels/learn_sigma")
    if re.search(r"hae|hybrid|mstb|decoder_block|bea", keys, re.IGNORECASE):
        guesses.append("unet_ver/use_hae")
    if re.search(r"(input|output)_blocks\.\d+", " ".join(missing + unexpected)):
        guesses.append("channel_mult/num_res_blocks/attention_resolutions/image_size")
    if mismatched and not guesses:
        guesses.append("num_channels/channel_mult/num_heads")
    return guesses or ["unet_ver/num_channels/channel_mult"]


def check_state_dict_fits(
    model: torch.nn.Module,
    sd: Mapping[str, Any],
    path: str,
    config: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> None:
    """Raise CheckpointError naming ``path`` when ``sd`` does not fit ``model``: missing / unexpected /
    mis-shaped keys, with a hint about the flags that probably differ (from the saved config if any)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if not mismatched and not (strict and (missing or unexpected)):
        return
    lines = [f"{path} does not fit the model built from the current flags:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if items:
            shown = "; ".join(items[:5]) + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
            lines.append(f"  {len(items)} {label} keys: {shown}")
    lines.append(f"  flags that probably differ: {', '.join(_guess_flags(missing, unexpected, mismatched))}")
    parsed = parse_checkpoint_name(path)
    saved = read_saved_config(os.path.dirname(path) or ".", parsed[2] if parsed else None)
    if saved is not None:
        flat_saved = _flatten(saved)
        if config is not None:
            flat_now = _flatten(config)
            diff = [
                f"{k}: saved {flat_saved[k]!r}, now {flat_now[k]!r}"
                for k in sorted(flat_saved)
                if k in flat_now and flat_saved[k] != flat_now[k]
            ]
            lines.append("  saved flags that differ from the current ones: " + ("; ".join(diff) or "none"))
        else:
            arch = {k: flat_saved[k] for k in _ARCH_HINT if k in flat_saved}
            lines.append(f"  the run was trained with: {arch}")
    lines.append("  pass the same model flags that were used for training")
    raise CheckpointError("\n".join(lines))


_ARCH_HINT = ("unet_ver", "num_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
              "in_channels", "num_classes", "learn_sigma", "image_size")


def load_model_checkpoint(
    model: torch.nn.Module,
    path: str,
    strict: bool = True,
    config: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Load a plain state dict file (model or EMA weights) into ``model`` and return it.

    Args:
        config: the current resolved flags (optional); compared with the flags saved next to ``path``
            to say which ones differ when the weights do not fit.
    Raises:
        FileNotFoundError for a missing file; CheckpointError (a ValueError) naming the file for a
        truncated file or missing / unexpected / mis-shaped keys.
    """
    sd = load_state_dict_file(path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    check_state_dict_fits(model, sd, path, config, strict)
    model.load_state_dict(sd, strict=strict)
    return model


@dataclass
class TrainingCheckpoint:
    """Everything a complete training checkpoint holds (tensors on CPU)."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, dict[str, torch.Tensor]]
    opt: dict[str, Any]
    state: dict[str, Any]
    paths: list[str] = field(default_factory=list)


def load_training_checkpoint(directory: str, step: int) -> TrainingCheckpoint:
    """Load every file of the complete checkpoint ``step``; CheckpointError names the faulty file."""
    state_path = bf.join(directory, f"state{step:06d}.pt")
    state = load_state_dict_file(state_path, weights_only=False)
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"{state_path}: not a training state file for step {step}")
    rates = [str(r) for r in state.get("ema_rates", [])]
    sizes = state.get("file_sizes", {})
    loaded = {}
    paths = [state_path]
    for name in _file_names(step, rates):
        path = bf.join(directory, name)
        if not bf.exists(path):
            raise CheckpointError(f"{path} is missing although {state_path} lists it")
        if name in sizes and bf.stat(path).size != sizes[name]:
            raise CheckpointError(
                f"{path}: truncated or not a checkpoint "
                f"(size {bf.stat(path).size} bytes, expected {sizes[name]})"
            )
        loaded[name] = load_state_dict_file(path)
        paths.append(path)
    return TrainingCheckpoint(
        step=step,
        model=loaded[f"model{step:06d}.pt"],
        ema={r: loaded[f"ema_{r}_{step:06d}.pt"] for r in rates},
        opt=loaded[f"opt{step:06d}.pt"],
        state=state,
        paths=paths,
    )


def remove_stale_temp_files(directory: str) -> list[str]:
    """Delete temporary files left by atomic writes of processes that no longer run (a run killed during
    a save). Temp names are ``.<name>.tmp-<pid>-<hex>`` (io_util); files of live processes are kept."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        match = re.fullmatch(r"\..+\.tmp-(\d+)-[0-9a-f]+", name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        os.remove(os.path.join(directory, name))
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def latest_complete_checkpoint(directory: str) -> TrainingCheckpoint | None:
    """The newest checkpoint whose files all load; older ones are tried (with a warning) when the newest
    is truncated or corrupt. None when the directory holds no complete checkpoint."""
    for step in reversed(list_checkpoints(directory)):
        try:
            return load_training_checkpoint(directory, step)
        except (CheckpointError, FileNotFoundError) as err:
            logger.warn(f"checkpoint at step {step} in {directory} is unusable, trying an older one: {err}")
    return None
