"""vLLM on the same GPU, measured with phi3v bench's definitions (phi3v/bench.py), for a side-by-side ratio.

(a) batch-1 decode tok/s with one 16-crop 1344x1344 noise image: 255 / (T(256 tokens) - T(1 token)), medians of 3;
(b) TTFT at 16 crops (1344x1344) and 4 crops (672x672), a new image each rep, median of reps 2-6, preprocessing included;
(c) offline: 64 noise images of the 8 mixed sizes x 200 tokens (eos ignored), all submitted at once, images/s,
    image creation inside the timed region as in phi3v bench;
(d) memory is vLLM's preallocation (gpu_memory_utilization 0.9, as phi3v's default).
Usage: python benchmarks/vllm_peer_bench.py MODEL_DIR OUT_JSON [CROPS]   CROPS: "16,4" (default) or one count; (a) needs 16.
The per-request num_crops goes through mm_processor_kwargs; prompt token counts are recorded to show that it took.
Results are written after every part, so a later failure keeps the earlier numbers.
"""
import json, os, statistics, sys, time

import numpy as np
from PIL import Image

PROMPT = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"
MIXED_SIZES = [(1344, 1344), (1600, 900), (900, 1600), (800, 600), (2000, 500), (640, 640), (1024, 768), (500, 2000)]


def noise_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def main():
    model, out = sys.argv[1], sys.argv[2]
    crops = [int(c) for c in (sys.argv[3] if len(sys.argv) > 3 else "16,4").split(",")]
    from vllm import LLM, SamplingParams
    import vllm
    t = time.perf_counter()
    llm = LLM(model=model, trust_remote_code=True, dtype="bfloat16", max_model_len=3072, max_num_seqs=64,
              gpu_memory_utilization=0.9, limit_mm_per_prompt={"image": 1},
              mm_processor_kwargs={"num_crops": crops[0]}, seed=0,
              **json.loads(os.environ.get("VLLM_KW", "{}")))  # e.g. {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    res = {"engine": f"vllm {vllm.__version__}", "load_and_warmup_s": time.perf_counter() - t, "crops": crops}

    def save():
        print(json.dumps(res), flush=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    def req(img, nc):
        return {"prompt": PROMPT, "multi_modal_data": {"image": img}, "mm_processor_kwargs": {"num_crops": nc}}

    def gen(reqs, n):
        return llm.generate(reqs, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0), use_tqdm=False)

    if 16 in crops:
        img16 = noise_image(1344, 1344, 0)
        o = gen([req(img16, 16)], 8)
        res["a_prompt_tokens"] = len(o[0].prompt_token_ids)
        t1, t256 = [], []
        for _ in range(3):
            t = time.perf_counter(); gen([req(img16, 16)], 1); t1.append(time.perf_counter() - t)
            t = time.perf_counter(); o = gen([req(img16, 16)], 256); t256.append(time.perf_counter() - t)
        assert len(o[0].outputs[0].token_ids) == 256
        res["a_decode_tok_s"] = 255 / (statistics.median(t256) - statistics.median(t1))
        save()
    for nc in crops:
        size = (1344, 1344) if nc >= 16 else (672, 672)
        tt, ntok = [], None
        for s in range(6):
            img = noise_image(*size, 100 + s)
            t = time.perf_counter(); o = gen([req(img, nc)], 1); tt.append(time.perf_counter() - t)
            ntok = len(o[0].prompt_token_ids)
        res[f"b_ttft_ms_{nc}crop"] = 1000 * statistics.median(tt[1:])
        res[f"b_prompt_tokens_{nc}crop"] = ntok
        save()
    for nc in crops:
        n = 64
        gen([req(noise_image(*MIXED_SIZES[i % 8], 1000 + n + i), nc) for i in range(n)], 2)  # warm-up, untimed
        t = time.perf_counter()
        reqs = [req(noise_image(*MIXED_SIZES[i % 8], 1000 + i), nc) for i in range(n)]
        outs = gen(reqs, 200)
        dt = time.perf_counter() - t
        res[f"c_offline_{nc}crop_images_per_s"] = n / dt
        res[f"c_offline_{nc}crop_tokens_per_s"] = sum(len(x.outputs[0].token_ids) for x in outs) / dt
        res[f"c_offline_{nc}crop_prompt_tokens_mean"] = sum(len(x.prompt_token_ids) for x in outs) / n
        save()


if __name__ == "__main__":
    main()
