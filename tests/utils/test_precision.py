"""Inference precision, early stop and compile options of the forward process (issue 11)."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from guided_diffusion.utils.precision import autocast, check_precision, maybe_compile, to_channels_last


class ToyEps(torch.nn.Module):
    """Class-conditional toy eps model whose divergence peaks early (at t around 5); counts calls."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
            self.pattern = torch.randn(1, 2, 8, 8, generator=g)
        self.calls: list[int] = []

    def forward(self, x, t, y=None, null=False):
        self.calls.append(int(x.shape[0]))
        null = torch.as_tensor(null, dtype=torch.bool).expand(x.shape[0])
        cond = torch.where(null, torch.zeros_like(y, dtype=x.dtype), 1.0 + y.to(x.dtype))
        wave = 1.0 / (1.0 + (t.to(x.dtype) - 5.0) ** 2)
        return torch.tanh(self.conv(x)) + 0.4 * (cond * wave)[:, None, None, None] * self.pattern


def make_diffusion(steps: int = 50) -> GaussianDiffusion:
    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )


def make_x0() -> torch.Tensor:
    return torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

KW = dict(ws=[1.0, 3.0], modality=[0, 1], forward_steps=30)


def _run(model, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    return run_forward_process(model, make_diffusion(), make_x0(), generator=gens, **{**KW, **kw})


def test_check_precision_names_the_flag():
    assert check_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, fp16"):
        check_precision("fp8")


def test_autocast_fp32_is_a_no_op_and_bf16_lowers_matmuls():
    a = torch.randn(8, 8)
    with autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_bf16_forward_process_keeps_fp32_statistics_and_agrees_with_fp32():
    ref = _run(ToyEps())
    low = _run(ToyEps(), precision="bf16")
    for name in ("mse_h", "mse_null", "div"):
        assert getattr(low, name).dtype == torch.float32
    assert low.agg["sum_incl"].dtype == torch.float32
    # bf16 network calls: close to fp32, but not identical (the option really changes the arithmetic)
    assert not torch.equal(ref.div, low.div)
    scale = ref.div.abs().max()
    assert (ref.div - low.div).abs().max() <= 0.05 * scale


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="--precision"):
        _run(ToyEps(), precision="half")


def test_early_stop_off_by_default_runs_every_step():
    res = _run(ToyEps())
    assert res.steps_run == KW["forward_steps"]


def test_early_stop_stops_after_the_peaks_and_keeps_them():
    full = _run(ToyEps())
    model = ToyEps()
    early = _run(model, early_stop_patience=5)
    assert early.steps_run < KW["forward_steps"]
    assert early.steps_run % 5 == 0
    # one network call per step: the stopped run made fewer calls
    assert len(model.calls) == early.steps_run
    # every tracked M_t was past its maximum by >= 5 steps, so the end steps are the full run's
    assert torch.equal(early.end_step, full.end_step)
    n = early.steps_run
    assert torch.equal(early.div[:, :, :n], full.div[:, :, :n])
    # the remaining entries hold the last computed value
    assert torch.equal(early.div[:, :, n:], early.div[:, :, n - 1 : n].expand_as(early.div[:, :, n:]))


def test_early_stop_patience_must_be_non_negative():
    with pytest.raises(ValueError, match="early_stop_patience"):
        _run(ToyEps(), early_stop_patience=-1)


def test_maybe_compile_disabled_returns_the_model_and_failure_falls_back(monkeypatch):
    m = torch.nn.Linear(2, 2)
    assert maybe_compile(m, False) is m

    def broken(*a, **k):
        raise RuntimeError("no backend")

    monkeypatch.setattr(torch, "compile", broken)
    lines: list[str] = []
    assert maybe_compile(m, True, log=lines.append) is m
    assert len(lines) == 1 and "running eagerly" in lines[0] and "no backend" in lines[0]


def test_channels_last_keeps_outputs():
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 8, 8)
    ref = conv(x)
    out = to_channels_last(conv)(x.contiguous(memory_format=torch.channels_last))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_batch_size_flag_parsing():
    from guided_diffusion.utils.batch_size import parse_batch_size

    assert parse_batch_size("auto") is None and parse_batch_size("16") == 16 and parse_batch_size(4) == 4
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="--batch_size must be a positive integer or 'auto'"):
            parse_batch_size(bad)


