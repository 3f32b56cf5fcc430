"""The small-M Triton GEMV (phi3v.kernels.gemv) against x @ w.T, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1) in a subprocess, as in test_kernels.py. fp32 here: the interpreter does not round
bf16 like the GPU; bf16 speed and accuracy on the GPU are checked by benchmarks/gemv_sweep.py."""

import pytest
from interp import run_interpreted

SCRIPT = r"""
import torch
from phi3v.kernels import gemv
from phi3v.kernels.gemv import GemvConfig, linear, supported

torch.manual_seed(0)
configs = [
    None,  # default_config's heuristic
    GemvConfig(block_n=8, block_k=64),
    GemvConfig(block_n=2, block_k=1024),  # BEST's M=1 shape: one K tile covers (and masks) K <= 1024
    GemvConfig(block_n=4, block_k=128, split_k=3, num_warps=2, num_stages=1),  # uneven split: 1000 -> 384+384+232
    GemvConfig(block_n=32, block_k=32, split_k=8),
    GemvConfig(block_n=16, block_k=64, split_k=2, dot=True),
    GemvConfig(block_n=32, block_k=256, split_k=4, dot=True),
]
n_cases = 0
# shapes with tails in N and K for every config (75 % 8, 37 % 32, ...), several K tiles (2100: 3 of 1024, a
# short last split), an uneven split (1000 -> 384+384+232); N small, as the interpreter's cost is per program
for n, k in [(75, 200), (16, 2100), (37, 1000)]:
    w = torch.randn(n, k)
    for m in (1, 3, 8):
        x = torch.randn(m, k)
        ref = x @ w.T
        for cfg in configs:
            y = linear(x, w, cfg)
            assert y.shape == (m, n) and y.dtype == torch.float32, (y.shape, y.dtype)
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-4, (m, n, k, cfg, err)
            n_cases += 1

# leading dims (2, 1, K) -> (2, 1, N); a non-contiguous x is copied; repeated calls are bit-identical
w = torch.randn(75, 200)
x = torch.randn(2, 1, 200)
for cfg in (None, GemvConfig(block_n=8, block_k=64, split_k=4), GemvConfig(16, 32, split_k=2, dot=True)):
    y = linear(x, w, cfg)
    assert y.shape == (2, 1, 75)
    assert ((y - x @ w.T).abs().max() / (x @ w.T).abs().max()).item() < 1e-4
    assert torch.equal(y, linear(x, w, cfg))
xt = torch.randn(200, 4).T  # (4, 200), stride (1, 4)
assert ((linear(xt, w) - xt @ w.T).abs().max() / (xt @ w.T).abs().max()).item() < 1e-4

# fp16 in and out (partials in fp32, then the cast in the split-K sum)
wh, xh = torch.randn(64, 256).half(), torch.randn(2, 256).half()
yh = linear(xh, wh, GemvConfig(block_n=8, block_k=64, split_k=2))
assert yh.dtype == torch.float16
assert ((yh.float() - xh.float() @ wh.float().T).abs().max() / (xh.float() @ wh.float().T).abs().max()).item() < 1e-2

assert supported(torch.randn(8, 200), w) and supported(torch.randn(2, 1, 200), w)
assert not supported(torch.randn(9, 200), w)  # M > 8
assert not supported(torch.randn(3, 3, 200), w)
assert not supported(torch.randn(1, 200), torch.randn(200, 300).T)  # weight not contiguous
assert not supported(torch.randn(1, 100), torch.randn(300, 200)[:, ::2])
assert not supported(torch.randn(1, 199), w)  # K mismatch
assert not supported(torch.randn(1, 200).double(), w.double())  # dtype
assert not supported(torch.randn(1, 200).half(), w)  # mixed dtypes
assert not supported(torch.randn(0, 200), w)

assert gemv.default_config(3, 3072, 3072) == gemv.default_config(3, 3072, 3072)
gemv.BEST[(4, 75, 200)] = GemvConfig(block_n=4, block_k=32, split_k=2)
assert gemv.default_config(3, 75, 200) == gemv.BEST[(4, 75, 200)]  # next larger tabled M
x3 = torch.randn(3, 200)
assert ((linear(x3, w) - x3 @ w.T).abs().max() / (x3 @ w.T).abs().max()).item() < 1e-4
print("ok", n_cases)
"""


@pytest.mark.interpreter
@pytest.mark.slow
def test_gemv_matches_matmul_in_the_interpreter() -> None:
    assert run_interpreted(SCRIPT).startswith("ok")
