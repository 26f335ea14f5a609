"""Comparison methods (guided_diffusion/baselines/methods.py), the noise-aware classifier (classifier.py)
and the
learn_sigma hybrid loss, on tiny random models."""

import numpy as np
import pytest
import torch

from guided_diffusion.baselines import methods
from guided_diffusion.baselines.classifier import (
    EncoderUNetModel,
    classifier_log_prob_grad,
    classifier_loss,
    create_classifier,
)
from guided_diffusion.metrics.slice_metrics import dice_per_sample
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.unet import UNetModel
from guided_diffusion.unet_v1 import UNetV1

ARCH = dict(image_size=16, in_channels=2, model_channels=8, num_res_blocks=1, attention_resolutions={2},
            channel_mult=(1, 2))


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=100, timestep_respacing="10")


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 2, 16, 16, generator=_gen(0)) * 2 - 1


@pytest.fixture(scope="module")
def uncond():
    return _randomise(UNetModel(out_channels=2, **ARCH), 1)


@pytest.fixture(scope="module")
def cond():
    return _randomise(UNetModel(out_channels=2, num_classes=2, **ARCH), 2)


@pytest.fixture(scope="module")
def clf():
    return _randomise(EncoderUNetModel(out_channels=2, num_head_channels=8, **ARCH), 3)


# ---------------------------------------------------------------- AnoDDPM
@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_anoddpm_shapes_counts_determinism(diffusion, x, uncond, noise):
    a, n = methods.anoddpm_map(uncond, diffusion, x, 4, noise=noise, generator=_gen(7))
    b, _ = methods.anoddpm_map(uncond, diffusion, x, 4, noise=noise, generator=_gen(7))
    c, _ = methods.anoddpm_map(uncond, diffusion, x, 4, noise=noise, generator=_gen(8))
    assert a.shape == (2, 1, 16, 16) and n == 4
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert (a >= 0).all() and a.max() > 0
    zero, n0 = methods.anoddpm_map(uncond, diffusion, x, 0, noise=noise, generator=_gen(7))
    assert n0 == 0 and torch.equal(zero, torch.zeros_like(zero))


def test_anoddpm_map_is_filtered_squared_residual_of_chosen_modalities(diffusion, x, uncond):
    raw, _ = methods.anoddpm_map(uncond, diffusion, x, 3, modality=[1], generator=_gen(1),
                                 median_filter=False)
    filt, _ = methods.anoddpm_map(uncond, diffusion, x, 3, modality=[1], generator=_gen(1))
    assert torch.allclose(filt, methods.median_filter_maps(raw))
    both, _ = methods.anoddpm_map(uncond, diffusion, x, 3, generator=_gen(1), median_filter=False)
    assert not torch.allclose(raw, both)


def test_anoddpm_with_v1_learned_sigma(x):
    diff = create_gaussian_diffusion(steps=100, timestep_respacing="10", learn_sigma=True)
    model = _randomise(UNetV1(out_channels=4, resblock_updown=True, **ARCH), 4)
    amap, n = methods.anoddpm_map(model, diff, x, 5, noise="simplex", generator=_gen(0))
    assert amap.shape == (2, 1, 16, 16) and n == 5 and torch.isfinite(amap).all()


def test_bad_level_and_noise_one_line(diffusion, x, uncond):
    with pytest.raises(ValueError, match="noise level L"):
        methods.anoddpm_map(uncond, diffusion, x, 11)
    with pytest.raises(ValueError, match="noise_type"):
        methods.anoddpm_map(uncond, diffusion, x, 2, noise="uniform")
    with pytest.raises(ValueError, match="modality"):
        methods.anoddpm_map(uncond, diffusion, x, 2, modality=[2])


# ---------------------------------------------------------------- DDIM + classifier guidance
def test_clf_guided_counts_determinism_zero_level(diffusion, x, uncond, clf):
    a, n = methods.clf_guided_ddim_map(uncond, clf, diffusion, x, 3, scale=50.0)
    b, _ = methods.clf_guided_ddim_map(uncond, clf, diffusion, x, 3, scale=50.0)
    assert a.shape == (2, 1, 16, 16) and n == 9 and torch.equal(a, b)
    plain, _ = methods.clf_guided_ddim_map(uncond, clf, diffusion, x, 3, scale=0.0)
    assert not torch.allclose(a, plain)
    zero, n0 = methods.clf_guided_ddim_map(uncond, clf, diffusion, x, 0, scale=50.0)
    assert n0 == 0 and zero.abs().max() < 1e-6


