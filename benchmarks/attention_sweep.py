"""Tuning tool (GPU): the paged decode-attention kernel alone over (KV splits, tile, warps, stages), bf16 or fp8 KV
cache, at Phi-3-vision's shapes (32 heads x 96, blocks of 64) and 16-crop-sized contexts. Run it on a new GPU model:
it prints the fastest (tile, warps, stages) as a PHI3V_ATTN_CONFIG value (last line), which `phi3v bench` can take
for an A/B before the defaults in the kernel module (and `num_splits`) are changed.

Usage: python benchmarks/attention_sweep.py [--kv-dtype bf16|fp8] [--out sweep.json]
Each number: one layer's call (new-token store included), timed over 8 layers' caches (more than L2 holds) replayed
in a CUDA graph, the median of the replays; TB/s counts the K/V bytes of every row's own length.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.bench import emit, graph_ms  # noqa: E402
from phi3v.kernels.paged_attention import num_splits, paged_decode_attention  # noqa: E402

H, D, BS, LAYERS = 32, 96, 64, 8
CASES = ((1, 2600, 0.0), (8, 2600, 0.3), (48, 2600, 0.3), (64, 900, 0.5))  # batch, context, length spread


@torch.inference_mode()
def case(batch: int, ctx: int, spread: float, kv_dtype: torch.dtype) -> dict:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lens = [max(1, int(ctx * (1 - spread * torch.rand(1, generator=g).item()))) for _ in range(batch)]
    nb = -(-(max(lens) + 1) // BS)
    kc = torch.randn(LAYERS, batch * nb + 1, H, BS, D, device=dev, dtype=dt).to(kv_dtype)
    vc = torch.randn_like(kc, dtype=dt).to(kv_dtype)
    bt = torch.randperm(batch * nb, device=dev).int().view(batch, nb)
    lengths = torch.tensor(lens, device=dev)
    q, k, v = (torch.randn(batch, H, D, device=dev, dtype=dt) for _ in range(3))
    kv_bytes = sum(lens) * H * D * 2 * kc.element_size()
    default = num_splits(batch, H)

    def us(ns: int, *cfg: int) -> float:
        return 1000 * graph_ms(lambda: [paged_decode_attention(q, k, v, kc[i], vc[i], bt, lengths, ns, cfg)
                                        for i in range(LAYERS)]) / LAYERS

    res = {"batch": batch, "mean_len": sum(lens) / batch, "default_nsplit": default, "default_us": us(default)}
    splits = (8, 16, 32) if batch == 1 else (2, 4, 8, 16) if batch <= 8 else (1, 2, 4)
    runs = []
    for ns, tile, warps, stages in itertools.product(splits, (32, 64, 128), (2, 4, 8), (2, 3, 4)):
        cfg = {"nsplit": ns, "tile": tile, "warps": warps, "stages": stages}
        try:
            t = us(ns, tile, warps, stages)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this tile
            runs.append({**cfg, "error": str(e)[:80]})
            continue
        runs.append({**cfg, "us": t, "tb_s": kv_bytes / t / 1e6})
    ok = sorted((r for r in runs if "us" in r), key=lambda r: r["us"])
    res.update(best=ok[0] if ok else None, top5=ok[:5], runs=ok, errors=[r for r in runs if "error" in r][:3])
    print(f"batch {batch}: default {res['default_us']:.1f} us, best {res['best']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    kv = torch.float8_e4m3fn if a.kv_dtype == "fp8" else torch.bfloat16
    res = {"device": torch.cuda.get_device_name(0), "kv_dtype": a.kv_dtype,
           "cases": [case(b, c, s, kv) for b, c, s in CASES]}
    # the (tile, warps, stages) that ran in every case with the best product of (its best split's time / the
    # default's time) over the cases
    per_case = []
    for c in res["cases"]:
        best: dict[tuple[int, int, int], float] = {}
        for r in c["runs"]:
            key = (r["tile"], r["warps"], r["stages"])
            best[key] = min(best.get(key, 1e9), r["us"] / c["default_us"])
        per_case.append(best)
    common = set.intersection(*(set(b) for b in per_case))
    score = {key: math.prod(b[key] for b in per_case) for key in common}
    cfg = min(score, key=score.get)
    res["chosen"] = {"cfg": list(cfg), "product_of_ratios_vs_default": score[cfg]}
    emit(res, a.out)
    print("%s=%d,%d,%d" % (a.kv_dtype, *cfg))


if __name__ == "__main__":
    main()
