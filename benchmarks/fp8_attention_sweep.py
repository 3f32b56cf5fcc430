"""Decode attention over an fp8 (e4m3) KV cache against bf16 (GPU), at (tile, warps, stages) settings:
batch 1 and batch 64 at 16-crop contexts, Phi-3-vision's 32 heads x 96. Prints the fastest fp8
setting as PHI3V_ATTN_CONFIG's value (last line), so a bench run in the same call can use it.

Usage: python benchmarks/fp8_attention_sweep.py [--out sweep.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_bench import BS, D, H, LAYERS, graph_ms  # noqa: E402
from phi3v.bench import emit  # noqa: E402
from phi3v.engine.paged_attention import num_splits, paged_decode_attention  # noqa: E402

FP8 = torch.float8_e4m3fn


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = "cuda"
    res: dict = {"device": torch.cuda.get_device_name(0), "cases": []}
    score: dict = {}
    for batch, ctx in ((1, 2600), (64, 2400)):
        g = torch.Generator().manual_seed(0)
        lens = [max(1, int(ctx * (1 - 0.3 * torch.rand(1, generator=g).item()))) for _ in range(batch)]
        nb = -(-(max(lens) + 1) // BS)
        kb = torch.randn(LAYERS, batch * nb + 1, H, BS, D, device=dev, dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        k8, v8 = kb.to(FP8), vb.to(FP8)
        bt = torch.randperm(batch * nb, device=dev).int().view(batch, nb)
        lengths = torch.tensor(lens, device=dev)
        q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        ns = num_splits(batch, H)
        tokens = sum(lens) * H * D * 2  # K and V values per layer
        case = {"batch": batch, "mean_len": sum(lens) / batch, "nsplit": ns, "runs": []}

        def run(kc, vc, cfg):
            return 1000 * graph_ms(lambda: [paged_decode_attention(q, k, v, kc[i], vc[i], bt, lengths, ns, *cfg)
                                            for i in range(LAYERS)], 10) / LAYERS

        us = run(kb, vb, (64, 4, 2))
        case["bf16_us"], case["bf16_tb_s"] = us, tokens * 2 / us / 1e6
        for tile in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    try:
                        us = run(k8, v8, (tile, warps, stages))
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                        case["runs"].append({"cfg": [tile, warps, stages], "error": str(e)[:80]})
                        continue
                    case["runs"].append({"cfg": [tile, warps, stages], "us": us, "tb_s": tokens / us / 1e6})
                    score.setdefault((tile, warps, stages), []).append(us / case["bf16_us"])
        best = min((r for r in case["runs"] if "us" in r), key=lambda r: r["us"])
        case["fp8_best"] = best
        print(f"batch {batch}: bf16 {case['bf16_us']:.1f} us ({case['bf16_tb_s']:.2f} TB/s), fp8 best {best}", flush=True)
        res["cases"].append(case)
    # the setting with the best product of fp8/bf16 time ratios over both batches
    cfg = min(score, key=lambda c: score[c][0] * score[c][-1] if len(score[c]) == 2 else 1e9)
    res["chosen"] = {"cfg": list(cfg), "ratios_vs_bf16": score[cfg]}
    emit(res, a.out)
    print("fp8=%d,%d,%d" % cfg)


if __name__ == "__main__":
    main()
