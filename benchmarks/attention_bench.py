"""Decode attention alone (GPU): the paged Triton kernel (with its K/V store) at several KV-split
counts against the old path (two `index_put`s into a contiguous cache + SDPA over the batch's
padded width), for Phi-3-vision's shapes (32 heads x 96, bf16) and a 16-crop-sized context.

Usage: python benchmarks/attention_bench.py [--out attention.json]
Each number: one layer's call, timed over 8 layers' caches in a CUDA graph (more than L2 holds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.bench import emit  # noqa: E402
from phi3v.engine.paged_attention import num_splits, paged_decode_attention  # noqa: E402

H, D, BS, LAYERS = 32, 96, 64, 8  # 8 layers of KV: > 250 MB per pass even at batch 1


def graph_ms(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def case(batch: int, ctx: int, spread: float) -> dict:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lens = [max(1, int(ctx * (1 - spread * torch.rand(1, generator=g).item()))) for _ in range(batch)]
    nb = -(-(max(lens) + 1) // BS)
    n_blocks = batch * nb
    kc = torch.randn(LAYERS, n_blocks + 1, H, BS, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = torch.randperm(n_blocks, device=dev).int().view(batch, nb)
    lengths = torch.tensor(lens, device=dev)
    q = torch.randn(batch, H, D, device=dev, dtype=dt)
    k, v = torch.randn(batch, H, D, device=dev, dtype=dt), torch.randn(batch, H, D, device=dev, dtype=dt)
    kv_bytes = sum(lens) * H * D * 2 * 2  # K and V of every row's own length
    res = {"batch": batch, "mean_len": sum(lens) / batch, "max_len": max(lens), "kv_mb_per_layer": kv_bytes / 1e6}
    default = num_splits(batch, H)
    res["paged_default_nsplit"] = default
    res["paged_default_us"] = 1000 * graph_ms(
        lambda: [paged_decode_attention(q, k, v, kc[i], vc[i], bt, lengths, default) for i in range(LAYERS)]) / LAYERS
    splits = (8, 16, 32) if batch == 1 else (2, 4, 8, 16) if batch <= 8 else (1, 2, 4)
    sweep = []
    for ns in splits:
        for tile in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    def fn(ns=ns, tile=tile, warps=warps, stages=stages):
                        return [paged_decode_attention(q, k, v, kc[i], vc[i], bt, lengths, ns, tile, warps, stages)
                                for i in range(LAYERS)]
                    try:
                        us = 1000 * graph_ms(fn, 10) / LAYERS
                    except Exception as e:  # e.g. out of shared memory for this tile
                        sweep.append({"nsplit": ns, "tile": tile, "warps": warps, "stages": stages, "error": str(e)[:80]})
                        continue
                    sweep.append({"nsplit": ns, "tile": tile, "warps": warps, "stages": stages, "us": us,
                                  "tb_s": kv_bytes / us / 1e6})
    ok = sorted((x for x in sweep if "us" in x), key=lambda x: x["us"])
    res["paged_best"] = ok[0] if ok else None
    res["paged_top5"] = ok[:5]
    res["paged_errors"] = [x for x in sweep if "error" in x][:3]
    # old path: contiguous (batch, H, W, D) slots, index_put the new token, SDPA over the bucketed width
    width = (max(lens) + 1 + 255) // 256 * 256
    ks = torch.randn(LAYERS, batch, H, width, D, device=dev, dtype=dt)
    vs = torch.randn_like(ks)
    rows = torch.arange(batch, device=dev)
    mask = (torch.arange(width, device=dev)[None, :] <= lengths[:, None])[:, None, None, :]

    def old(i: int) -> torch.Tensor:
        ks[i][rows, :, lengths] = k
        vs[i][rows, :, lengths] = v
        return F.scaled_dot_product_attention(q[:, :, None], ks[i], vs[i], attn_mask=mask)

    ms = graph_ms(lambda: [old(i) for i in range(LAYERS)])
    res["sdpa_index_put_us"] = 1000 * ms / LAYERS
    res["sdpa_index_put_tb_s_useful"] = kv_bytes * LAYERS / ms / 1e9
    # agreement of the two (same K/V contents for row 0's own length)
    out = paged_decode_attention(q, k, v, kc[0], vc[0], bt, lengths, num_splits(batch, H))
    kk = kc[0][bt.long()].transpose(1, 2).flatten(2, 3)  # (batch, H, nb*BS, D), new K/V already stored
    vv = vc[0][bt.long()].transpose(1, 2).flatten(2, 3)
    m2 = (torch.arange(nb * BS, device=dev)[None, :] <= lengths[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=m2)[:, :, 0]
    res["max_abs_diff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "cases": []}
    for batch, ctx, spread in ((1, 2600, 0.0), (8, 2600, 0.3), (48, 2600, 0.3), (64, 900, 0.5)):
        out["cases"].append(case(batch, ctx, spread))
    emit(out, a.out)


if __name__ == "__main__":
    main()
