"""LoRA adapters on the tiny checkpoint (CPU, fp32): PEFT folders written here (tests/lora_common.py) give the greedy
tokens of the checkpoint with the adapter merged by hand, checked against the slow reference generator on that
merged checkpoint, in merge mode (LLM(lora=...)) and per request (LLM(loras=...), SamplingParams(lora=...)), alone and
in mixed batches of the base model and two adapters; the prefix cache is never shared across adapters; `.bin`
adapters and checkpoints; what combines with quantization."""

from __future__ import annotations

import math
import os

import pytest
import torch

from engine_common import CKPT, PROMPTS, image_path, reference_tokens
from lora_common import CFG, H, merged_checkpoint, random_layers, write_adapter
from phi3v import LLM, SamplingParams
from phi3v.engine.block_pool import block_hashes

N = 8  # tokens per request
ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TEXT = "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n"
IMG = ("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", [image_path("astronaut")])


def _llm(model: str = CKPT, **kw) -> LLM:
    return LLM(model, device="cpu", dtype="fp32", max_num_seqs=8, max_model_len=2048, **kw)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """Two adapters (a1: every decoder linear, r 4, alpha 8, safetensors; a2: qkv + down, r 8, alpha 4, rsLoRA,
    adapter_model.bin) and the tiny checkpoint with each merged by hand."""
    root = tmp_path_factory.mktemp("lora")
    l1, l2 = random_layers(ALL, 4, seed=1), random_layers(["qkv_proj", "down_proj"], 8, seed=2)
    d = {"a1": write_adapter(str(root / "a1"), l1, 4, 8, ALL),
         "a2": write_adapter(str(root / "a2"), l2, 8, 4, ["qkv_proj", "down_proj"], rslora=True, fmt="bin")}
    d["m1"] = merged_checkpoint(str(root / "m1"), l1, 8 / 4)
    d["m2"] = merged_checkpoint(str(root / "m2"), l2, 4 / math.sqrt(8))
    d["m1_bin"] = merged_checkpoint(str(root / "m1_bin"), l1, 8 / 4, fmt="bin-shards")
    d["root"] = str(root)
    return d


@pytest.fixture(scope="module")
def multi(lora_dirs) -> LLM:
    return _llm(loras={"a1": lora_dirs["a1"], "a2": lora_dirs["a2"]})


@pytest.fixture(scope="module")
def merged(lora_dirs) -> dict[str, LLM]:
    return {"a1": _llm(lora_dirs["m1"]), "a2": _llm(lora_dirs["m2"])}


def _tokens(llm: LLM, prompt: str, images: list, lora: str | None = None, nc: int | None = 1) -> list[int]:
    return llm.generate(prompt, images, SamplingParams(max_tokens=N, ignore_eos=True, lora=lora), nc).token_ids


def _reference(llm: LLM, prompt: str, images: list) -> list[int]:
    return reference_tokens(llm, llm.prepare(prompt, images, SamplingParams(max_tokens=N), 1), N)


@pytest.mark.parametrize("prompt,images", [(TEXT, []), IMG], ids=["text", "image"])
def test_merge_mode_equals_the_hand_merged_checkpoint(lora_dirs, merged, llm, prompt, images) -> None:
    want = _reference(merged["a1"], prompt, images)
    assert _tokens(merged["a1"], prompt, images) == want  # a merged fine-tune folder loads as any checkpoint
    assert _tokens(_llm(lora=lora_dirs["a1"]), prompt, images) == want
    assert want != _tokens(llm, prompt, images)  # the adapter changes the answer
    assert _tokens(_llm(lora_dirs["m1_bin"]), prompt, images) == want  # .bin shards + index (weights_only)


@pytest.mark.parametrize("prompt,images", [(TEXT, []), IMG], ids=["text", "image"])
def test_per_request_adapters_equal_their_merged_reference(multi, merged, llm, prompt, images) -> None:
    for name in ("a1", "a2"):
        assert _tokens(multi, prompt, images, name) == _reference(merged[name], prompt, images), name
    assert _tokens(multi, prompt, images) == _reference(llm, prompt, images)  # no adapter: the base model


def test_mixed_batch_rows_equal_their_single_runs(multi) -> None:
    """Base and two adapters in one engine, batched together (prefill and decode): each row's tokens are its own
    single-adapter run's."""
    jobs = [(p, [image_path(i) for i in imgs], lora, nc) for (p, imgs, nc), lora in
            zip(PROMPTS * 2, [None, "a1", "a2", "a1", None, "a2", "a2", None, "a1", None])]
    single = [_tokens(multi, p, imgs, lora, nc) for p, imgs, lora, nc in jobs]
    multi.engine.reset_prefix_cache()  # whole prompts: batched prefills (a cache hit would prefill the rest alone)
    stats = multi.engine.stats
    before = stats["decode_rows"], stats["decode_steps"], stats["batched_prefills"]
    reqs = [multi.prepare(p, imgs, SamplingParams(max_tokens=N, ignore_eos=True, lora=lora), nc)
            for p, imgs, lora, nc in jobs]
    got = [c.token_ids for c in multi.generate_many(reqs)]
    assert got == single
    rows, steps = stats["decode_rows"] - before[0], stats["decode_steps"] - before[1]
    assert rows / steps > 4 and stats["batched_prefills"] > before[2]  # rows of different adapters ran together
    assert len({tuple(t) for t in single[:3]}) == 3  # and the three models answer differently


