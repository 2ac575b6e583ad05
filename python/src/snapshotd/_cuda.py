"""Device-to-host copies of CUDA tensors into arena memory (the asynchronous save's CUDA path)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def record_event(values: Iterable[Any]) -> torch.cuda.Event | None:
    """On the caller's thread: an event after the work that produced any CUDA tensor among ``values``, or None."""
    if not any(getattr(value, "is_cuda", False) for value in values):
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())
    return event


def copy_to_host(copies: Iterable[tuple[torch.Tensor, np.ndarray]], ready: torch.cuda.Event) -> None:
    """Copies each CUDA tensor into its host array (arena memory), on a side
    stream that first waits for ``ready`` (recorded after the work that
    produced them). Each host range is registered as pinned for the copy, so
    the copies are true asynchronous DMA."""
    stream = torch.cuda.Stream()
    stream.wait_event(ready)
    registered: list[int] = []
    cudart = torch.cuda.cudart()
    try:
        with torch.cuda.stream(stream):
            for tensor, target in copies:
                if target.size == 0:
                    continue
                address, length = target.__array_interface__["data"][0], target.nbytes
                if cudart.cudaHostRegister(address, length, 0) == 0:
                    registered.append(address)
                torch.from_numpy(target).view(tensor.dtype).copy_(tensor.detach(), non_blocking=True)
        stream.synchronize()
    finally:
        for address in registered:
            cudart.cudaHostUnregister(address)