def test_auto_batch_size_cpu_rule_and_cuda_search(monkeypatch):
    from guided_diffusion.utils import batch_size as bs

    assert bs.auto_batch_size(lambda n: None, "cpu", cpu_batch=6) == 6
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    tried: list[int] = []

    def probe(n: int) -> None:  # "fits" up to 24 slices
        tried.append(n)
        if n > 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert bs.auto_batch_size(probe, "cuda") == 8  # largest power of two that fit (16), halved
    assert tried == [1, 2, 4, 8, 16, 32]
    assert bs.auto_batch_size(probe, "cuda", max_batch=16) == 16  # the cap fits: no halving

    def broken(n: int) -> None:
        raise RuntimeError("illegal memory access")

    with pytest.raises(RuntimeError, match="illegal"):
        bs.auto_batch_size(broken, "cuda")


# ------------------------------------------------------------------------------------------ no host sync
@pytest.mark.parametrize("ver", ["v2", "hae", "hae_lite", "hae_v2"])
@pytest.mark.parametrize("variant", [{}, {"legacy_indexing": True}, {"encoding": "ddpm"},
                                     {"keep_sam_stack": True, "subset_interval": 2}])
def test_forward_process_step_loop_never_reads_device_values(ver, variant):
    """The whole forward process runs on the ``meta`` device, which holds no data: any host read of a
    device value in the step loop (``.item()``, ``int(t.max())``, ``bool(mask.any())``, ``.cpu()``) would
    raise there. On CUDA that same read is a host-device synchronisation per step (issue 11), and so is
    a blocking host-to-device copy (a schedule or timestep map moved per call): those are recorded."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from guided_diffusion import script_util as su

    aten = torch.ops.aten

    class BlockingUploads(TorchDispatchMode):
        """Records host-to-device copies that wait for the device (non_blocking False)."""

        def __init__(self):
            super().__init__()
            self.seen: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten._to_copy.default and args[0].device.type == "cpu":
                dev = kwargs.get("device")
                if dev is not None and torch.device(dev).type != "cpu" and not kwargs.get("non_blocking"):
                    self.seen.append(tuple(args[0].shape))
            elif func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
                if not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                    self.seen.append(tuple(args[1].shape))
            return func(*args, **kwargs)

    class ListIndexing(TorchFunctionMode):
        """Records ``x[..., [0, 3]]`` on a device tensor: the list becomes an index tensor that is made
        on the host and uploaded with a blocking copy, below what a dispatch mode sees."""

        def __init__(self):
            super().__init__()
            self.seen: list[object] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].device.type != "cpu":
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                self.seen += [i for i in index if isinstance(i, list)
                              or (isinstance(i, torch.Tensor) and i.device.type == "cpu" and i.dim() > 0)]
            return func(*args, **(kwargs or {}))

    model, diffusion = su.create_model_and_diffusion(
        unet_ver=ver, image_size=16, num_channels=16, channel_mult="1,2", attention_resolutions="8",
        num_heads=1, num_res_blocks=1, class_cond=True, num_classes=2, in_channels=4, diffusion_steps=50,
        timestep_respacing="25")
    model.to("meta").eval()
    x0 = torch.zeros(2, 4, 16, 16, device="meta")
    kw = dict(ws=[1.0, 2.0], modality=[0, 3], forward_steps=6, **variant)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    run_forward_process(model, diffusion, x0, generator=gens, **kw)  # first use: tables move to the device
    with BlockingUploads() as uploads, ListIndexing() as list_indexing:
        fr = run_forward_process(model, diffusion, x0, generator=gens, **kw)
    assert fr.div.device.type == "meta" and fr.div.shape == (2, 2, 6, 2) and fr.calls == 6
    assert uploads.seen == []
    assert list_indexing.seen == []


def test_schedule_lookups_are_cached_per_device_and_keep_their_values():
    """_extract reads a per-device copy of the schedule (built once) with the values of a float64 lookup."""
    diffusion = make_diffusion()
    t = torch.tensor([0, 7, 49])
    x = torch.zeros(3, 2, 4, 4)
    got = diffusion._extract(diffusion.sqrt_alphas_cumprod, t, x)
    want = torch.from_numpy(diffusion.sqrt_alphas_cumprod)[t].float()
    assert torch.equal(got.flatten(), want) and got.shape == (3, 1, 1, 1)
    table = diffusion._table(diffusion.sqrt_alphas_cumprod, x.device, x.dtype)
    assert diffusion._table(diffusion.sqrt_alphas_cumprod, x.device, x.dtype) is table
    with pytest.raises(ValueError, match=r"timesteps t must lie in \[0, 49\].*\[0, 50\]"):
        diffusion._extract(diffusion.sqrt_alphas_cumprod, torch.tensor([0, 50, 1]), x)
