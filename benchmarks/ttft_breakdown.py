"""Where time to first token goes (GPU): each phase of one request timed alone, synchronised.

Usage: python benchmarks/ttft_breakdown.py [--folder /tmp/phi3v-full-random] [--out ttft.json]
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import PROMPT, emit, noise_image  # noqa: E402
from phi3v.processing.chat import tokenize_prompt  # noqa: E402
from phi3v.processing.image import hd_canvas  # noqa: E402
from decode_profile import checkpoint_args  # noqa: E402  (benchmarks/ is the script's folder)



def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int = 7) -> float:
    out = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(1000 * (time.perf_counter() - t))
    return statistics.median(out[1:])


@torch.inference_mode()
def main() -> None:
    a = checkpoint_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(a.folder, device=dev, max_num_seqs=4, max_model_len=3072)
    m, proc = llm.model, llm.image_processor
    res: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}
    for nc, size in ((16, (1344, 1344)), (4, (672, 672))):
        img = noise_image(*size, 7)
        fresh = iter([noise_image(*size, 100 + i) for i in range(8)])  # new images: no embedding-cache hits
        p = proc.preprocess(img, nc, device=dev)
        req = llm.prepare(PROMPT, [img], SamplingParams(max_tokens=1), nc)
        ids = torch.tensor(req.prompt_ids, device=dev)
        feats = m.encode_images([p.crops], [p.image_size])
        emb = m.embed(ids, feats)
        L = emb.shape[0]
        r = {
            "canvas_cpu_ms": timed(lambda: hd_canvas(img.convert("RGB"), nc)),
            "preprocess_total_ms": timed(lambda: proc.preprocess(img, nc, device=dev)),
            "hash_ms": timed(lambda: hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest()),
            "tokenize_ms": timed(lambda: tokenize_prompt(llm.tokenizer, PROMPT, [p.num_tokens])),
            "prepare_total_ms": timed(lambda: llm.prepare(PROMPT, [img], SamplingParams(max_tokens=1), nc)),
            "vision_ms": timed(lambda: m.encode_images([p.crops], [p.image_size])),
            "vision_graph_ms": timed(lambda: m.encode_images([p.crops], [p.image_size], tower=llm.engine.vision_runner)),
            "vision_graph_vs_eager_max_abs": float((m.encode_images([p.crops], [p.image_size], tower=llm.engine.vision_runner)[0]
                                                    - feats[0]).abs().max()),
            "embed_ms": timed(lambda: m.embed(ids, feats)),
            "prefill_forward_ms": timed(lambda: m.logits(m(emb[None], torch.arange(L, device=dev)[None],
                                                             torch.tensor([False], device=dev), None)[:, -1])),
            "generate_1_token_ms": timed(lambda: llm.generate(PROMPT, [next(fresh)], SamplingParams(max_tokens=1),
                                                              num_crops=nc)),
            "prompt_tokens": L,
        }
        res[f"nc{nc}"] = r
    emit(res, a.out)


if __name__ == "__main__":
    main()
