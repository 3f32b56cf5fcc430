"""GPU check of the fp8 (e4m3) KV cache kernels at Phi-3-vision's shapes (32 kv heads, head_dim 96,
64-token blocks, bf16 activations): the Triton decode kernel against the torch gather fallback on
the same inputs (attention within bf16 rounding; the stored new K/V byte for byte, i.e. the GPU's
fp8 conversion rounds as torch's cast does), and the prefill KV store against torch's cast,
saturation at +-448 included.

Usage: python benchmarks/fp8_kv_check.py [--out check.json]   (on the CPU: under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v.bench import emit  # noqa: E402
from phi3v.engine.kv_cache import FP8, DecodeAttention, KVCache  # noqa: E402
from phi3v.engine.paged_attention import num_splits  # noqa: E402
from phi3v.models import kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="fewer heads and tokens, fp32 (for the CPU interpreter, whose bf16 dots are wrong)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    H, D, BS, NB = (4, 96, 16, 64) if a.small else (32, 96, 64, 400)
    dt = torch.float32 if a.small else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    cache = KVCache(1, NB, BS, H, D, dev, dt, FP8)
    cache.k.copy_((torch.randn(cache.k.shape, device=dev, generator=g) * 3).to(FP8))
    cache.v.copy_(torch.randn(cache.v.shape, device=dev, generator=g).to(FP8))
    lengths = torch.tensor([0, 37, BS * 5 + 3, BS * 12 - 1] if a.small else [0, 700, 2500, 2447, 64, 1], device=dev)
    n = lengths.numel()
    width = int(lengths.max()) + 1
    per = -(-width // BS)
    bt = torch.randperm(NB, device=dev, generator=g)[: n * per].view(n, per).int()
    q = torch.randn(n, H, 1, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(n, H, 1, D, device=dev, dtype=dt, generator=g) * 3
    v = torch.randn(n, H, 1, D, device=dev, dtype=dt, generator=g)
    k[1, 0, 0, 5] = 1000.0  # saturates
    before = (cache.k.clone(), cache.v.clone())
    cache.triton = False
    ref = DecodeAttention(cache, lengths, bt, width)(0, q, k, v).float()
    want = (cache.k.view(torch.uint8).clone(), cache.v.view(torch.uint8).clone())
    res: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "decode": {}}
    ok = True
    for nsplit in sorted({1, 4, num_splits(n, H)}):
        cache.k.copy_(before[0])
        cache.v.copy_(before[1])
        cache.triton = True
        got = DecodeAttention(cache, lengths, bt, width, nsplit)(0, q, k, v).float()
        err = float((got - ref).norm() / ref.norm())
        same = bool(torch.equal(cache.k.view(torch.uint8), want[0]) and torch.equal(cache.v.view(torch.uint8), want[1]))
        res["decode"][nsplit] = {"rel_err": err, "stored_equal": same, "nan": bool(got.isnan().any())}
        ok &= err < 1e-2 and same and not got.isnan().any()
    kk = torch.randn(500, H, D, device=dev, dtype=dt, generator=g) * 100
    vv = torch.randn(500, H, D, device=dev, dtype=dt, generator=g)
    pos = torch.randperm(NB * BS, device=dev, generator=g)[:500]
    blk, off = pos // BS, pos % BS
    kernels.store_kv(kk, vv, cache.k[0], cache.v[0], blk, off)
    res["store_equal"] = bool(
        torch.equal(cache.k[0][blk, :, off].view(torch.uint8), kk.float().clamp(-448, 448).to(FP8).view(torch.uint8))
        and torch.equal(cache.v[0][blk, :, off].view(torch.uint8), vv.float().to(FP8).view(torch.uint8)))
    res["ok"] = bool(ok and res["store_equal"])
    emit(res, a.out)
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
