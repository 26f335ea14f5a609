"""Typed configs of the AnoFPDM evaluation (translation_FPDM.py) and the guidance selection
(select_guidance.py): the checkpoint, the forward process, the segmentation and the evaluation run.

The calibration match keys are the ``STATS`` fields of these configs (plus the diffusion/model fields that
change the statistics); the resume fingerprint of the per-slice results is their ``RESULT`` fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from guided_diffusion.cli import str2bool
from guided_diffusion.configs.base import (
    RESULT,
    STATS,
    CompatFlag,
    Config,
    DiffusionConfig,
    ModelConfig,
    field_names,
    register_compat,
    require,
    require_finite,
    setting,
)
from guided_diffusion.utils.batch_size import parse_batch_size
from guided_diffusion.utils.precision import PRECISIONS

_BOTH = (STATS, RESULT)
# the forward process's encodings and unguided-prediction modes, the SAM modes of the segmentation
ENCODINGS = ("ddim", "ddpm")
UGP_MODES = ("null", "healthy_w0")
SAM_MODES = ("default", "gradient", "gradient_para")



def sam_mode_from_flags(use_gradient_sam: bool, use_gradient_para_sam: bool) -> str:
    """--use_gradient_sam / --use_gradient_para_sam -> a SAM_MODES value (para needs gradient, as upstream
    ignores it otherwise; refused rather than silently ignored)."""
    if use_gradient_para_sam and not use_gradient_sam:
        raise ValueError(
            "--use_gradient_para_sam True needs --use_gradient_sam True (upstream silently ignores it alone)"
        )
    if use_gradient_sam:
        return "gradient_para" if use_gradient_para_sam else "gradient"
    return "default"


PAPER_MIN_CC_SIZE = 40  # px at the paper's 128 x 128 slices (docs/method.md, 'Metrics')
PAPER_IMAGE_SIZE = 128


def resolve_min_cc_size(min_cc_size: int, image_size: int) -> int:
    """CC-filter size in pixels for ``--min_cc_size`` (-1: the paper's 40 px at 128² scaled by area)."""
    if min_cc_size == -1:
        return int(math.floor(PAPER_MIN_CC_SIZE * (image_size / PAPER_IMAGE_SIZE) ** 2 + 0.5))
    if min_cc_size < -1:
        raise ValueError(
            f"--min_cc_size must be -1 (scale the paper's 40 px at 128 px to --image_size) or >= 0, "
            f"got {min_cc_size}"
        )
    return int(min_cc_size)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Config):
    """Which checkpoint to load (its sha256 is what results are tied to, not these names)."""

    SECTION: ClassVar[str] = "checkpoint"

    model_dir: str = setting("", "training log dir holding the checkpoints", changes=())
    model_num: str | None = setting(None, "checkpoint step (default: the newest)", changes=())
    ema: bool = setting(False, "load the EMA weights", changes=())
    ema_rate: str = setting("0.9999", "EMA rate of the weights to load (with --ema True)", changes=())

    def validate(self) -> None:
        require(bool(self.model_dir), "--model_dir is required (the training log dir)")


