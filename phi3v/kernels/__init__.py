"""Triton kernels: the decoder's and CLIP's fused elementwise ops (`fused`), small-batch GEMV (`gemv`) and
paged decode attention (`paged_attention`), each beside the eager math it replaces or a test reference; for
quantized weights (phi3v.models.quant) the FP8 GEMV (`gemv` with a scale), the int4 GEMV and GEMM (`int4`) and
the per-token FP8 activation quantizer of the FP8 prefill GEMM (`fp8_act`).

This module holds what they share: whether Triton can run on a device, and programmatic dependent launch
(PDL, Hopper+). A decode step is ~300 kernels in a row, each waiting for the previous one to drain and the
next to be launched and ramp up. With PDL a kernel lets the next one launch as soon as all its programs have
started (`pdl_trigger`); the next one's programs sit on the SMs, read what no earlier kernel writes (weights),
and wait (`pdl_wait`) for the previous kernel's results before they read or write anything else. Whether a
launch uses it is the caller's choice (`EngineConfig.pdl`), passed to each kernel wrapper as `pdl=`.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; CPU installs run the eager path
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

# Triton's CPU interpreter (tests): Triton itself decides at import whether @triton.jit functions are
# interpreted, from this variable, so it is read once here too, not per call.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device` (CUDA, or any device under the interpreter)."""
    return HAVE_TRITON and (device.type == "cuda" or INTERPRET)


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(x: Tensor, on: bool) -> dict:
    """Launch kwargs for a kernel with a `PDL` constexpr: PDL when asked for (`on`) and x's device has it
    (CUDA, compute capability >= 9, a Triton with the instructions)."""
    use = on and HAVE_TRITON and gdc_wait is not None and x.is_cuda and _sm90(x.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if use else {"PDL": False}


if HAVE_TRITON:
    try:  # Triton >= 3.3
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - older Triton: no PDL (the branches below are never compiled)
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def pdl_trigger(PDL: tl.constexpr):
        if PDL:  # the next kernel may launch once every program of this one got here
            gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        if PDL:  # the previous kernel has finished and its writes are visible
            gdc_wait()

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        pdl_trigger(PDL)
        pdl_wait(PDL)
else:  # pragma: no cover
    gdc_wait = None
