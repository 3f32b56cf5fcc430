"""Per-request LoRA in decode steps with every Triton kernel on, under the CPU interpreter (tiny checkpoint, fp32):
- one decode step with adapters launches exactly one kernel per decoder layer more than the base model's (the qkv
  expand: the shrink rides in the GEMVs, the other expands in the norms and SiLU * up; it was two per targeted
  layer, eight per decoder layer), and computes what the eager path does;
- the engine's greedy tokens for a mixed batch (base, two adapters) equal the slow reference generator's on the
  checkpoints with each adapter merged by hand (computed here, outside the interpreter)."""

from __future__ import annotations

import json
import math

import pytest
from engine_common import reference_tokens
from interp import run_interpreted
from lora_common import merged_checkpoint, random_layers, write_adapter
from phi3v import LLM, SamplingParams

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

STEP_SCRIPT = r"""
import collections
import torch
import triton.runtime.interpreter as ti
from phi3v.config import Phi3VConfig
from phi3v.models.lora import LoraLayer, attach_loras
from phi3v.models.weights import load_model

CKPT = "tests/data/tiny-phi3v"
cfg = Phi3VConfig.from_pretrained(CKPT)
model = load_model(CKPT, cfg, "cpu", torch.float32)
g = torch.Generator().manual_seed(0)
adapters = {}
for name, rank in (("a1", 4), ("a2", 8)):
    adapters[name] = {}
    for i in range(cfg.num_hidden_layers):
        for mod in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            lin = model.get_submodule(f"model.layers.{i}.{mod}")
            adapters[name][f"model.layers.{i}.{mod}"] = LoraLayer(
                torch.randn(rank, lin.in_features, generator=g) * 0.3,
                torch.randn(lin.out_features, rank, generator=g) * 0.3, 2.0)
attach_loras(model, adapters, torch.float32)
launches = collections.Counter()
_run = ti.InterpretedFunction.run
def counted(self, *args, **kwargs):
    launches[self.fn.__name__] += 1
    return _run(self, *args, **kwargs)
ti.InterpretedFunction.run = counted

rows = torch.tensor([0, 1, 2, 1])
x = model.model.embed_tokens(torch.tensor([5, 6, 7, 8]))[:, None]  # a decode step: (B, 1, hidden)
pos, flags = torch.tensor([[3], [9], [4], [12]]), torch.zeros(4, dtype=torch.bool)

def step(lora):
    launches.clear()
    with torch.inference_mode():
        h = model(x, pos, flags, None, lora)
    return h, dict(launches)

model.set_kernels(True)
h_base, base = step(None)
h_lora, lora = step(rows)
extra = collections.Counter(lora)
extra.subtract(base)
assert {k: v for k, v in extra.items() if v} == {"_expand_kernel": cfg.num_hidden_layers}, (base, lora)
model.set_kernels(False)
want_base, want = step(None)[0], step(rows)[0]
assert (h_base - want_base).abs().max() < 1e-4 and (h_lora - want).abs().max() < 1e-4
assert (h_lora[0] - h_base[0]).abs().max() < 1e-5 and (h_lora[1] - h_base[1]).abs().max() > 1e-2  # base row: base
print("ok", sum(base.values()), sum(lora.values()))
"""


def test_a_decode_step_with_adapters_launches_one_kernel_more_per_layer() -> None:
    out = run_interpreted(STEP_SCRIPT).split()
    assert out[0] == "ok" and int(out[2]) - int(out[1]) == 2, out  # the tiny checkpoint's 2 decoder layers


ENGINE_SCRIPT = r"""
import json
from phi3v import LLM, SamplingParams
from phi3v.kernels import gemv
cfg = json.loads(ARGS)  # set before this script: the adapters' folders, tokens per request, (prompt, adapter) jobs
# the lm_head's GEMV (32k rows) takes minutes interpreted: it alone runs in torch
_supported = gemv.supported
gemv.supported = lambda x, w, scale=None: w.shape[0] < 32000 and _supported(x, w, scale)
llm = LLM("tests/data/tiny-phi3v", device="cpu", dtype="fp32", max_num_seqs=4, max_model_len=256, kv_block_size=16,
          loras=cfg["loras"])
assert llm.model.fused and llm.engine.cache.triton
import triton.runtime.interpreter as ti
expands = []
_run = ti.InterpretedFunction.run
def counted(self, *args, **kwargs):
    expands.append(self.fn.__name__ == "_expand_kernel")
    return _run(self, *args, **kwargs)
ti.InterpretedFunction.run = counted
reqs = [llm.prepare(p, [], SamplingParams(max_tokens=cfg["n"], ignore_eos=True, lora=a)) for p, a in cfg["jobs"]]
got = [c.token_ids for c in llm.generate_many(reqs)]
assert sum(expands) >= 2 * (cfg["n"] - 1), sum(expands)  # the decode steps ran the kernels (qkv's expand)
print(json.dumps(got))
"""


def test_engine_mixed_batch_equals_the_hand_merged_references(tmp_path) -> None:
    n = 6
    l1, l2 = random_layers(ALL, 4, seed=1), random_layers(["qkv_proj", "down_proj"], 8, seed=2)
    loras = {"a1": write_adapter(str(tmp_path / "a1"), l1, 4, 8, ALL),
             "a2": write_adapter(str(tmp_path / "a2"), l2, 8, 4, ["qkv_proj", "down_proj"], rslora=True)}
    refs = {None: "tests/data/tiny-phi3v", "a1": merged_checkpoint(str(tmp_path / "m1"), l1, 8 / 4),
            "a2": merged_checkpoint(str(tmp_path / "m2"), l2, 4 / math.sqrt(8))}
    prompts = ["<|user|>\nHello there, who are you?<|end|>\n<|assistant|>\n",
               "<|user|>\nCount: one two three.<|end|>\n<|assistant|>\n"]
    jobs = [(prompts[0], None), (prompts[1], "a1"), (prompts[0], "a2"), (prompts[0], "a1")]
    want = []
    for p, a in jobs:
        ref = LLM(refs[a], device="cpu", dtype="fp32", max_model_len=256)
        want.append(reference_tokens(ref, ref.prepare(p, [], SamplingParams(max_tokens=n)), n))
    assert len({tuple(t) for t in want}) == 4  # every row's model answers differently
    args = json.dumps({"loras": loras, "n": n, "jobs": jobs})
    got = run_interpreted(f"ARGS = {args!r}\n" + ENGINE_SCRIPT)
    assert json.loads(got.strip().splitlines()[-1]) == want