@dataclasses.dataclass(frozen=True)
class ForwardConfig(Config):
    """The forward process (docs/method.md, 'Forward process'): every field changes the calibration
    statistics."""

    SECTION: ClassVar[str] = "forward"

    w: tuple[float, ...] = setting((), "guidance strength(s); several -> one forward pass, results per w, "
                                   "the paper's rule picks the primary one", changes=_BOTH)
    forward_steps: int = setting(600, "forward (noising) steps of the respaced chain", changes=_BOTH)
    modality: tuple[int, ...] = setting((0, 3), "channel indices used for the statistics", changes=_BOTH)
    encoding: str = setting("ddim", "deterministic DDIM or stochastic DDPM encoding", choices=ENCODINGS,
                            changes=_BOTH)
    ugp: str = setting("null", "null (paper Eq. 10) or healthy_w0 (upstream code)", choices=UGP_MODES,
                       changes=_BOTH)
    legacy_indexing: bool = setting(False, "upstream's off-by-one step indexing", changes=_BOTH)
    clip_denoised: bool = setting(True, "clip predicted x_0 to [-1, 1]", changes=_BOTH)
    dynamic_clip: bool = setting(False, "dynamic (quantile) clipping of x_0", changes=_BOTH)
    precision: str = setting("fp32", "precision of the network calls (autocast; statistics, inversion and "
                             "accumulators stay fp32); fp16 needs CUDA", choices=PRECISIONS, changes=_BOTH)
    early_stop_patience: int = setting(0, "K > 0: stop a batch's forward process once every tracked M_t has "
                                       "stayed below its running maximum for K steps (changes results); "
                                       "0: off", changes=_BOTH)

    def validate(self) -> None:
        require(len(self.w) >= 1, "--w is required: give one or more guidance strengths, e.g. --w 2")
        for w in self.w:
            require_finite("w", w, 0.0)
        require(len(set(self.w)) == len(self.w), f"--w has repeated values {list(self.w)}")
        require(self.forward_steps >= 1, f"--forward_steps must be >= 1, got {self.forward_steps}")
        require(len(self.modality) >= 1, "--modality needs at least one channel index")
        require(all(m >= 0 for m in self.modality), f"--modality indices must be >= 0, got {self.modality}")
        require(len(set(self.modality)) == len(self.modality),
                f"--modality has repeated channel indices {list(self.modality)}")
        require(self.early_stop_patience >= 0,
                f"--early_stop_patience must be >= 0 (0 = off), got {self.early_stop_patience}")

    def settings_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of anofpdm.run_forward_process (all fields but w)."""
        out = self.to_dict()
        out.pop("w")
        return out


@dataclasses.dataclass(frozen=True)
class SegmentConfig(Config):
    """Segmentation of the forward statistics (docs/method.md, 'Segmentation') and the metrics options."""

    SECTION: ClassVar[str] = "segment"

    t_e_ratio: tuple[float, ...] = setting((1.0,), "end-step ratio(s); several -> results per ratio")
    median_filter: bool = setting(True, "5x5 median filter of the anomaly map")
    last_only: bool = setting(False, "use only the last step's map")
    subset_interval: int = setting(-1, "use every N-th step (-1: all)")
    legacy_segmentation: bool = setting(False, "upstream's quantile formula (with --use_gradient_sam also "
                                        "upstream's hard-coded linear schedule for B_t)")
    use_gradient_sam: bool = setting(False, "ablation (docs/method.md, 'Gradient-SAM ablation'): SAM_t from "
                                     "the guidance term (x̂h0 - x̂∅0)² / (B_t² (1 + w)²) instead of "
                                     "(x̂h0 - x0)²")
    use_gradient_para_sam: bool = setting(False, "with --use_gradient_sam: the guidance term undivided")
    legacy_metrics: bool = setting(False, "also report upstream's running metrics", changes=())
    min_cc_size: int = setting(-1, "drop predicted components of <= this many px; -1: the paper's 40 px at "
                               "128 px scaled by area to --image_size", changes=())

    def validate(self) -> None:
        require(len(self.t_e_ratio) >= 1, "--t_e_ratio needs at least one value")
        for r in self.t_e_ratio:
            require_finite("t_e_ratio", r)
            require(r > 0, f"--t_e_ratio must be > 0, got {r:g}")
        require(len(set(self.t_e_ratio)) == len(self.t_e_ratio), f"--t_e_ratio has repeated values "
                f"{list(self.t_e_ratio)}")
        require(not (self.last_only and self.subset_interval > 0),
                "--last_only True cannot be combined with --subset_interval > 0")
        require(self.subset_interval == -1 or self.subset_interval > 0,
                f"--subset_interval must be -1 (off) or > 0, got {self.subset_interval}")
        sam_mode_from_flags(self.use_gradient_sam, self.use_gradient_para_sam)  # para needs gradient
        require(self.min_cc_size >= -1, "--min_cc_size must be -1 (scale the paper's 40 px at 128 px to "
                f"--image_size) or >= 0, got {self.min_cc_size}")

    @property
    def sam_mode(self) -> str:
        """The SAM kind of run_forward_process: "default", "gradient" or "gradient_para"."""
        return sam_mode_from_flags(self.use_gradient_sam, self.use_gradient_para_sam)


_AUTO_HELP = ("; 'auto': sized to the device (CUDA: the largest power of two <= 256 that fits, halved for "
              "headroom; CPU: 8)")
BATCH_FLAGS = ("batch_size", "batch_size_val")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    """Data, splits, sizes, seed and outputs of one evaluation run."""

    SECTION: ClassVar[str] = "eval"

    data_dir: str = setting("", "preprocessed dataset root (data_splits/, npy_<split>/)")
    log_dir: str | None = setting(None, "output folder (default $OPENAI_LOGDIR)", changes=())
    seed: int = setting(0, "noise seed (per slice: seed, split, index)")
    num_slices_val: int | None = setting(None, "first N validation slices (default all)", changes=())
    batch_size_val: int | None = setting(32, "validation batch size" + _AUTO_HELP, changes=(),
                                         metavar="N|auto")
    num_slices: int | None = setting(None, "first N test slices (default all)", changes=())
    batch_size: int | None = setting(32, "test batch size" + _AUTO_HELP, changes=(), metavar="N|auto")
    calibration: str | None = setting(None, "reuse this calibration JSON instead of calibrating",
                                      changes=())
    resume: bool = setting(False, "continue a run in the same --log_dir (settings must match)", changes=())
    save_nifti: bool = setting(False, "write NIfTI volumes of maps and masks", changes=())
    save_data: bool = setting(False, "write arrays/ (.npz per setting)", changes=())
    num_panels: int = setting(8, "PNG panels in panels/", changes=())
    progress: bool = setting(True, "progress bars", changes=())
    selection_tolerance: float = setting(0.99, "several --w: largest w whose validation accuracy >= this "
                                         "* best (paper §4.2)", changes=())
    compile: bool = setting(False, "torch.compile the network (eager fallback with one logged line where "
                            "unsupported); changes results by float rounding only, so a resume must match it "
                            "but a calibration made without it is reused", changes=(RESULT,))

    def __post_init__(self) -> None:
        for flag in BATCH_FLAGS:  # "auto" (flag or run file) -> None: sized to the device at run time
            value = getattr(self, flag)
            if value is not None:
                object.__setattr__(self, flag, parse_batch_size(value, f"--{flag}"))
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update({flag: "auto" for flag in BATCH_FLAGS if out[flag] is None})
        return out

    def validate(self) -> None:
        require(bool(self.data_dir), "--data_dir is required")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        for flag in ("num_slices", "num_slices_val"):
            v = getattr(self, flag)
            require(v is None or v >= 1, f"--{flag} must be >= 1, got {v}")
        require(self.num_panels >= 0, f"--num_panels must be >= 0, got {self.num_panels}")
        require_finite("selection_tolerance", self.selection_tolerance)
        require(0.0 < self.selection_tolerance <= 1.0,
                f"--selection_tolerance must be in (0, 1], got {self.selection_tolerance}")


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """Everything one evaluation (or guidance-selection) run needs."""

    model: ModelConfig
    diffusion: DiffusionConfig
    checkpoint: CheckpointConfig
    forward: ForwardConfig
    eval: EvalConfig
    segment: SegmentConfig = dataclasses.field(default_factory=SegmentConfig)

    def configs(self) -> list[Config]:
        return [self.model, self.diffusion, self.checkpoint, self.forward, self.segment, self.eval]

    def record(self) -> dict[str, dict[str, Any]]:
        """The run file content: {section: fields}."""
        return {c.SECTION: c.to_dict() for c in self.configs()}

    def stats_settings(self) -> dict[str, Any]:
        """Every setting that changes the validation statistics except w and the checkpoint (the
        calibration match keys)."""
        out: dict[str, Any] = {}
        for c in (self.model, self.diffusion, self.forward, self.eval):
            out.update(c.settings(STATS))
        out.pop("w")
        return out

    @property
    def sam_mode(self) -> str:
        """The segmentation's SAM kind (SegmentConfig.sam_mode)."""
        return self.segment.sam_mode

    def result_settings(self) -> dict[str, Any]:
        """Every setting that changes a per-slice result (the resume fingerprint, with the checkpoint and
        the calibrations)."""
        out: dict[str, Any] = {}
        for c in (self.model, self.diffusion, self.forward, self.segment, self.eval):
            out.update(c.settings(RESULT))
        return out


