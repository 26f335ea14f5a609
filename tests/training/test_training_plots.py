"""training_plots.py: loss-curve PNG from progress.csv and the optional TensorBoard writer."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from guided_diffusion.reporting import training_plots as tp

CSV = "step,loss,loss_q0,mse,grad_norm,lg_loss_scale,lr\n" + "".join(
    f"{s},{1 / (s + 1):.6f},{0.5 / (s + 1):.6f},{'' if s == 15 else f'{0.9 / (s + 1):.6f}'},{2 + s},0,1e-4\n"
    for s in range(0, 50, 5)
)  # one empty mse cell (step 15), as when a key first appears later


def test_loss_png_from_tiny_progress_csv(tmp_path):
    csv = tmp_path / "progress.csv"
    csv.write_text(CSV)
    out = tmp_path / "plots" / "loss_curves.png"
    assert tp.write_loss_curves_png(str(csv), str(out)) == ["loss", "mse"]
    img = mpimg.imread(out)
    assert img.shape[:2] == (640, 700)  # two panels (loss + grad_norm) of 7 x 3.2 in at 100 dpi
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    assert not list(out.parent.glob(".*tmp*"))
    only_loss = tmp_path / "p2.csv"
    only_loss.write_text("loss\n0.5\n0.25\n")
    tp.write_loss_curves_png(str(only_loss), str(tmp_path / "one.png"))
    assert mpimg.imread(tmp_path / "one.png").shape[:2] == (320, 700)


def test_loss_png_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="progress file .* is missing"):
        tp.write_loss_curves_png(str(tmp_path / "none.csv"), str(tmp_path / "x.png"))
    bad = tmp_path / "bad.csv"
    bad.write_text("step,lr\n1,0.1\n")
    with pytest.raises(ValueError, match="no loss column"):
        tp.write_loss_curves_png(str(bad), str(tmp_path / "x.png"))
    empty = tmp_path / "empty.csv"
    empty.write_text("step,loss\n")
    with pytest.raises(ValueError, match="no rows"):
        tp.write_loss_curves_png(str(empty), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_scalar_writer_tensorboard_or_noop(tmp_path):
    writer = tp.ScalarWriter(str(tmp_path / "tb"))
    writer.log_scalars(3, {"loss": 0.5, "name": "text", "nan": float("nan")})
    writer.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*")) if (tmp_path / "tb").exists() else []
    if tp.tensorboard_available():
        assert writer.enabled is False and len(events) == 1  # closed writer; one events file
    else:
        assert not writer.enabled and events == []
        with pytest.raises(ValueError, match="tensorboard package is not installed"):
            tp.ScalarWriter(str(tmp_path / "tb2"), enabled=True)
    assert not tp.ScalarWriter(str(tmp_path / "tb3"), enabled=False).enabled
