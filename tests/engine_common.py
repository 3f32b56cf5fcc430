"""What the engine tests share: the tiny checkpoint, golden images, one LLM per test module (with a check that
all KV memory is free after every test), the slow reference generator, and a few mixed prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3v import LLM
from phi3v.engine.reference import reference_generate

DATA = Path(__file__).parent / "data"
GOLD = DATA / "golden"
CKPT = str(DATA / "tiny-phi3v")
MANIFEST = json.loads((GOLD / "manifest.json").read_text())


def image_path(name: str) -> str:
    return str(next(p for p in (GOLD / "images").iterdir() if p.stem == name))


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(CKPT, device="cpu", dtype="fp32", max_num_seqs=6, max_model_len=4096)


@pytest.fixture(autouse=True)
def kv_memory_is_free_after_each_test(llm: LLM):
    yield
    eng = llm.engine
    eng.step()  # drains a run-ahead step still in flight, if any
    assert not eng.has_unfinished() and eng._ahead is None
    assert eng.sched.all_free and not eng.sched.seqs


def reference_tokens(llm: LLM, req, max_tokens: int) -> list[int]:
    feats = llm.model.encode_images([i.crops for i in req.images], [i.image_size for i in req.images])
    return reference_generate(llm.model, req.prompt_ids, feats, max_tokens, frozenset(llm.config.eos_token_ids),
                              llm.config.original_max_position_embeddings)


PROMPTS = [
    ("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", ["astronaut"], 1),
    ("<|user|>\n<|image_2|>\nfirst\n<|image_1|>\nsecond<|end|>\n<|assistant|>\n", ["coffee", "page_L"], 1),
    ("<|user|>\n<|image_1|>\nagain <|image_1|>\n<|end|>\n<|assistant|>\n", ["logo_RGBA"], 1),
    ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n", [], None),
    ("<|user|>\n<|image_1|>\nRead the text.<|end|>\n<|assistant|>\n", ["page_L"], 4),
]
