"""Host-to-device copies that never make the host wait for the GPU; the CPU thread count of a CPU engine."""

from __future__ import annotations

import os

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


# Decoders narrower than this run on one CPU thread: a second thread speeds up neither their decoding nor their
# prefill (each op is too small to split), and when another process holds a core every op waits at the barrier for
# the thread that lacks one. Wider ones prefill faster on more threads; their decoding is memory-bound and stays
# even (docs/perf-log.md, "CPU threads").
MIN_HIDDEN_FOR_THREADS = 256


def physical_cores() -> int:
    """Physical cores this process may run on (Linux topology; hyperthread siblings counted once), else the CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                cores.add((f.read().strip(), core))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def default_cpu_threads(hidden_size: int, cores: int) -> int:
    """The rule: one thread for a narrow (tiny) decoder, every physical core for a full-size one."""
    return 1 if hidden_size < MIN_HIDDEN_FOR_THREADS else max(1, cores)


_set_by_rule: int | None = None  # the count setup_cpu_threads set last (not the user's, if still in force)


def _threads_set_by_user() -> bool:
    """Whether the thread count is the user's: PyTorch's own variables are set, or torch.set_num_threads changed
    the count from PyTorch's default (one per physical core, within the CPU affinity) and from what the rule set."""
    if any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return True
    n = torch.get_num_threads()
    return n != min(physical_cores(), os.cpu_count() or 1) and n != _set_by_rule


def setup_cpu_threads(requested: int | None, hidden_size: int) -> int:
    """Set PyTorch's intra-op threads for a CPU engine: `requested`, else the user's own setting if any, else the
    rule (default_cpu_threads). Returns the count in force."""
    global _set_by_rule
    if requested is None and _threads_set_by_user():
        return torch.get_num_threads()
    n = requested if requested is not None else default_cpu_threads(hidden_size, physical_cores())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _set_by_rule = n if requested is None else None
    return n
