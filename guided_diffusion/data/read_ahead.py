"""Read the next evaluation batches while the device computes the current one (issue 11).

``read_ahead(batches, depth=1, pin=False)`` iterates ``batches`` in a background thread, ``depth`` items
ahead of the caller, and yields them in their order. The evaluation loaders keep ``num_workers=0`` (their
dataset records the all-zero slices it meets, which worker processes would keep to themselves), so a
thread is what overlaps the file reads with the forward process; ``pin=True`` also pins the tensors, so
that ``x.to(device, non_blocking=True)`` does not wait for the device. An exception raised while reading
is raised in the caller at the item where it happened; a caller that stops early stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_DONE = object()


def pin_tensors(item: Any) -> Any:
    """``item`` with every CPU tensor in it (also inside tuples, lists and dicts) in pinned memory."""
    if isinstance(item, torch.Tensor):
        return item.pin_memory() if item.device.type == "cpu" else item
    if isinstance(item, tuple | list):
        return type(item)(pin_tensors(v) for v in item)
    if isinstance(item, dict):
        return {k: pin_tensors(v) for k, v in item.items()}
    return item


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(batches: Iterable[T], depth: int = 1, pin: bool = False) -> Iterator[T]:
    """Yield the items of ``batches`` in order, read ``depth`` (>= 1) items ahead in a thread.

    Args:
        batches: any iterable (a DataLoader of evaluation batches).
        depth: how many items may wait, read, for the caller.
        pin: pin the CPU tensors of every item (only useful when they go to a CUDA device).
    """
    if depth < 1:
        raise ValueError(f"read_ahead: depth must be >= 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in batches:
                if not put(pin_tensors(item) if pin else item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the caller, raised there
            put(_Failure(err))
            return
        put(_DONE)

    thread = threading.Thread(target=reader, name="read_ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
