"""Evaluation and training destroy their process group on the way out, on success and on error.

Left to the interpreter's exit, gloo's threads die unjoined and a rank of ``mpiexec -n 2`` aborted now and
then with "terminate called without an active exception" (exit 6): the flake of
tests/test_equivalence.py::test_evaluation_single_process_vs_mpiexec. A rank leaving on an error must not
wait at the barrier for ranks that will never come.
"""

from __future__ import annotations

import types

import pytest

from guided_diffusion.anofpdm.translation_runtime import run_session
from guided_diffusion.training import run as training
from guided_diffusion.utils import dist_util


@pytest.fixture
def cleanups(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real = dist_util.cleanup

    def spy(wait: bool = True) -> None:
        calls.append(wait)
        real(wait=wait)

    monkeypatch.setattr(dist_util, "cleanup", spy)
    return calls


def fake_eval_run(log_dir) -> types.SimpleNamespace:
    return types.SimpleNamespace(forward=types.SimpleNamespace(precision="fp32"),
                                 eval=types.SimpleNamespace(log_dir=str(log_dir)),
                                 record=lambda: {"eval": {"log_dir": str(log_dir)}})


def test_evaluation_session_cleans_up_after_success(tmp_path, cleanups):
    with run_session(fake_eval_run(tmp_path / "ok")) as log_dir:
        assert log_dir
    assert cleanups == [True]


def test_evaluation_session_cleans_up_after_an_error_without_waiting(tmp_path, cleanups):
    with pytest.raises(RuntimeError, match="boom"):
        with run_session(fake_eval_run(tmp_path / "err")):
            raise RuntimeError("boom")
    assert cleanups == [False]


def test_training_cleans_up_after_an_error_without_waiting(tmp_path, cleanups, monkeypatch):
    def failing_train(*args, **kwargs) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "_validate", lambda m, t: None)
    monkeypatch.setattr(training, "_train_in", failing_train)
    cfg = types.SimpleNamespace(log_dir=str(tmp_path / "train"))
    with pytest.raises(RuntimeError, match="boom"):
        training.train(None, None, cfg)
    assert cleanups == [False]
