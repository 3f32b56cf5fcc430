"""The Triton kernels' math, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1), in a
subprocess because the interpreter must be chosen before triton is imported. fp32 here: the
interpreter does not round bf16 like the GPU, so bf16 equality is checked by the GPU run
(benchmarks/decode_profile.py, tests/gpu/test_gpu_smoke.py: pytest -m gpu tests/gpu)."""

import pytest
import torch
from interp import run_interpreted

from phi3v import device

SCRIPT = r"""
import torch
from phi3v.config import Phi3VConfig
from phi3v.kernels import fused as kernels
from phi3v.models.weights import load_model
from phi3v.kernels import available
assert available(torch.device("cpu"))
cfg = Phi3VConfig.from_pretrained("tests/data/tiny-phi3v")
m = load_model("tests/data/tiny-phi3v", cfg, "cpu", torch.float32)
torch.manual_seed(0)
x = torch.randn(2, 9, 64)
pos = torch.stack([torch.arange(9), torch.arange(600, 609)])
flags = torch.tensor([False, True])
with torch.inference_mode():
    ref = m.model(x, pos, flags, None)
    m.set_kernels(True)
    got = m.model(x, pos, flags, None)
d = (ref - got).abs().max().item()
assert d < 1e-4, d
w = torch.rand(64) + 0.5
a, r = torch.randn(5, 64), torch.randn(5, 64)
n, ro = kernels.add_rms_norm(a, r, w, 1e-5)
assert torch.equal(ro, r + a)
rr = (r + a).float()
assert (n - w * (rr * torch.rsqrt(rr.pow(2).mean(-1, keepdim=True) + 1e-5))).abs().max() < 1e-5
gu = torch.randn(3, 300)
assert (kernels.silu_mul(gu) - gu[:, 150:] * torch.nn.functional.silu(gu[:, :150])).abs().max() < 1e-6
lw, lb = torch.rand(40) + 0.5, torch.randn(40)
a, r = torch.randn(3, 5, 40) * 3 + 1, torch.randn(3, 5, 40)  # 15 rows: the last program of 4 rows has 3
n, ro = kernels.add_layer_norm(a, r, lw, lb, 1e-5)
assert torch.equal(ro, r + a)
assert (n - torch.nn.functional.layer_norm(r + a, (40,), lw, lb, 1e-5)).abs().max() < 1e-5
n0, same = kernels.add_layer_norm(a, None, lw, lb, 1e-5)
assert same is a and (n0 - torch.nn.functional.layer_norm(a, (40,), lw, lb, 1e-5)).abs().max() < 1e-5
h = torch.randn(2, 2500) * 4  # 5000 values: two programs of 4096, the second partly masked
assert (kernels.quick_gelu(h) - h * torch.sigmoid(1.702 * h)).abs().max() < 1e-5
tower_in = torch.randn(1, 3, 336, 336)  # 577 rows per LayerNorm: a last program of 1 row
with torch.inference_mode():
    m.set_kernels(False)
    ref_v = m.model.vision_embed_tokens.img_processor(tower_in)
    m.set_kernels(True)
    got_v = m.model.vision_embed_tokens.img_processor(tower_in)
assert (ref_v - got_v).abs().max() < 1e-4, (ref_v - got_v).abs().max()
print("ok", d)
"""


@pytest.mark.interpreter
@pytest.mark.slow
def test_fused_kernels_match_eager_math_in_the_interpreter() -> None:
    assert run_interpreted(SCRIPT).startswith("ok")


def test_pdl_is_off_off_the_gpu() -> None:
    """Programmatic dependent launch only for CUDA tensors on compute capability >= 9: on the CPU (and in
    Triton's interpreter) kernels get PDL=False and no launch attribute."""
    import torch

    from phi3v.kernels import pdl_args

    x = torch.zeros(2)
    assert pdl_args(x, True) == {"PDL": False}
    assert pdl_args(x, False) == {"PDL": False}


class _HostTensor:
    """Stands in for a CPU tensor bound for CUDA (this machine has none): records what `to_device` calls."""

    def __init__(self, nbytes: int) -> None:
        self.device, self.calls, self.nbytes = torch.device("cpu"), [], nbytes

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1

    def pin_memory(self) -> "_HostTensor":
        self.calls.append("pin_memory")
        return self

    def to(self, device: torch.device, non_blocking: bool = False) -> str:
        self.calls.append(("to", device.type, non_blocking))
        return "on " + device.type


def test_to_device_stages_large_host_tensors_for_cuda_in_pinned_memory() -> None:
    t = _HostTensor(device.PIN_MIN_BYTES)
    assert device.to_device(t, torch.device("cuda")) == "on cuda"
    assert t.calls == ["pin_memory", ("to", "cuda", True)]  # pinned first, then a copy the host does not wait for
    t = _HostTensor(device.PIN_MIN_BYTES - 1)  # small: the driver stages it without waiting
    device.to_device(t, torch.device("cuda"))
    assert t.calls == [("to", "cuda", True)]
    # no CUDA: a plain (CPU-to-CPU) move, no pinning, values and dtype kept
    t = _HostTensor(1 << 30)
    device.to_device(t, torch.device("cpu"))
    assert t.calls == [("to", "cpu", True)]
    x = torch.arange(5)
    y = device.to_device(x, torch.device("cpu"))
    assert torch.equal(x, y) and y.dtype == x.dtype
