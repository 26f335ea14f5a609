"""Forward process, segmentation and calibration of AnoFPDM on toy models and hand-made sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guided_diffusion.anofpdm.calibration import Q_GRID, calibrate, cos_threshold, select_guidance
from guided_diffusion.anofpdm.forward import forward_result_from_stacks, run_forward_process
from guided_diffusion.anofpdm.segmentation import QUANTILE_GRID, aggregation_steps, quantile_index, segment
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)


class ToyEps(torch.nn.Module):
    """Tiny per-sample eps model: conv(x) modulated by t, plus a class-dependent offset; counts calls."""

    num_classes = 2

    def __init__(self, channels: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)
            self.pattern = torch.randn(1, channels, 8, 8, generator=g)
        self.calls: list[int] = []
        self.seen: list[tuple] = []

    def forward(self, x, t, y=None, null=False):
        self.calls.append(int(x.shape[0]))
        null = torch.as_tensor(null, dtype=torch.bool).expand(x.shape[0])
        cond = torch.where(null, torch.zeros_like(y, dtype=x.dtype), 1.0 + y.to(x.dtype))
        self.seen.append((t.clone(), null.clone()))
        scale = 1.0 + 0.002 * t.to(x.dtype)[:, None, None, None]
        centre = 2.5 + 10.0 * x.mean(dim=(1, 2, 3))  # per-sample bump -> divergence peaks at different t
        wave = 1.0 / (1.0 + (t.to(x.dtype) - centre) ** 2)
        return torch.tanh(self.conv(x) * scale) + 0.4 * (cond * wave)[:, None, None, None] * self.pattern


def make_diffusion(steps: int = 50) -> GaussianDiffusion:
    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )


def make_x0(b: int = 3, c: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, 8, 8, generator=g) * 2 - 1


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


S = 6


def test_faithful_one_call_per_step_on_2b():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    fr = run_forward_process(model, diff, x0, ws=[2.0], modality=[0, 1], forward_steps=S, generator=gen())
    assert fr.calls == S and model.calls == [2 * 3] * S
    assert fr.mse_h.shape == (3, 1, S, 2) and fr.div.shape == (3, 1, S, 2) and fr.mse_null.shape == (3, S, 2)
    # the timesteps seen by the net are t for both halves; the second half is null
    for t, (ts, null) in enumerate(model.seen):
        assert (ts == t).all() and null.tolist() == [False] * 3 + [True] * 3


def _reference_faithful(model, diff, x0, w, noise, ugp="null"):
    """Direct loop with separate calls: HGP, UGP and a correct DDIM inversion (index t -> level t+1)."""
    b = x0.shape[0]
    y = torch.zeros(b, dtype=torch.long)
    x = diff.q_sample(x0, torch.zeros(b, dtype=torch.long), noise=noise)
    hs, ns = [], []
    for t in range(S):
        tt = torch.full((b,), t, dtype=torch.long)
        hs.append(diff.ddim_sample(model, x, tt, w=w, model_kwargs={"y": y})["pred_xstart"])
        kw = {"y": y, "null": torch.ones(b, dtype=torch.bool)} if ugp == "null" else {"y": y}
        ns.append(diff.ddim_sample(model, x, tt, w=None, model_kwargs=kw)["pred_xstart"])
        x = diff.ddim_reverse_sample(
            model, x, tt, model_kwargs={"y": y, "null": torch.ones(b, dtype=torch.bool)}
        )["sample"]
    return torch.stack(hs, 1), torch.stack(ns, 1)


def _reference_upstream(model, diff, x0, w, noise):
    """Upstream calc_pred_xstart_loop: off-by-one inversion, UGP = w=0 conditional, 4 separate calls."""
    b = x0.shape[0]
    y = torch.zeros(b, dtype=torch.long)
    null_kw = {"y": y, "null": torch.ones(b, dtype=torch.bool)}
    hs, ns = [], []
    x = None
    for t in range(S):
        tt = torch.full((b,), t, dtype=torch.long)
        if t == 0:
            x = diff.q_sample(x0, tt, noise=noise)
        else:
            x = diff.ddim_reverse_sample(model, x, tt, model_kwargs=null_kw)["sample"]
        hs.append(diff.ddim_sample(model, x, tt, w=w, model_kwargs={"y": y})["pred_xstart"])
        ns.append(diff.ddim_sample(model, x, tt, w=None, model_kwargs={"y": y})["pred_xstart"])
    return torch.stack(hs, 1), torch.stack(ns, 1)


@pytest.mark.parametrize("ugp", ["null", "healthy_w0"])
def test_faithful_matches_direct_loop(ugp):
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    noise = torch.randn(x0.shape, generator=gen())
    fr = run_forward_process(
        model,
        diff,
        x0,
        ws=[1.5],
        modality=[0, 1],
        forward_steps=S,
        generator=gen(),
        keep_xstarts=True,
        ugp=ugp,
    )
    ref_h, ref_n = _reference_faithful(model, diff, x0, 1.5, noise, ugp=ugp)
    torch.testing.assert_close(fr.xstart_h[:, 0], ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fr.xstart_null, ref_n, atol=1e-5, rtol=1e-5)


def test_legacy_indexing_matches_upstream_loop_and_call_patterns():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    noise = torch.randn(x0.shape, generator=gen())
    kw = dict(
        ws=[2.0], modality=[0, 1], forward_steps=S, legacy_indexing=True, ugp="healthy_w0", keep_xstarts=True
    )
    fr = run_forward_process(model, diff, x0, generator=gen(), **kw)
    assert model.calls == [9] * (S - 1) + [6]  # one call on 3B per step (2B at the last step)
    ref_h, ref_n = _reference_upstream(model, diff, x0, 2.0, noise)
    torch.testing.assert_close(fr.xstart_h[:, 0], ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fr.xstart_null, ref_n, atol=1e-5, rtol=1e-5)
    model.calls.clear()
    up = run_forward_process(model, diff, x0, generator=gen(), call_pattern="upstream", **kw)
    assert up.calls == 4 * S - 1 and model.calls == [3] * (4 * S - 1)
    torch.testing.assert_close(up.xstart_h, fr.xstart_h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(up.xstart_null, fr.xstart_null, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(up.div, fr.div)


def test_faithful_upstream_pattern_same_sequences():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    a = run_forward_process(
        model, diff, x0, ws=[2.0], modality=[1], forward_steps=S, generator=gen(), keep_xstarts=True
    )
    b = run_forward_process(
        model, diff, x0, ws=[2.0], modality=[1], forward_steps=S, generator=gen(), call_pattern="upstream"
    )
    assert b.calls == 4 * S - 1
    torch.testing.assert_close(a.xstart_h, b.xstart_h, atol=1e-6, rtol=1e-6)
    assert b.state_bytes() > a.state_bytes() - a.xstart_h.numel() * 4 * 2


def test_ugp_modes_equal_w0_and_null_predictions():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    h = run_forward_process(
        model,
        diff,
        x0,
        ws=[0.0, 2.0],
        modality=[0, 1],
        forward_steps=S,
        generator=gen(),
        ugp="healthy_w0",
        keep_xstarts=True,
    )
    torch.testing.assert_close(h.xstart_null, h.xstart_h[:, 0], atol=0, rtol=0)
    n = run_forward_process(
        model,
        diff,
        x0,
        ws=[-1.0, 2.0],
        modality=[0, 1],
        forward_steps=S,
        generator=gen(),
        ugp="null",
        keep_xstarts=True,
    )
    torch.testing.assert_close(n.xstart_null, n.xstart_h[:, 0], atol=0, rtol=0)
    # only the UGP differs between the two modes: the HGP for w=2 is identical
    torch.testing.assert_close(n.xstart_h[:, 1], h.xstart_h[:, 1], atol=0, rtol=0)
    assert not torch.allclose(n.xstart_null, h.xstart_null)


def test_list_of_w_equals_single_passes():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    ws = [0.5, 2.0, 5.0]
    multi = run_forward_process(model, diff, x0, ws=ws, modality=[0, 1], forward_steps=S, generator=gen())
    assert multi.calls == S
    for i, w in enumerate(ws):
        one = run_forward_process(model, diff, x0, ws=[w], modality=[0, 1], forward_steps=S, generator=gen())
        torch.testing.assert_close(multi.mse_h[:, i], one.mse_h[:, 0], atol=0, rtol=0)
        torch.testing.assert_close(multi.div[:, i], one.div[:, 0], atol=0, rtol=0)
        torch.testing.assert_close(multi.agg["sum_incl"][:, i], one.agg["sum_incl"][:, 0], atol=0, rtol=0)
        assert multi.w_index(w) == i
    torch.testing.assert_close(multi.mse_null, one.mse_null, atol=0, rtol=0)
    with pytest.raises(ValueError, match="ws="):
        multi.w_index(7.0)


def test_online_aggregates_equal_stack_computation():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0(b=4)
    fr = run_forward_process(
        model,
        diff,
        x0,
        ws=[1.0, 3.0],
        modality=[0, 1],
        forward_steps=S,
        generator=gen(),
        keep_xstarts=True,
        subset_interval=2,
        keep_sam_stack=True,
    )
    sam = (fr.xstart_h - x0[:, None, None]) ** 2  # [B, nW, S, M, H, W]
    div = ((fr.xstart_h - fr.xstart_null[:, None]) ** 2).mean(dim=(-2, -1))
    torch.testing.assert_close(fr.div, div)
    te = div.argmax(dim=2)
    torch.testing.assert_close(fr.end_step, te)
    torch.testing.assert_close(fr.sam_stack.float(), sam, atol=2e-3, rtol=1e-3)
    for b in range(4):
        for wi in range(2):
            for m in range(2):
                e = int(te[b, wi, m])
                seq = sam[b, wi, :, m]
                torch.testing.assert_close(
                    fr.agg["sum_incl"][b, wi, m], seq[: e + 1].sum(0), atol=1e-6, rtol=1e-5
                )
                torch.testing.assert_close(fr.agg["sum_excl"][b, wi, m], seq[:e].sum(0), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(fr.agg["sam_te"][b, wi, m], seq[e])
                torch.testing.assert_close(fr.agg["sam_prev"][b, wi, m], seq[max(e - 1, 0)])
                torch.testing.assert_close(
                    fr.agg["grid_excl"][b, wi, m], seq[0:e:2].sum(0), atol=1e-6, rtol=1e-5
                )
    assert fr.end_step.unique().numel() > 1  # the check covered different end steps


def test_ddpm_encoding_and_per_sample_generators():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    a = run_forward_process(
        model, diff, x0, ws=[2.0], modality=[0], forward_steps=S, encoding="ddpm", generator=gens()
    )
    assert a.calls == S and set(a.samples_per_call) == {6}
    b = run_forward_process(
        model, diff, x0, ws=[2.0], modality=[0], forward_steps=S, encoding="ddpm", generator=gens()
    )
    torch.testing.assert_close(a.mse_h, b.mse_h, atol=0, rtol=0)
    # sample 1 alone with its own generator gives the same statistics as inside the batch
    c = run_forward_process(
        model,
        diff,
        x0[1:2],
        ws=[2.0],
        modality=[0],
        forward_steps=S,
        encoding="ddpm",
        generator=[torch.Generator().manual_seed(101)],
    )
    torch.testing.assert_close(c.mse_h[0], a.mse_h[1], atol=1e-6, rtol=1e-6)
    d = run_forward_process(
        model,
        diff,
        x0,
        ws=[2.0],
        modality=[0],
        forward_steps=S,
        encoding="ddpm",
        generator=[torch.Generator().manual_seed(7 + i) for i in range(3)],
    )
    assert not torch.allclose(d.mse_h, a.mse_h)


def test_forward_bad_inputs():
    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    with pytest.raises(ValueError, match="modality"):
        run_forward_process(model, diff, x0, ws=[1.0], modality=[5], forward_steps=S)
    with pytest.raises(ValueError, match="forward_steps"):
        run_forward_process(model, diff, x0, ws=[1.0], modality=[0], forward_steps=50)
    with pytest.raises(ValueError, match="encoding"):
        run_forward_process(model, diff, x0, ws=[1.0], modality=[0], forward_steps=S, encoding="x")
    with pytest.raises(ValueError, match="ws"):
        run_forward_process(model, diff, x0, ws=[], modality=[0], forward_steps=S)


# ---------------------------------------------------------------- segmentation on hand-made sequences


def _handmade(divs, h=16, seed=0):
    """One sample, M = len(divs) modalities; HGP sequence chosen so that M_t = divs[m][t] exactly.

    x0 = 0 and UGP = 0, so SAM_t = x̂h0,t² and M_t = mean(x̂h0,t²); x̂h0,t = sqrt(div_t) * u with mean(u²)=1.
    """
    g = torch.Generator().manual_seed(seed)
    m, steps = len(divs), len(divs[0])
    u = torch.randn(m, h, h, generator=g)
    u = u / u.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
    xh = torch.stack([torch.stack([math.sqrt(divs[j][t]) * u[j] for j in range(m)]) for t in range(steps)])
    x0 = torch.zeros(1, m, h, h)
    return x0, xh[None].double().float(), torch.zeros(1, steps, m, h, h)


def test_quantile_index_fixed_vs_legacy():
    s = torch.tensor([0.0, 1.0, 0.29, 0.5])
    assert quantile_index(s).tolist() == [0, 100, 29, 50]
    # upstream int(round(s, 2) * 100) on float32 tensors (docs/method.md, 'Quantile index rounding'):
    # 0.53 -> 52, 0.59 -> 58,
    # while 0.29, 0.57, 0.58 stay exact (a float64 computation would give 28, 56, 57 instead)
    named = torch.tensor([0.29, 0.53, 0.57, 0.58, 0.59])
    assert quantile_index(named, legacy=True).tolist() == [29, 52, 57, 58, 58]
    assert quantile_index(named).tolist() == [29, 53, 57, 58, 59]
    grid = torch.arange(101, dtype=torch.float64) / 100
    legacy = quantile_index(grid.float(), legacy=True)
    off = [i for i in range(101) if legacy[i].item() != i]
    assert off == [53, 59] and legacy[53].item() == 52 and legacy[59].item() == 58
    assert quantile_index(grid).tolist() == list(range(101))
    assert QUANTILE_GRID[0].item() == pytest.approx(0.98) and QUANTILE_GRID[100].item() == pytest.approx(0.90)
    assert QUANTILE_GRID[29].item() == pytest.approx(0.98 - 0.29 * 0.08, abs=1e-6)


def test_segmentation_end_step_aggregation_and_quantiles():
    divs = [[0.1, 0.3, 0.9, 0.2, 0.1], [0.2, 0.8, 0.4, 0.3, 0.1]]
    x0, xh, xn = _handmade(divs)
    fr = forward_result_from_stacks(x0, xh, xn, ws=[2.0], keep_sam_stack=True)
    assert fr.end_step[0, 0].tolist() == [2, 1]
    sam = xh[0] ** 2  # [S, M, H, W]
    fixed = segment(fr, thr_01=0.0, diff_max=[0.9, 0.8 / 0.29], median_filter=False)
    legacy = segment(fr, thr_01=0.0, diff_max=[0.9, 0.8 / 0.29], median_filter=False, legacy=True)
    # modality 0: s = 1 -> q 0.90; modality 1: s = 0.29 -> index 29 in both modes (float32 upstream)
    assert fixed.quantile[0].tolist() == pytest.approx([0.90, QUANTILE_GRID[29].item()])
    assert legacy.quantile[0].tolist() == pytest.approx([0.90, QUANTILE_GRID[29].item()])
    # s = 0.53: index 53 (fixed) / 52 (legacy, upstream's float32 truncation)
    f53 = segment(fr, thr_01=0.0, diff_max=[0.9, 0.8 / 0.53], median_filter=False)
    l53 = segment(fr, thr_01=0.0, diff_max=[0.9, 0.8 / 0.53], median_filter=False, legacy=True)
    assert f53.quantile[0, 1].item() == pytest.approx(QUANTILE_GRID[53].item())
    assert l53.quantile[0, 1].item() == pytest.approx(QUANTILE_GRID[52].item())
    inc = (sam[:3, 0].mean(0) + sam[:2, 1].mean(0)) / 2
    exc = (sam[:2, 0].mean(0) + sam[:1, 1].mean(0)) / 2
    torch.testing.assert_close(fixed.anomaly_map[0, 0], inc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(legacy.anomaly_map[0, 0], exc, atol=1e-5, rtol=1e-5)
    thr = (
        torch.quantile(sam[:3, 0].mean(0).reshape(-1), 0.90)
        + torch.quantile(sam[:2, 1].mean(0).reshape(-1), QUANTILE_GRID[29])
    ) / 2
    assert fixed.threshold[0].item() == pytest.approx(thr.item(), rel=1e-5)
    torch.testing.assert_close(fixed.mask_all[0, 0], (inc >= fixed.threshold[0]).float())
    assert fixed.end_steps[0].tolist() == [2, 1]
    # last_only: S_te uses t_e (fixed) / t_e - 1 (legacy)
    lf = segment(fr, thr_01=0.0, diff_max=[1, 1], median_filter=False, last_only=True)
    ll = segment(fr, thr_01=0.0, diff_max=[1, 1], median_filter=False, last_only=True, legacy=True)
    torch.testing.assert_close(lf.anomaly_map[0, 0], (sam[2, 0] + sam[1, 1]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ll.anomaly_map[0, 0], (sam[1, 0] + sam[0, 1]) / 2, atol=1e-5, rtol=1e-5)
    # t_e_ratio from the float16 stack: t_e = round(2 * 2) = 4, round(1 * 2) = 2
    r = segment(fr, thr_01=0.0, diff_max=[1, 1], median_filter=False, t_e_ratio=2.0)
    assert r.end_steps[0].tolist() == [4, 2]
    torch.testing.assert_close(
        r.anomaly_map[0, 0], (sam[:5, 0].mean(0) + sam[:3, 1].mean(0)) / 2, atol=2e-3, rtol=2e-3
    )
    # the stack path with ratio 1-equivalent values agrees with the online path
    assert aggregation_steps(2, 5) == [0, 1, 2] and aggregation_steps(2, 5, legacy=True) == [0, 1]
    assert aggregation_steps(4, 5, interval=3) == [0, 3, 4]


def test_segmentation_three_modalities_and_te_zero_no_nan():
    divs = [[0.9, 0.3, 0.2], [0.5, 0.8, 0.1], [0.9, 0.1, 0.1]]
    x0, xh, xn = _handmade(divs)
    fr = forward_result_from_stacks(x0, xh, xn, ws=[1.0])
    for legacy in (False, True):
        for last_only in (False, True):
            out = segment(fr, thr_01=0.5, diff_max=[1, 1, 1], legacy=legacy, last_only=last_only)
            assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.threshold).all()
            assert out.end_steps.shape == (1, 3)
    assert fr.end_step[0, 0].tolist() == [0, 1, 0]


def test_segmentation_gating_and_median_filter():
    divs = [[0.1, 0.5, 0.2]]
    x0, xh, xn = _handmade(divs)
    xh = xh.repeat(2, 1, 1, 1, 1, 1)
    x0, xn = x0.repeat(2, 1, 1, 1), xn.repeat(2, 1, 1, 1, 1)
    fr = forward_result_from_stacks(x0, xh, xn, ws=[1.0])
    # sample 1: UGP error sequence made different so its cosine drops below the threshold
    fr.mse_null[0] = fr.mse_h[0, 0]
    fr.mse_null[1, :, 0] = torch.tensor([1.0, 0.0, 0.0])
    out = segment(fr, thr_01=0.9, diff_max=[0.5], median_filter=True)
    assert out.pred_lab.tolist() == [0, 1]
    assert out.mask[0].sum() == 0 and torch.equal(out.mask[1], out.mask_all[1])
    raw = segment(fr, thr_01=0.9, diff_max=[0.5], median_filter=False)
    # about 10 % of the pixels (q = 0.90 for s = 1) are above the unfiltered threshold
    assert 0.05 < raw.mask_all[0].mean() < 0.15 and raw.mask[0].sum() == 0
    assert not torch.allclose(raw.anomaly_map, out.anomaly_map)
    torch.testing.assert_close(out.anomaly_map, _torch_reflect_median5(raw.anomaly_map))
    with pytest.raises(ValueError, match="diff_max"):
        segment(fr, thr_01=0.9, diff_max=[0.5, 1.0])
    with pytest.raises(ValueError, match="keep_sam_stack"):
        segment(fr, thr_01=0.9, diff_max=[0.5], t_e_ratio=2.0)


def _torch_reflect_median5(amap: torch.Tensor) -> torch.Tensor:
    """Reference: upstream's median pool, torch F.pad(mode="reflect") by 2 then the median of each 5x5."""
    padded = torch.nn.functional.pad(amap, (2, 2, 2, 2), mode="reflect")
    patches = padded.unfold(2, 5, 1).unfold(3, 5, 1)  # [B, C, H, W, 5, 5]
    return patches.reshape(*patches.shape[:4], 25).median(dim=-1).values


