"""The CLIP tower over n crops (GPU): eager on exactly n crops against a CUDA graph of the next bucket up
(which computes the padding crops too). It showed where the tower turns compute-bound (~9 crops), where padding
is pure waste. The engine now replays graphs of exactly 1-17 crops and splits larger batches into such chunks
(runner.VISION_CHUNK; the per-crop cost at 17 is within ~2 % of 128).

Usage: python benchmarks/vision_buckets.py [--folder /tmp/phi3v-full-random] [--out vision.json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import checkpoint_args, cuda_ms  # noqa: E402  (benchmarks/ is the script's folder)
from phi3v import LLM  # noqa: E402
from phi3v.bench import emit  # noqa: E402
from phi3v.engine.runner import capture_graph  # noqa: E402

BUCKETS = (17, 25, 33, 49, 65, 97, 129)  # the graph sizes the engine used to capture


@torch.inference_mode()
def main() -> None:
    a = checkpoint_args()
    llm = LLM(a.folder, device="cuda", max_num_seqs=4, max_model_len=3072)
    tower = llm.model.model.vision_embed_tokens.img_processor
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "ms": {}}
    graphs = {}
    for b in BUCKETS:
        x = torch.randn(b, 3, 336, 336, device="cuda", dtype=llm.dtype)
        graphs[b] = (capture_graph(lambda x=x: tower(x), None)[0], x)
    for n in (17, 20, 34, 40, 50, 70, 100, 110, 128):
        pixels = torch.randn(n, 3, 336, 336, device="cuda", dtype=llm.dtype)
        b = next(bb for bb in BUCKETS if bb >= n)
        g, x = graphs[b]

        def replay() -> None:
            x[:n].copy_(pixels)
            x[n:].zero_()
            g.replay()

        res["ms"][n] = {"eager": cuda_ms(lambda: tower(pixels), 5), f"graph_{b}": cuda_ms(replay, 5)}
        print(n, res["ms"][n], flush=True)
    emit(res, a.out)


if __name__ == "__main__":
    main()