# flags of the model/diffusion configs that change nothing at inference (eval mode, no loss)
INFERENCE_IGNORED = ("clf_free", "dropout", "use_checkpoint", "class_cond", "use_kl",
                     "rescale_learned_sigmas", "use_fp16")


def _enc(value: str) -> str:
    return "ddim" if str2bool(value) else "ddpm"


def _any(name: str, why: str) -> CompatFlag:
    return CompatFlag(name, accepted=("*",), note=why)


register_compat(
    CompatFlag("d_reverse", field="encoding", convert=_enc, note="True = --encoding ddim, False = ddpm"),
    _any("null", "the DDIM inversion is always unconditional"),
    _any("use_weighted_sampler", "evaluation reads slices in a fixed order"),
    _any("image_dir", "outputs go to the log dir"),
    _any("name", "the dataset is read from --data_dir"),
    CompatFlag("clf_free", accepted=(True,), note="the UNet only has classifier-free label layers; "
               "use --clf_free True"),
    CompatFlag("num_batches", note="use --num_slices (= num_batches x batch_size) instead"),
    CompatFlag("num_batches_val", note="use --num_slices_val (= num_batches_val x batch_size_val) instead"),
    *(_any(name, "it changes nothing at inference") for name in INFERENCE_IGNORED if name != "clf_free"),
)


