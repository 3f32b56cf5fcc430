"""GPU parity: the tiny golden checkpoint on CUDA fp32 (TF32 off) gives the reference's greedy tokens and
step-0 logprobs for every golden case; and the image processor's GPU path (pinned canvas, table lookup,
bicubic global view on the device) gives the CPU path's crops and content key (sub-crops bit-equal, global
view to float32 rounding). (The full-size speed numbers are `phi3v bench`.)

On the GPU machine: python -m pytest -m gpu tests/gpu/test_gpu_smoke.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phi3v import LLM, SamplingParams

from engine_common import CKPT, ENGINE_CASES, GOLD, MANIFEST, image_path

pytestmark = pytest.mark.gpu

LOGPROB_TOL = 1e-3  # as test_engine.py's golden logprobs on the CPU


def test_golden_greedy_tokens_and_logprobs_on_cuda(report) -> None:
    llm = LLM(CKPT, device="cuda", dtype="fp32", max_model_len=4096)
    res = {}
    for key in ENGINE_CASES:
        case = MANIFEST["model"][key]
        z = np.load(GOLD / case["file"])
        c = llm.generate(case["prompt"], [image_path(n) for n in case.get("images") or []],
                         SamplingParams(max_tokens=32, ignore_eos=True, logprobs=1), num_crops=case.get("num_crops"))
        want = z["gen_ids"].tolist()
        ref = torch.log_softmax(torch.from_numpy(z["last_logits"]).double(), -1)
        res[key] = {"greedy_match": c.token_ids == want, "n_match": sum(a == b for a, b in zip(c.token_ids, want)),
                    "step0_logprob_abs_diff": abs(c.logprobs[0]["logprob"] - float(ref[c.token_ids[0]]))}
    del llm
    torch.cuda.empty_cache()
    report({"tiny_cuda_fp32": res})
    assert res, "no golden case ran"
    assert [k for k, r in res.items() if not r["greedy_match"]] == []
    assert [k for k, r in res.items() if r["step0_logprob_abs_diff"] > LOGPROB_TOL] == []


def _images() -> dict:
    """The golden images and synthetic ones: portrait, wide, exactly one 1344 tile, RGBA."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)

    images = {p.stem: Image.open(p) for p in sorted((GOLD / "images").glob("*.png"))}
    return images | {"portrait_500x1700": noise(500, 1700), "wide_1900x300": noise(1900, 300),
                     "exact_1344x1344": noise(1344, 1344), "rgba_700x400": noise(700, 400, "RGBA")}


def test_gpu_preprocessing_equals_the_cpu_path(report) -> None:
    from phi3v.processing.image import ImageProcessor

    proc = ImageProcessor()
    res = {}
    for name, img in _images().items():
        for nc in (1, 4, 16):
            cpu = proc.preprocess(img, nc)
            gpu = proc.preprocess(img, nc, device="cuda")
            res[f"{name}/nc{nc}"] = {"grid": list(cpu.grid), "same_key": cpu.key == gpu.key,
                                     "same_size": cpu.image_size == gpu.image_size,
                                     "subcrops_equal": bool(torch.equal(cpu.crops[1:], gpu.crops[1:].cpu())),
                                     "global_max_abs": float((cpu.crops[0] - gpu.crops[0].cpu()).abs().max())}
    bad = [k for k, r in res.items()
           if not (r["same_key"] and r["same_size"] and r["subcrops_equal"] and r["global_max_abs"] < 1e-4)]
    report({"gpu_pixels": {"ok": not bad, "cases": res}})
    assert bad == []
