"""The CLIP tower with the fused add + LayerNorm kernel against the eager add and nn.LayerNorm (GPU),
alternating on one machine, and how far apart their features are.

Usage: python benchmarks/clip_ab.py [--folder /tmp/phi3v-full-random] [--out clip_ab.json]
Each number: the median of 5 alternating rounds of cuda_ms(tower, 5), eager (no graph), quick-GELU
fused in both arms. Random weights make the tower chaotic (a one-ulp change early grows through the
layers), so each arm's bf16 features are also compared with an fp32 copy of the tower (eager, no TF32):
a fused arm as close to fp32 as the eager arm is the check.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import checkpoint_args, cuda_ms  # noqa: E402  (benchmarks/ is the script's folder)
from phi3v import LLM  # noqa: E402
from phi3v.bench import emit  # noqa: E402


@torch.inference_mode()
def main() -> None:
    a = checkpoint_args()
    llm = LLM(a.folder, device="cuda", max_num_seqs=4, max_model_len=3072)
    tower = llm.model.model.vision_embed_tokens.img_processor
    ref32 = copy.deepcopy(tower).float()
    ref32.fused = False
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "crops": {}}
    for n in (5, 17, 68):
        pixels = torch.randn(n, 3, 336, 336, device="cuda", dtype=llm.dtype)
        times: dict[bool, list[float]] = {False: [], True: []}
        feats = {}
        for _ in range(5):
            for fused in (False, True):
                tower.fused = fused
                times[fused].append(cuda_ms(lambda: tower(pixels), 5))
                feats[fused] = tower(pixels).float()
        d = (feats[True] - feats[False]).abs()
        rel = (d.norm() / feats[False].norm()).item()
        f32 = ref32(pixels.float())
        vs32 = {f"{'fused' if k else 'unfused'}_rel_l2_vs_fp32": ((v - f32).norm() / f32.norm()).item()
                for k, v in feats.items()}
        res["crops"][n] = {"unfused_ms": statistics.median(times[False]), "fused_ms": statistics.median(times[True]),
                           "max_abs_diff": d.max().item(), "rel_l2_diff": rel,
                           "equal_fraction": (d == 0).float().mean().item(), **vs32}
        print(n, res["crops"][n], flush=True)
    tower.fused = True
    emit(res, a.out)


if __name__ == "__main__":
    main()