# the sections of an evaluation's run record that an export keeps (its config.json "evaluation")
EVALUATION_SECTIONS: dict[str, type[Config]] = {"diffusion": DiffusionConfig, "forward": ForwardConfig,
                                                "segment": SegmentConfig, "eval": EvalConfig}
EVALUATION_PATH_FIELDS = ("data_dir", "log_dir", "calibration")


def evaluation_settings(record: Any, source: str) -> dict[str, dict[str, Any]]:
    """{section: fields} of the evaluation that produced an export's metrics, from its run record
    (metrics.json "run" "config"): every field that changes the statistics or the results, paths left out.

    Raises ValueError naming ``source`` when the record is not a run record."""
    names = EVALUATION_SECTIONS
    if not isinstance(record, dict) or not all(isinstance(record.get(k, {}), dict) for k in names):
        raise ValueError(f'{source}: "run" "config" is not an evaluation\'s run record (sections '
                         f"{', '.join(EVALUATION_SECTIONS)}); pass the metrics.json of translation_FPDM.py")
    out: dict[str, dict[str, Any]] = {}
    for name, cls in EVALUATION_SECTIONS.items():
        known = set(field_names(cls))
        cfg = cls.from_dict({k: v for k, v in (record.get(name) or {}).items() if k in known},
                            source=f"{source} section {name!r}")
        kept = {**cfg.settings(STATS), **cfg.settings(RESULT)}
        out[name] = {k: v for k, v in sorted(kept.items()) if k not in EVALUATION_PATH_FIELDS}
    return out