@pytest.mark.parametrize("legacy", [False, True])
def test_median_filter_pads_like_torch_reflect(legacy):
    """The 5x5 median filter must not repeat the edge pixel (torch reflect = scipy "mirror")."""
    from scipy.ndimage import median_filter

    g = torch.Generator().manual_seed(3)
    u = torch.rand(1, 1, 12, 12, generator=g) + 0.1
    divs = [[0.2, 0.7, 0.4]]
    xh = torch.stack([math.sqrt(d) * u[0] for d in divs[0]])[None, None]  # [1, 1, S, 1, H, W]
    fr = forward_result_from_stacks(torch.zeros(1, 1, 12, 12), xh, torch.zeros(1, 3, 1, 12, 12), ws=[1.0])
    raw = segment(fr, thr_01=0.0, diff_max=[0.7], median_filter=False, legacy=legacy)
    out = segment(fr, thr_01=0.0, diff_max=[0.7], median_filter=True, legacy=legacy)
    ref = _torch_reflect_median5(raw.anomaly_map)
    torch.testing.assert_close(out.anomaly_map, ref)
    torch.testing.assert_close(out.mask_all, (ref >= out.threshold[:, None, None, None]).float())
    # the edge-repeating scipy "reflect" differs from it in the outer 2 px (so this test can fail)
    repeated = torch.from_numpy(median_filter(raw.anomaly_map.numpy(), size=(1, 1, 5, 5), mode="reflect"))
    assert not torch.allclose(repeated, ref)
    torch.testing.assert_close(repeated[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2])


