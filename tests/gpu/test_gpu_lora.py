"""Per-request LoRA adapters on CUDA with the CUDA graphs and fused kernels on (tiny checkpoint, fp32, TF32 off): the
adapter index is a static input of the decode and prefill graphs. Each request alone equals the slow reference
generator on the checkpoint with its adapter merged by hand; in a mixed batch (base + two adapters, run-ahead decode)
every row equals its run alone.

On the GPU machine: python -m pytest -m gpu tests/gpu/test_gpu_lora.py
"""

from __future__ import annotations

import pytest
import torch

from engine_common import CKPT, image_path, reference_tokens
from lora_common import merged_checkpoint, random_layers, write_adapter
from phi3v import LLM, SamplingParams

pytestmark = pytest.mark.gpu

ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
CASES = [("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", ["astronaut"], 1),
         ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n", [], None),
         ("<|user|>\n<|image_1|>\nRead the text.<|end|>\n<|assistant|>\n", ["page_L"], 4)]


def test_per_request_adapters_with_graphs(tmp_path, report) -> None:
    l1, l2 = random_layers(ALL, 4, seed=1), random_layers(["qkv_proj", "down_proj"], 8, seed=2)
    dirs = {"a1": write_adapter(str(tmp_path / "a1"), l1, 4, 8, ALL),
            "a2": write_adapter(str(tmp_path / "a2"), l2, 8, 8, ["qkv_proj", "down_proj"])}
    merged = {"a1": merged_checkpoint(str(tmp_path / "m1"), l1, 2.0),
              "a2": merged_checkpoint(str(tmp_path / "m2"), l2, 1.0)}
    llm = LLM(CKPT, device="cuda", dtype="fp32", max_num_seqs=8, max_model_len=4096, loras=dirs)
    llm.warmup()
    n = 24

    def params(lora):
        return SamplingParams(max_tokens=n, ignore_eos=True, lora=lora)

    jobs = [(p, [image_path(i) for i in imgs], nc, lora) for p, imgs, nc in CASES for lora in (None, "a1", "a2")]
    single = [llm.generate(p, imgs, params(lora), nc).token_ids for p, imgs, nc, lora in jobs]
    refs = {}
    for name, folder in [(None, CKPT), *merged.items()]:
        ref_llm = LLM(folder, device="cuda", dtype="fp32", max_model_len=4096)
        with torch.inference_mode():
            refs[name] = [reference_tokens(ref_llm, ref_llm.prepare(p, [image_path(i) for i in imgs], params(None), nc), n)
                          for p, imgs, nc in CASES]
        del ref_llm
    want = [refs[lora][i // 3] for i, (_p, _imgs, _nc, lora) in enumerate(jobs)]
    llm.engine.reset_prefix_cache()
    reqs = [llm.prepare(p, imgs, params(lora), nc) for p, imgs, nc, lora in jobs]
    mixed = [c.token_ids for c in llm.generate_many(reqs)]
    eng = llm.engine
    report({"graphs": len(eng.runner.decoder.graphs), "prefill_graphs": len(eng.runner.prefill_graphs.graphs),
            "fused": llm.model.fused, "run_ahead": eng.run_ahead,
            "single_vs_reference": [s == w for s, w in zip(single, want)],
            "mixed_vs_single": [m == s for m, s in zip(mixed, single)]})
    assert single == want
    assert mixed == single