def test_clf_guided_scale_zero_is_plain_ddim_round_trip(diffusion, x, uncond, clf):
    amap, _ = methods.clf_guided_ddim_map(uncond, clf, diffusion, x, 3, scale=0.0)
    h = methods.ddim_encode(uncond, diffusion, x, 3)
    with torch.no_grad():
        for i in (2, 1, 0):
            h = diffusion.ddim_sample(uncond, h, torch.full((2,), i, dtype=torch.long))["sample"]
    assert torch.allclose(amap, (x - h).abs().mean(1, keepdim=True), atol=1e-5)


def test_clf_guided_with_v1_learned_sigma_model(x, clf):
    diff = create_gaussian_diffusion(steps=100, timestep_respacing="10", learn_sigma=True)
    model = _randomise(UNetV1(out_channels=4, resblock_updown=True, **ARCH), 6)
    amap, n = methods.clf_guided_ddim_map(model, clf, diff, x, 2, scale=10.0, modality=[0])
    assert amap.shape == (2, 1, 16, 16) and n == 6 and torch.isfinite(amap).all()


# ---------------------------------------------------------------- DDIM + classifier-free guidance
def test_cfg_ddim_counts_determinism_zero_level(diffusion, x, cond):
    a, n = methods.cfg_ddim_map(cond, diffusion, x, 4, w=2.0)
    b, _ = methods.cfg_ddim_map(cond, diffusion, x, 4, w=2.0)
    c, _ = methods.cfg_ddim_map(cond, diffusion, x, 4, w=0.0)
    assert a.shape == (2, 1, 16, 16) and n == 12 and torch.equal(a, b)
    assert not torch.allclose(a, c)
    zero, n0 = methods.cfg_ddim_map(cond, diffusion, x, 0, w=2.0)
    assert n0 == 0 and zero.abs().max() < 1e-6
    with pytest.raises(ValueError, match="class-conditional classifier-free"):
        methods.cfg_ddim_map(_randomise(UNetModel(out_channels=2, **ARCH), 1), diffusion, x, 2, w=1.0)
    with pytest.raises(ValueError, match="no classifier-free null"):
        methods.cfg_ddim_map(UNetV1(out_channels=2, num_classes=2, **ARCH), diffusion, x, 2, w=1.0)


# ---------------------------------------------------------------- FLAIR baseline and thresholds
def test_flair_map_in_unit_interval(x):
    xx = x.clone()
    xx[1, 0] = 0.3  # constant slice
    amap, n = methods.flair_map(xx, 0)
    assert n == 0 and amap.shape == (2, 1, 16, 16)
    assert amap.min() >= 0 and amap.max() <= 1
    assert float(amap[0].min()) == 0.0 and float(amap[0].max()) == pytest.approx(1.0)
    assert torch.equal(amap[1], torch.zeros_like(amap[1]))
    assert torch.argmax(amap[0].flatten()) == torch.argmax(xx[0, 0].flatten())
    with pytest.raises(ValueError, match="flair_channel"):
        methods.flair_map(xx, 2)


def test_best_threshold_recovers_the_separating_value():
    rng = np.random.default_rng(0)
    gt = np.zeros((6, 1, 16, 16))
    gt[:3, :, 4:9, 4:9] = 1
    maps = np.where(gt > 0, 0.7, 0.2) + rng.uniform(-0.05, 0.05, gt.shape)
    thr, dice = methods.best_threshold(maps, gt, thresholds=51)
    assert 0.25 < thr <= 0.65 and dice == pytest.approx(1.0, abs=1e-6)
    thr2, dice2 = methods.best_threshold(torch.from_numpy(maps), torch.from_numpy(gt), thresholds=[0.1, 0.9])
    # 0.9 predicts nothing: Dice 0 on the unhealthy slices; 0.1 = all foreground, pooled over the 3 slices
    assert thr2 == 0.1 and dice2 == pytest.approx(2 * 75 / (3 * 256 + 75), abs=1e-9)
    thr3, dice3 = methods.best_threshold(maps, gt, thresholds=[0.1, 0.9], objective="mean_unhealthy")
    assert thr3 == 0.1 and dice3 == pytest.approx(50 / 281, abs=1e-3)  # all-foreground: 2*25/(256+25)
    with pytest.raises(ValueError, match="maps"):
        methods.best_threshold(maps[:2], gt)



def _weak_maps() -> tuple[np.ndarray, np.ndarray]:
    """6 healthy + 2 unhealthy slices whose maps barely favour the lesion (bright noise spots elsewhere)."""
    rng = np.random.default_rng(3)
    gt = np.zeros((8, 1, 16, 16))
    gt[6:, :, 5:11, 5:11] = 1
    maps = rng.uniform(0.0, 0.5, gt.shape) + 0.25 * gt
    maps[:6, :, 0, 0] = 0.9  # a strong false spot on every healthy slice
    return maps, gt


