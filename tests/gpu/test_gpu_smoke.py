"""GPU parity check: the tiny golden checkpoint on CUDA fp32 (TF32 off) gives the reference's
greedy tokens and step-0 logprobs for every golden case; and the image processor's GPU path (pinned
canvas, table lookup, bicubic global view on the device) gives the CPU path's crops and content key
(sub-crops bit-equal, global view to float32 rounding). (The full-size speed numbers that an
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


def gpu_pixels() -> dict:
    """CPU vs GPU preprocessing on the golden images and synthetic ones (portrait, padding, exact size, RGBA)."""
    from PIL import Image

    from phi3v.processing.image import ImageProcessor

    proc = ImageProcessor()
    rng = np.random.default_rng(0)
    noise = lambda w, h, mode="RGB": Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)  # noqa: E731
    images = {p.stem: Image.open(p) for p in sorted((DATA / "golden" / "images").glob("*.png"))}
    images |= {"portrait_500x1700": noise(500, 1700), "wide_1900x300": noise(1900, 300),
               "exact_1344x1344": noise(1344, 1344), "rgba_700x400": noise(700, 400, "RGBA")}
    res = {}
    for name, img in images.items():
        for nc in (1, 4, 16):
            cpu = proc.preprocess(img, nc)
            gpu = proc.preprocess(img, nc, device="cuda")
            res[f"{name}/nc{nc}"] = {"grid": list(cpu.grid), "same_key": cpu.key == gpu.key,
                                     "same_size": cpu.image_size == gpu.image_size,
                                     "subcrops_equal": bool(torch.equal(cpu.crops[1:], gpu.crops[1:].cpu())),
                                     "global_max_abs": float((cpu.crops[0] - gpu.crops[0].cpu()).abs().max())}
    ok = all(r["same_key"] and r["same_size"] and r["subcrops_equal"] and r["global_max_abs"] < 1e-4
             for r in res.values())
    return {"ok": ok, "cases": res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "gpu_pixels": gpu_pixels(),
           "tiny_cuda_fp32": tiny_parity()}
    emit(res, a.out)


if __name__ == "__main__":
    main()
