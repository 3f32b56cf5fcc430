"""Long-prompt prefill attention (GPU): phi3v's paged Triton kernel against PyTorch's SDPA backends, one layer at
Phi-3-vision's shapes (32 heads x 96, bf16), a prompt of `--total` tokens prefilled in chunks of `--chunk`.

Per chunk at start s (T queries, s + T keys, causal aligned to the last key):
  triton      phi3v.kernels.paged_prefill over a paged cache (what the engine runs)
  flash_lr    SDPA flash backend on contiguous K/V, `causal_lower_right` bias
  cudnn_split cuDNN SDPA twice, the past without a mask and the chunk's own keys causal (top-left = bottom-right
              when square), merged by their log-sum-exps
  flash_split the same split with the flash backend
Also the whole prompt as one causal SDPA call per backend (no chunks). Each variant's last chunk is checked against
flash_lr (max |diff|). TFLOP/s counts causal pairs only (4 * D * heads per query-key pair).

Usage: python benchmarks/attention_backends.py [--total 107000] [--chunk 16384] [--out r.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.bench import cuda_median_ms, emit  # noqa: E402
from phi3v.kernels import paged_prefill  # noqa: E402

H, D, BS, DT = 32, 96, 64, torch.bfloat16


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Two partial attentions over disjoint key sets -> the attention over their union. o (1, H, T, D), lse (1, H, T)
    natural log."""
    l1, l2 = l1.reshape(*o1.shape[:3], 1).float(), l2.reshape(*o2.shape[:3], 1).float()
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(o1.dtype)


def cudnn(q, k, v, causal: bool):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    return r[0], r[1]


def flash(q, k, v, causal: bool):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    return r[0], r[1]


def split(fn, q, k, v, s: int) -> torch.Tensor:
    o2, l2 = fn(q, k[:, :, s:], v[:, :, s:], True)
    if s == 0:
        return o2
    o1, l1 = fn(q, k[:, :, :s], v[:, :, :s], False)
    return merge(o1, l1, o2, l2)


def flash_lr(q, k, v, s: int) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=107000)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    total = -(-a.total // BS) * BS
    g = torch.Generator(device="cuda").manual_seed(0)
    q_all, k_all, v_all = (torch.randn(1, H, total, D, device="cuda", dtype=DT, generator=g) for _ in range(3))
    nb = total // BS
    kc = k_all[0].view(H, nb, BS, D).permute(1, 0, 2, 3).contiguous()  # (n_blocks, H, BS, D), identity table
    vc = v_all[0].view(H, nb, BS, D).permute(1, 0, 2, 3).contiguous()
    table = torch.arange(nb, device="cuda")
    variants = {
        "triton": lambda q, k, v, s: paged_prefill.paged_prefill_attention(
            q[0].transpose(0, 1), kc, vc, table, s, k[0, :, s:].transpose(0, 1), v[0, :, s:].transpose(0, 1)
        ).transpose(0, 1)[None],
        "flash_lr": flash_lr,
        "cudnn_split": lambda q, k, v, s: split(cudnn, q, k, v, s),
        "flash_split": lambda q, k, v, s: split(flash, q, k, v, s),
    }
    chunks = [(s, min(s + a.chunk, total)) for s in range(0, total, a.chunk)]
    pairs = sum((e - s) * s + (e - s) * (e - s + 1) // 2 for s, e in chunks)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "total": total,
                 "chunk": a.chunk, "variants": {}}
    s_last, e_last = chunks[-1]
    ref = flash_lr(q_all[:, :, s_last:e_last], k_all[:, :, :e_last], v_all[:, :, :e_last], s_last)
    for name, fn in variants.items():
        try:
            def run(fn=fn):
                for s, e in chunks:
                    o = fn(q_all[:, :, s:e], k_all[:, :, :e], v_all[:, :, :e], s)
                return o
            o = run()
            ms = cuda_median_ms(run, a.reps)
            diff = (o.float() - ref.float()).abs().max().item()
            res["variants"][name] = {"ms": ms, "tflops": 4 * D * H * pairs / ms / 1e9, "x32_s": 32 * ms / 1000,
                                     "max_abs_diff_last_chunk": diff}
        except Exception as e:  # noqa: BLE001 - a backend this build lacks is reported, not fatal
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, res["variants"][name], flush=True)
    whole = total * (total + 1) // 2
    for name, fn in (("whole_cudnn", lambda: cudnn(q_all, k_all, v_all, True)[0]),
                     ("whole_flash", lambda: flash(q_all, k_all, v_all, True)[0])):
        try:
            fn()
            ms = cuda_median_ms(fn, a.reps)
            res["variants"][name] = {"ms": ms, "tflops": 4 * D * H * whole / ms / 1e9, "x32_s": 32 * ms / 1000}
        except Exception as e:  # noqa: BLE001
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, res["variants"][name], flush=True)
    emit(res, a.out)


if __name__ == "__main__":
    main()
