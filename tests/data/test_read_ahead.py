"""read_ahead: the evaluation loaders' next batch read in a thread while the current one is computed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from guided_diffusion.data.read_ahead import pin_tensors, read_ahead


def test_items_come_in_order_and_are_read_ahead_of_the_caller():
    reads: list[int] = []

    def source():
        for i in range(6):
            reads.append(i)
            yield i

    got = []
    for item in read_ahead(source(), depth=2):
        deadline = time.monotonic() + 5
        while len(reads) < min(6, item + 3) and time.monotonic() < deadline:  # the thread reads ahead
            time.sleep(0.005)
        assert len(reads) >= min(6, item + 3), f"item {item}: only {len(reads)} read"
        assert len(reads) <= item + 4  # at most depth waiting plus the one being put
        got.append(item)
    assert got == list(range(6))


def test_a_reading_error_is_raised_in_the_caller_at_its_item():
    def source():
        yield 0
        yield 1
        raise OSError("slice_0042.npz: truncated file")

    got = []
    with pytest.raises(OSError, match="slice_0042.npz: truncated file"):
        for item in read_ahead(source()):
            got.append(item)
    assert got == [0, 1]


def test_a_caller_that_stops_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = read_ahead(endless(), depth=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
    assert not any(t.name == "read_ahead" for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        list(read_ahead([1, 2], depth=0))


def test_pin_tensors_pins_every_cpu_tensor_of_a_batch(monkeypatch):
    pinned = []

    def fake_pin(self):  # pinning needs an accelerator; this records which tensors would be pinned
        pinned.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = (torch.zeros(2, 4, 8, 8), torch.zeros(2, 1, 8, 8), [torch.zeros(2)], {"idx": torch.arange(2)},
             "x")
    out = list(read_ahead([batch], pin=True))[0]
    assert sorted(pinned) == sorted([(2, 4, 8, 8), (2, 1, 8, 8), (2,), (2,)])
    assert isinstance(out, tuple) and isinstance(out[2], list) and out[4] == "x"
    assert torch.equal(out[3]["idx"], torch.arange(2))
    assert pin_tensors(3) == 3