def test_best_threshold_weak_maps_old_objective_predicts_nothing_new_one_segments():
    """Issue 21 item 6: the mean Dice over ALL slices picks a threshold above every map value (empty masks,
    unhealthy Dice 0); the pooled unhealthy Dice picks one with non-empty masks and Dice > 0."""
    maps, gt = _weak_maps()
    grid = np.linspace(0.0, 1.2 * maps.max(), 61)
    old = [np.mean(dice_per_sample(maps >= t, gt)) for t in grid]  # the earlier objective, by hand
    t_old = grid[int(np.argmax(old))]
    assert t_old > maps.max() and max(old) == pytest.approx(0.75)  # "predict nothing" = the healthy share
    for objective in methods.TUNING_OBJECTIVES:
        thr, dice = methods.best_threshold(maps, gt, thresholds=grid, objective=objective)
        masks = maps >= thr
        assert thr <= maps.max() and masks[6:].any(), objective
        unh = dice_per_sample(masks[6:], gt[6:])
        assert dice > 0.5 and unh.min() > 0.5, (objective, dice, unh)
    thr, dice = methods.best_threshold(maps, gt)  # the default grid (min..max, 101 values)
    assert 0.4 < thr <= 0.75 and dice > 0.5


def test_best_threshold_refuses_healthy_only_gt_and_unknown_objective():
    maps, gt = _weak_maps()
    with pytest.raises(ValueError, match="no lesion pixels"):
        methods.best_threshold(maps[:6], gt[:6])
    with pytest.raises(ValueError, match="objective"):
        methods.best_threshold(maps, gt, objective="mean_all")


# ---------------------------------------------------------------- classifier
def test_classifier_keys_logits_and_upstream_defaults():
    model = create_classifier(image_size=16, classifier_width=8, classifier_depth=1,
                              classifier_attention_resolutions="8", classifier_use_scale_shift_norm=True,
                              classifier_resblock_updown=True, classifier_pool="attention", in_channels=2,
                              classifier_channel_mult="1,2", classifier_num_head_channels=8)
    keys = set(model.state_dict())
    assert {"time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.2.0.in_layers.2.weight",
            "middle_block.1.qkv.weight", "out.0.weight", "out.2.positional_embedding",
            "out.2.qkv_proj.weight", "out.2.c_proj.weight"} <= keys
    assert not any("output_blocks" in k or ".op." in k for k in keys)
    assert model.state_dict()["out.2.positional_embedding"].shape == (16, 8 * 8 + 1)
    logits = model(torch.randn(3, 2, 16, 16), torch.tensor([0, 5, 9]))
    assert logits.shape == (3, 2) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="attention pooling"):
        model(torch.randn(1, 2, 32, 32), torch.tensor([0]))


