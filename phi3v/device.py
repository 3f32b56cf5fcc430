"""Host-to-device copies that never make the host wait for the GPU."""

from __future__ import annotations

import torch
from torch import Tensor

# Pageable non-blocking copies up to about this size return at once; larger ones wait for the queued GPU work to
# drain before they stage the bytes (measured: docs/perf-log.md, "pinned staging"). Below it, pinning only adds
# host time.
PIN_MIN_BYTES = 1 << 20


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """t on `device`, without making the host wait for the GPU: a large CPU tensor bound for CUDA is staged
    in pinned memory first (a non-blocking copy from pageable memory waits for the stream to drain before
    it stages the bytes, and the GPU then idles while the host catches up)."""
    if device.type == "cuda" and t.device.type == "cpu" and t.numel() * t.element_size() >= PIN_MIN_BYTES:
        t = t.pin_memory()  # the caching host allocator reuses the block once this copy has run
    return t.to(device, non_blocking=True)
