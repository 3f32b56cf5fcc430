"""GPU parity check: the tiny golden checkpoint on CUDA fp32 (TF32 off) gives the reference's
greedy tokens and step-0 logprobs for every golden case. (The full-size speed numbers that an
earlier version of this script also took are now `phi3v bench`.)

Usage: python benchmarks/gpu_smoke.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import emit  # noqa: E402

DATA = ROOT / "tests" / "data"


def tiny_parity() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gold = DATA / "golden"
    man = json.loads((gold / "manifest.json").read_text())
    llm = LLM(str(DATA / "tiny-phi3v"), device="cuda", dtype="fp32", max_model_len=4096)
    res = {}
    for key, case in man["model"].items():
        if case.get("status") != "ok" or not case.get("file"):
            continue
        if key.endswith("/phi3v") and key.replace("/phi3v", "/phi35v") in man["model"]:
            continue  # crossing cases: phi3v follows the Phi-3.5 fix
        z = np.load(gold / case["file"])
        imgs = [str(next(p for p in (gold / "images").iterdir() if p.stem == n)) for n in case.get("images") or []]
        c = llm.generate(case["prompt"], imgs, SamplingParams(max_tokens=32, ignore_eos=True, logprobs=1),
                         num_crops=case.get("num_crops"))
        ref = torch.log_softmax(torch.from_numpy(z["last_logits"]).double(), -1)
        res[key] = {"greedy_match": c.token_ids == z["gen_ids"].tolist(),
                    "n_match": sum(a == b for a, b in zip(c.token_ids, z["gen_ids"].tolist())),
                    "step0_logprob_abs_diff": abs(c.logprobs[0]["logprob"] - float(ref[c.token_ids[0]]))}
    del llm
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tiny_cuda_fp32": tiny_parity()}
    emit(res, a.out)


if __name__ == "__main__":
    main()