def test_classifier_loss_trains_and_gradient(diffusion, clf):
    x0 = torch.rand(8, 2, 16, 16, generator=_gen(3)) * 2 - 1
    labels = torch.tensor([0, 1] * 4)
    x0[labels == 1, :, 4:10, 4:10] = 1.0  # "lesion"
    out = classifier_loss(clf, diffusion, x0, labels, generator=_gen(0))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and out["t"].shape == (8,)
    again = classifier_loss(clf, diffusion, x0, labels, generator=_gen(0))
    assert torch.equal(out["t"], again["t"]) and torch.allclose(out["loss"], again["loss"])
    torch.manual_seed(0)
    model = EncoderUNetModel(out_channels=2, num_head_channels=8, **ARCH)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(20):
        loss = classifier_loss(model, diffusion, x0, labels, noised=False)["loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    grad = classifier_log_prob_grad(clf, diffusion, x0[:2], torch.tensor([1, 3]), torch.tensor([0, 0]))
    assert grad.shape == (2, 2, 16, 16) and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels"):
        classifier_loss(clf, diffusion, x0, labels.float())


# ---------------------------------------------------------------- learn_sigma, hybrid loss
class _FixedOutput(torch.nn.Module):
    """A 'network' whose output is a learnable tensor [B, 2C, H, W]."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())

    def forward(self, x, t, **kwargs):
        return self.out


def test_hybrid_loss_vb_trains_only_the_variance():
    diff = create_gaussian_diffusion(steps=100, learn_sigma=True, rescale_learned_sigmas=True)
    x0 = torch.rand(3, 2, 8, 8, generator=_gen(1)) * 2 - 1
    net = _FixedOutput(torch.randn(3, 4, 8, 8, generator=_gen(2)) * 0.5)
    terms = diff.training_losses(net, x0, torch.tensor([0, 10, 60]), generator=_gen(3))
    assert set(terms) >= {"loss", "mse", "vb"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), net.out, retain_graph=True)
    assert g_vb[:, :2].abs().max() == 0 and g_vb[:, 2:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), net.out)
    assert g_mse[:, 2:].abs().max() == 0 and g_mse[:, :2].abs().max() > 0
    # RESCALED_MSE: vb scaled by T/1000 relative to the plain learn_sigma MSE loss
    plain = create_gaussian_diffusion(steps=100, learn_sigma=True)
    t2 = plain.training_losses(net, x0, torch.tensor([0, 10, 60]), generator=_gen(3))
    assert torch.allclose(terms["vb"], t2["vb"] * 0.1, rtol=1e-5)


def test_learned_range_variance_used_in_p_mean_variance():
    diff = create_gaussian_diffusion(steps=100, learn_sigma=True)
    x = torch.randn(2, 2, 8, 8, generator=_gen(0))
    t = torch.tensor([5, 50])
    for v, table in ((1.0, diff.log_betas), (-1.0, diff.posterior_log_variance_clipped)):
        out_t = torch.cat([torch.zeros(2, 2, 8, 8), torch.full((2, 2, 8, 8), v)], dim=1)
        out = diff.p_mean_variance(lambda a, b, out_t=out_t: out_t, x, t)
        expected = torch.tensor(table[[5, 50]], dtype=torch.float32).reshape(2, 1, 1, 1).expand(2, 2, 8, 8)
        assert torch.allclose(out["log_variance"], expected, atol=1e-6)
    mid = diff.p_mean_variance(lambda a, b: torch.zeros(2, 4, 8, 8), x, t)["log_variance"]
    lo, hi = torch.tensor(diff.posterior_log_variance_clipped[[5, 50]]), torch.tensor(diff.log_betas[[5, 50]])
    assert torch.allclose(mid[:, 0, 0, 0], ((lo + hi) / 2).float(), atol=1e-6)


# ---------------------------------------------------------------- scripts/train_classifier.py
def _fake_train_split(root, channels=2, size=16, patients=2, slices=4):
    rng = np.random.default_rng(0)
    for p in range(patients):
        d = root / "npy_train" / f"patient_P{p:03d}"
        d.mkdir(parents=True)
        for k in range(slices):
            y = np.zeros((1, 1, size, size), np.float32)
            y[..., 4:9, 5:10] = float(k % 2)
            np.savez(d / f"slice_{k}.npz", x=rng.random((1, channels, size, size)).astype(np.float32), y=y)
    (root / "data_splits" / "train").mkdir(parents=True)
    (root / "data_splits" / "train" / "scans.csv").write_text("".join(f"P{p:03d}\n" for p in range(patients)))
    return root


def test_train_classifier_script(tmp_path, capsys):
    from guided_diffusion.baselines import classifier_training as script
    from guided_diffusion.cli import run_cli
    data = _fake_train_split(tmp_path / "data")
    flags = ["--data_dir", str(data), "--log_dir", str(tmp_path / "log"), "--image_size", "16",
             "--in_channels", "2", "--classifier_width", "8", "--classifier_depth", "1",
             "--classifier_attention_resolutions", "8", "--classifier_channel_mult", "1,2",
             "--diffusion_steps", "40", "--batch_size", "4", "--max_steps", "3", "--log_interval", "1",
             "--save_interval", "2", "--device", "cpu"]
    with pytest.raises(ValueError, match="num_head_channels"):
        script.main(flags)  # width 8 cannot have upstream's 64 channels per head
    flags += ["--classifier_num_head_channels", "8"]
    model = create_classifier(image_size=16, classifier_width=8, classifier_depth=1,
                              classifier_attention_resolutions="8", classifier_use_scale_shift_norm=True,
                              classifier_resblock_updown=True, classifier_pool="adaptive", in_channels=2,
                              classifier_channel_mult="1,2", classifier_num_head_channels=8)
    assert script.main(flags + ["--classifier_pool", "adaptive"]) == 0
    log = tmp_path / "log"
    saved = sorted(p.name for p in log.glob("classifier_*.pt"))
    assert saved == ["classifier_000002.pt", "classifier_000003.pt"]
    model.load_state_dict(torch.load(log / "classifier_000003.pt"), strict=True)
    assert capsys.readouterr().out.count("loss") == 3
    assert run_cli(script.main, ["--log_dir", str(log)]) == 2
    assert "--data_dir" in capsys.readouterr().err


def test_comparison_median_filter_pads_like_torch_reflect():
    """The comparison maps are filtered as AnoFPDM's: torch reflect padding (edge not repeated), so the
    outer 2 px agree with a direct torch reference and with segmentation.median_filter_5x5."""
    from guided_diffusion.anofpdm.segmentation import median_filter_5x5

    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 1, 12, 12, generator=g)
    padded = torch.nn.functional.pad(maps, (2, 2, 2, 2), mode="reflect")
    ref = padded.unfold(2, 5, 1).unfold(3, 5, 1).reshape(2, 1, 12, 12, 25).median(dim=-1).values
    out = methods.median_filter_maps(maps)
    assert torch.equal(out, ref)
    assert torch.equal(out, median_filter_5x5(maps))
