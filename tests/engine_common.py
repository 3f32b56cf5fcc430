"""What the tests share besides fixtures (conftest.py has those): the test data's paths, the golden manifest and
images, the slow reference generator, and a few mixed prompts."""

from __future__ import annotations

import json
from pathlib import Path

from phi3v import LLM
from phi3v.engine.reference import reference_generate

DATA = Path(__file__).parent / "data"
GOLD = DATA / "golden"
CKPT = str(DATA / "tiny-phi3v")
MANIFEST = json.loads((GOLD / "manifest.json").read_text())
# The golden cases an engine runs end to end. Crossing cases follow Microsoft's later fix (the Phi-3.5 code), so
# their phi3v variant is left out; all others are identical in both.
ENGINE_CASES = [k for k, v in MANIFEST["model"].items()
                if v.get("status") == "ok" and v.get("file") and (k.endswith("phi35v") or
                                                                 k.replace("/phi3v", "/phi35v") not in MANIFEST["model"])]


def image_path(name: str) -> str:
    return str(next(p for p in (GOLD / "images").iterdir() if p.stem == name))


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
