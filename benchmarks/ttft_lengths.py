"""Time to first token of one 16-crop image, prompt by prompt: does the prompt length, or only how often a length
was seen, move it? (`cold_shapes.py` read 59-66 ms where `phi3v bench` (b) reads 48-53 for the same image size.)

Usage: python benchmarks/ttft_lengths.py [--folder /tmp/phi3v-full-random] [--out ttft_lengths.json]
Environment: TTFT_IMAGES=2 asks about two 16-crop images at once (~5,050 tokens: prefilled in two chunks).
An A/B against an earlier commit: copy benchmarks/ into a folder holding that commit's phi3v/ (e.g. `.ab_base/`)
and run the copy from there; the JSON's `phi3v_from` says which package ran.
After `LLM.warmup()`: one request under cProfile (what the first request after the warm-up spends), the bench's
prompt 6 times, then three longer prompts ("Be brief." k times, as cold_shapes
uses) 4 times each, then the bench's prompt again; a new noise image every call (no embedding-cache hit). Each
call is also split into vision / embeddings / decoder prefill with the bench's synchronising timers.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import checkpoint_args  # noqa: E402  (benchmarks/ is the script's folder)
from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import PROMPT, _instrument, emit, noise_image  # noqa: E402


N_IMAGES = int(os.environ.get("TTFT_IMAGES", "1"))
BASE_PROMPT = PROMPT if N_IMAGES == 1 else PROMPT.replace(
    "<|image_1|>\n", "".join(f"<|image_{i + 1}|>\n" for i in range(N_IMAGES))).replace("Describe the image", "Compare the images")


def images(seed: int) -> list:
    return [noise_image(1344, 1344, seed * 10 + i) for i in range(N_IMAGES)]


def main() -> None:
    a = checkpoint_args()
    llm = LLM(a.folder, device="cuda", max_num_seqs=64, max_model_len=3072 if N_IMAGES == 1 else 8192)
    llm.warmup()
    import phi3v

    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "runs": [],
                 "images_per_request": N_IMAGES, "phi3v_from": str(Path(phi3v.__file__).parent)}
    # the first request after the warm-up, under cProfile (host functions by cumulative time, GPU waits included)
    img = images(699)
    llm.prepare(BASE_PROMPT, img, SamplingParams(max_tokens=1), 16)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.runcall(llm.generate, BASE_PROMPT, img, SamplingParams(max_tokens=1), num_crops=16)
    res["first_call_profiled_ms"] = round((time.perf_counter() - t) * 1000, 2)
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:40]  # (file, line, name) -> (cc, nc, tt, ct, ...)
    res["first_call_top_cumulative_ms"] = [(f"{Path(k[0]).name}:{k[1]}:{k[2]}", round(v[3] * 1000, 2), v[1])
                                           for k, v in rows]
    seed = 700
    for k, reps in ((0, 6), (1, 4), (2, 4), (3, 4), (0, 4), (1, 4)):
        prompt = BASE_PROMPT.replace("detail.", "detail." + " Be brief." * k)
        row: dict = {"k": k, "ttft_ms": [], "parts_ms": []}
        for _ in range(reps):
            seed += 1
            img = images(seed)
            prepared = llm.prepare(prompt, img, SamplingParams(max_tokens=1), 16)
            row["prompt_tokens"] = len(prepared.prompt_ids)
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompt, img, SamplingParams(max_tokens=1), num_crops=16)
            row["ttft_ms"].append(round((time.perf_counter() - t) * 1000, 2))
        acc = _instrument(llm.engine)  # the same prompt once more, split (its timers sync: a little slower)
        seed += 1
        llm.generate(prompt, images(seed), SamplingParams(max_tokens=1), num_crops=16)
        row["parts_ms"] = {n: round(v * 1000, 2) for n, v in acc.items()}
        row["median_after_first_ms"] = statistics.median(row["ttft_ms"][1:])
        res["runs"].append(row)
        eng = llm.engine  # the timers are instance attributes over the methods: drop them
        for obj, name in ((eng.images, "encode"), (eng, "_prompt_embeds"), (eng.prefiller, "prefill_many")):
            obj.__dict__.pop(name, None)
    emit(res, a.out)


if __name__ == "__main__":
    main()