def test_a_targeted_weight_and_its_adapters_a_share_one_buffer(multi) -> None:
    """[W; A] (out + R, in) per targeted layer, the layer's weight a contiguous view of its first rows: one GEMM gives
    y and the shrink, and W is not held twice."""
    slots = [(m, m.__dict__["lora"]) for m in multi.model.modules() if "lora" in m.__dict__]
    assert len(slots) == 4 * CFG.num_hidden_layers
    for layer, slot in slots:
        w, st = layer.weight, slot.stacked
        assert w.is_contiguous() and st.shape == (w.shape[0] + multi.model.loras.width, w.shape[1])
        assert w.data_ptr() == st.data_ptr() and slot.a.data_ptr() == st[w.shape[0]:].data_ptr()


def test_prefix_cache_is_never_shared_across_adapters(multi) -> None:
    multi.engine.reset_prefix_cache()
    p, imgs = IMG
    params = {n: SamplingParams(max_tokens=2, lora=n) for n in (None, "a1", "a2")}

    def cached(name: str | None) -> int:
        return multi.generate(p, imgs, params[name], 1).usage["prompt_tokens_details"]["cached_tokens"]

    assert cached("a1") == 0
    assert cached("a2") == 0 and cached(None) == 0  # same tokens, other adapter / base: computed anew
    assert cached("a1") > 0 and cached("a2") > 0 and cached(None) > 0  # each reuses its own


def test_block_hashes_name_the_adapter() -> None:
    ids = list(range(1, 129))
    base = block_hashes(ids, [], 64, False)
    assert block_hashes(ids, [], 64, False, None) == base
    a, b = block_hashes(ids, [], 64, False, "a"), block_hashes(ids, [], 64, False, "b")
    assert len({base[0], a[0], b[0]}) == 3 and len({base[1], a[1], b[1]}) == 3


def test_unknown_adapter_names_are_refused(multi, llm) -> None:
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'; loaded: a1, a2"):
        multi.generate(TEXT, sampling_params=SamplingParams(lora="nope"))
    with pytest.raises(ValueError, match="no per-request adapters are loaded"):
        llm.generate(TEXT, sampling_params=SamplingParams(lora="a1"))
    with pytest.raises(ValueError, match="lora must be"):
        SamplingParams(lora=3)


def test_vision_projector_and_modules_to_save_merge(lora_dirs, tmp_path) -> None:
    """An adapter on the image projector with a replaced lm_head (modules_to_save) merges at load like by hand;
    per request it is refused (image features and lm_head are shared by a batch)."""
    g = torch.Generator().manual_seed(3)
    layers = {"model.vision_embed_tokens.img_projection.0": (torch.randn(2, 4 * CFG.image_dim_out, generator=g),
                                                             torch.randn(H, 2, generator=g))}
    layers.update(random_layers(["o_proj"], 2, seed=4))
    head = {"lm_head.weight": torch.randn(CFG.vocab_size, H, generator=g) * 0.05}
    folder = write_adapter(str(tmp_path / "v"), layers, 2, 2, ["img_projection.0", "o_proj"], saved=head)
    ref = _llm(merged_checkpoint(str(tmp_path / "vm"), layers, 1.0, saved=head))
    want = _reference(ref, *IMG)
    assert _tokens(_llm(lora=folder), *IMG) == want
    with pytest.raises(ValueError, match=r"targets model.vision_embed_tokens.img_projection.0 outside .*merge this"):
        _llm(loras={"v": folder})


def test_quantized_modes(lora_dirs, multi, tmp_path) -> None:
    """Merged before quantizing at load: the same weights as quantizing the hand-merged checkpoint. Per request on
    quantized layers: the low-rank add on top, rows of a mixed batch as alone. A `phi3v quantize` checkpoint cannot
    take a merge."""
    a = _llm(lora=lora_dirs["a1"], quantization="int4")
    b = _llm(lora_dirs["m1"], quantization="int4")
    assert _tokens(a, *IMG) == _tokens(b, *IMG)
    q = _llm(loras={"a1": lora_dirs["a1"]}, quantization="int4")
    jobs = [None, "a1", None, "a1"]
    single = [_tokens(q, TEXT, [], n) for n in jobs]
    assert single[0] != single[1]
    reqs = [q.prepare(TEXT, [], SamplingParams(max_tokens=N, ignore_eos=True, lora=n)) for n in jobs]
    assert [c.token_ids for c in q.generate_many(reqs)] == single
    pre = merged_checkpoint(str(tmp_path / "q"), {}, 1.0)
    with open(os.path.join(pre, "config.json")) as f:
        qc = '"quantization_config": {"quant_method": "phi3v", "method": "int4"},\n  '
        text = f.read().replace('"vocab_size"', qc + '"vocab_size"')
    with open(os.path.join(pre, "config.json"), "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match="holds int4 weights .* cannot be merged|cannot be merged .* int4"):
        _llm(pre, lora=lora_dirs["a1"])
