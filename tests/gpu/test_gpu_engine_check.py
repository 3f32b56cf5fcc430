"""GPU correctness of the engine (issue 4): mixed batches on CUDA — different images, prompt lengths,
num_crops, arrival times, an abort, run-ahead decode and CUDA graphs on — give every request
exactly the greedy tokens of the slow reference generator (tiny checkpoint, fp32, TF32 off).

Usage: python benchmarks/gpu_engine_check.py [--out check.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import emit  # noqa: E402
from phi3v.engine.reference import reference_generate  # noqa: E402

IMG = ROOT / "tests" / "data" / "golden" / "images"
CASES = [
    ("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", ["astronaut.png"], 1, 20),
    ("<|user|>\n<|image_2|>\nfirst\n<|image_1|>\nsecond<|end|>\n<|assistant|>\n", ["coffee.png", "page_L.png"], 1, 28),
    ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n", [], None, 36),
    ("<|user|>\n<|image_1|>\nRead the text.<|end|>\n<|assistant|>\n", ["page_L.png"], 4, 12),
    ("<|user|>\n<|image_1|>\nGo on.<|end|>\n<|assistant|>\n", ["astronaut.png"], 1, 230),  # crosses 512
    ("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", ["logo_RGBA.png"], 16, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(str(ROOT / "tests" / "data" / "tiny-phi3v"), device=dev, dtype="fp32", max_num_seqs=4,
              max_model_len=4096)
    eng = llm.engine
    reqs = [llm.prepare(p, [str(IMG / i) for i in imgs], SamplingParams(max_tokens=n, ignore_eos=True), nc)
            for p, imgs, nc, n in CASES]
    with torch.inference_mode():
        refs = []
        for r in reqs:
            feats = llm.model.encode_images([i.crops for i in r.images], [i.image_size for i in r.images])
            refs.append(reference_generate(llm.model, r.prompt_ids, feats, r.params.max_tokens,
                                           frozenset(llm.config.eos_token_ids),
                                           llm.config.original_max_position_embeddings))
    got: dict[str, list[int]] = {}
    rids = [eng.add_request(r.prompt_ids, r.images, r.params, rid=f"r{i}") for i, r in enumerate(reqs[:3])]
    victim = eng.add_request(reqs[0].prompt_ids, reqs[0].images, SamplingParams(max_tokens=100, ignore_eos=True),
                             rid="victim")
    step = 0
    while eng.has_unfinished() or step < 5:
        step += 1
        if step == 5:  # arrivals while the first ones decode (4 slots: some wait for a free one)
            rids += [eng.add_request(r.prompt_ids, r.images, r.params, rid=f"r{i + 3}") for i, r in enumerate(reqs[3:])]
        if step == 9:
            eng.abort(victim)
        for o in eng.step():
            got.setdefault(o.rid, []).extend(o.token_ids)
    eng.step()
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "run_ahead": eng.run_ahead, "graphs": len(eng.runner.graphs),
           "fused": llm.model.model.fused,
           "cases": {rid: {"equal": got.get(rid) == ref, "n": len(ref)} for rid, ref in zip(rids, refs)},
           "victim_tokens": len(got.get("victim", [])), "slots_free": eng.sched.all_free}
    res["all_equal"] = all(c["equal"] for c in res["cases"].values())
    emit(res, a.out)
    sys.exit(0 if res["all_equal"] and res["slots_free"] else 1)


if __name__ == "__main__":
    main()