def test_segmentation_interval_online_matches_stack():
    divs = [[0.1, 0.2, 0.3, 0.4, 0.9, 0.2, 0.1]]
    x0, xh, xn = _handmade(divs)
    fr = forward_result_from_stacks(x0, xh, xn, ws=[1.0], subset_interval=3, keep_sam_stack=True)
    sam = xh[0, :, 0] ** 2
    on = segment(fr, thr_01=0.0, diff_max=[1.0], subset_interval=3, median_filter=False)
    torch.testing.assert_close(on.anomaly_map[0, 0], (sam[0] + sam[3] + sam[4]) / 3, atol=1e-5, rtol=1e-5)
    st = segment(fr, thr_01=0.0, diff_max=[1.0], subset_interval=3, median_filter=False, t_e_ratio=1.0 + 1e-9)
    torch.testing.assert_close(st.anomaly_map, on.anomaly_map, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- calibration


def _seqs_with_cos(cos_values):
    """[N, 2, 1] sequence pairs whose cosine similarity is exactly the given values."""
    c = torch.tensor(cos_values, dtype=torch.float64)
    a = torch.stack([torch.ones_like(c), torch.zeros_like(c)], 1)[..., None]
    b = torch.stack([c, (1 - c**2).clamp(min=0).sqrt()], 1)[..., None]
    return a.float(), b.float()


def test_calibration_threshold_nmin_and_diff_ranges():
    cos0 = [0.5] + torch.linspace(0.97, 0.99, 99).tolist()
    cos1 = torch.linspace(0.6, 0.9, 10).tolist()
    thr, n, q = cos_threshold(torch.tensor(cos0), torch.tensor(cos1))
    assert n == 1 and q == pytest.approx(Q_GRID[4].item())
    assert thr == pytest.approx(
        torch.quantile(torch.tensor(cos0, dtype=torch.float64), Q_GRID[4].item()).item()
    )
    assert 0.9 < thr < 0.97
    mse_h, mse_null = _seqs_with_cos(cos0 + cos1)
    labels = [0] * 100 + [1] * 10
    div = torch.zeros(110, 2, 2)
    div[100:, 1, 0] = torch.linspace(0.01, 0.05, 10)
    div[100:, 0, 1] = torch.linspace(0.02, 0.03, 10)
    div[:100] = 9.0  # healthy samples never enter the diff ranges
    cal = calibrate(
        mse_h.expand(-1, -1, 2),
        mse_null.expand(-1, -1, 2),
        div,
        labels,
        w=2.0,
        forward_steps=2,
        modality=[0, 3],
        checkpoint_sha256="abc",
    )
    assert cal.n_min == 1 and cal.accuracy == pytest.approx(1 - 1 / 110)
    assert cal.thr_01 == pytest.approx(thr, abs=1e-6)
    assert cal.diff_min == pytest.approx([0.01, 0.02]) and cal.diff_max == pytest.approx([0.05, 0.03])
    back = Calibration.from_json(cal.to_json())
    assert back == cal
    back.check_matches({"w": 2.0, "forward_steps": 2, "modality": [0, 3], "checkpoint_sha256": "abc"})
    with pytest.raises(ValueError, match="ugp"):
        back.check_matches({"ugp": "healthy_w0", "w": 2.0})
    with pytest.raises(ValueError, match="w: calibration has 2.0"):
        back.check_matches({"w": 3.0})


def test_calibration_needs_both_classes():
    mse_h, mse_null = _seqs_with_cos([0.9, 0.95])
    with pytest.raises(ValueError, match="healthy AND unhealthy"):
        calibrate(mse_h, mse_null, torch.zeros(2, 2, 1), [0, 0], w=1.0, forward_steps=2, modality=[0])


def _cal(w, acc):
    return Calibration(
        thr_01=0.9,
        n_min=0,
        accuracy=acc,
        q=0.005,
        diff_min=[0.0],
        diff_max=[1.0],
        n_val=100,
        n_healthy=50,
        n_unhealthy=50,
        w=w,
        forward_steps=10,
        modality=[0],
    )


def test_select_guidance_largest_w_within_one_percent():
    cals = {1.0: _cal(1.0, 0.90), 2.0: _cal(2.0, 0.95), 3.0: _cal(3.0, 0.942), 5.0: _cal(5.0, 0.93)}
    w, table = select_guidance(cals)
    assert w == 3.0 and [r["w"] for r in table] == [1.0, 2.0, 3.0, 5.0]
    assert [r["selected"] for r in table] == [False, False, True, False]


# ------------------------------------------ gradient-SAM ablation (docs/method.md, 'Gradient-SAM ablation')


def _bt(abar):
    abar = torch.as_tensor(abar, dtype=torch.float64)
    return ((1 - abar) / abar.sqrt()).float()


def test_gradient_sam_scale_model_schedule_vs_legacy_linear():
    from guided_diffusion.anofpdm.gradient_sam import gradient_sam_scale
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    diff = make_diffusion(50)  # "linear" at 50 steps: betas scaled by 1000/50, not upstream's 1e-4..0.02
    fixed = gradient_sam_scale(diff, S, [0.0, 2.0], sam_mode="gradient")
    bt = _bt(diff.alphas_cumprod[:S])
    torch.testing.assert_close(fixed, 1 / (bt[:, None] ** 2 * torch.tensor([1.0, 9.0])[None]))
    legacy = gradient_sam_scale(diff, S, [0.0, 2.0], sam_mode="gradient", legacy_schedule=True)
    bt_up = _bt(np.cumprod(1 - np.linspace(1e-4, 0.02, 50))[:S])
    torch.testing.assert_close(legacy, 1 / (bt_up[:, None] ** 2 * torch.tensor([1.0, 9.0])[None]))
    assert not torch.allclose(fixed, legacy)
    # a respaced model: B_t from its own (respaced) alphas_cumprod at the forward-step indices
    spaced = SpacedDiffusion(
        use_timesteps=space_timesteps(1000, "10"),
        betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    sp = gradient_sam_scale(spaced, 4, [1.0], sam_mode="gradient")
    torch.testing.assert_close(sp[:, 0], 1 / (_bt(spaced.alphas_cumprod[:4]) ** 2 * 4.0))
    up = gradient_sam_scale(spaced, 4, [1.0], sam_mode="gradient", legacy_schedule=True)  # 1000-step linear
    bt_1000 = _bt(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[:4])
    torch.testing.assert_close(up[:, 0], 1 / (bt_1000**2 * 4))
    assert gradient_sam_scale(diff, S, [1.0], sam_mode="default") is None
    assert torch.equal(gradient_sam_scale(diff, S, [1.0, 3.0], sam_mode="gradient_para"), torch.ones(S, 2))
    with pytest.raises(ValueError, match="sam_mode"):
        gradient_sam_scale(diff, S, [1.0], sam_mode="grad")


@pytest.mark.parametrize("mode", ["gradient", "gradient_para"])
def test_gradient_sam_forward_and_segmentation(mode):
    from guided_diffusion.anofpdm.gradient_sam import gradient_sam_scale

    model, diff, x0 = ToyEps(), make_diffusion(), make_x0()
    kw = dict(ws=[1.0, 2.0], modality=[0, 1], forward_steps=S, keep_xstarts=True)
    base = run_forward_process(model, diff, x0, generator=gen(), **kw)
    fr = run_forward_process(model, diff, x0, generator=gen(), sam_mode=mode, **kw)
    assert fr.sam_mode == mode and base.sam_mode == "default"
    # the classifier statistics (MSEs, M_t, t_e) do not change; only the SAMs do
    for name in ("mse_h", "mse_null", "div", "end_step"):
        assert torch.equal(getattr(fr, name), getattr(base, name)), name
    scale = gradient_sam_scale(diff, S, [1.0, 2.0], sam_mode=mode)
    for wi, w in enumerate((1.0, 2.0)):
        seg = segment(fr, w=w, thr_01=1.0, diff_max=[1.0, 1.0], median_filter=False, sam_mode=mode)
        guide = (fr.xstart_h[:, wi] - fr.xstart_null) ** 2 * scale[:, wi][None, :, None, None, None]
        want = torch.zeros(x0.shape[0], 1, 8, 8)
        for b in range(x0.shape[0]):
            for m in range(2):
                te = int(fr.end_step[b, wi, m])
                want[b, 0] += guide[b, : te + 1, m].mean(0) / 2
        torch.testing.assert_close(seg.anomaly_map, want, rtol=1e-4, atol=1e-6)
        plain = segment(base, w=w, thr_01=1.0, diff_max=[1.0, 1.0], median_filter=False)
        assert not torch.allclose(seg.anomaly_map, plain.anomaly_map)
    with pytest.raises(ValueError, match="sam_mode"):
        segment(base, thr_01=1.0, diff_max=[1.0, 1.0], sam_mode=mode)



def test_gradient_sam_stack_beyond_float16_range():
    """t_e_ratio != 1 reads the SAM stack; 1/B_t² (~1e8 near t = 0 at 1000 steps) exceeds float16."""
    x0 = torch.zeros(1, 1, 4, 4)
    xh = torch.ones(1, 1, 3, 1, 4, 4)  # (x̂h - x̂∅)² = 1 at every step
    scale = torch.full((3, 1), 1e6)
    xn = torch.zeros(1, 3, 1, 4, 4)
    fr = forward_result_from_stacks(
        x0, xh, xn, ws=[1.0], keep_sam_stack=True, sam_scale=scale, sam_mode="gradient"
    )
    r = segment(fr, thr_01=1.0, diff_max=[1.0], t_e_ratio=2.0, median_filter=False, sam_mode="gradient")
    torch.testing.assert_close(r.anomaly_map, torch.full((1, 1, 4, 4), 1e6))
    with pytest.raises(ValueError, match="needs a sam_scale"):
        forward_result_from_stacks(x0, xh, torch.zeros(1, 3, 1, 4, 4), ws=[1.0], sam_mode="gradient")
