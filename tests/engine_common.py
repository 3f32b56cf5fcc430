"""What the tests share besides fixtures (conftest.py has those): the test data's paths, the golden manifest and
images, the slow reference generator (greedy, and with the sampling parameters' formulas), and a few mixed
prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phi3v import LLM
from phi3v.engine.reference import reference_generate
from phi3v.engine.sampler import uniform_noise

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
    feats = llm.model.encode_images([i.pixels() for i in req.images], [i.image_size for i in req.images])
    return reference_generate(llm.model, req.prompt_ids, feats, max_tokens, frozenset(llm.config.eos_token_ids),
                              llm.config.original_max_position_embeddings)


@torch.inference_mode()
def slow_sampled_tokens(llm: LLM, prompt_ids: list[int], n: int, *, temperature: float = 0.0, seed: int = 0,
                        presence: float = 0.0, frequency: float = 0.0,
                        bias: dict[int, float] | None = None) -> list[int]:
    """A text prompt's tokens by the sampling formulas, with plain torch: full recompute each step; logits + bias
    - presence * (count > 0) - frequency * count over the generated tokens; greedy, or the exponential race with
    the sampler's counter-based noise (seed, step)."""
    model = llm.model
    dev = next(model.parameters()).device
    prompt = model.embed(torch.tensor(prompt_ids, device=dev), [])
    out: list[int] = []
    vocab = llm.config.vocab_size
    for step in range(n):
        gen = model.model.embed_tokens(torch.tensor(out, dtype=torch.long, device=dev)).to(prompt.dtype)
        x = torch.cat([prompt, gen], 0)[None]
        h = model(x, torch.arange(x.shape[1], device=dev)[None], torch.tensor([False], device=dev), None)
        logits = model.logits(h[:, -1])[0].float().cpu()
        for tok, v in (bias or {}).items():
            logits[tok] += v
        counts = torch.zeros(vocab)
        for t in out:
            counts[t] += 1
        logits = logits - presence * (counts > 0).float() - frequency * counts
        if temperature == 0.0:
            tok = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1)
            e = -torch.log(uniform_noise(torch.tensor([seed]), torch.tensor([step]), vocab)[0])
            tok = int((probs / e).argmax())
        out.append(tok)
        if tok in llm.config.eos_token_ids:
            break
    return out


PROMPTS = [
    ("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", ["astronaut"], 1),
    ("<|user|>\n<|image_2|>\nfirst\n<|image_1|>\nsecond<|end|>\n<|assistant|>\n", ["coffee", "page_L"], 1),
    ("<|user|>\n<|image_1|>\nagain <|image_1|>\n<|end|>\n<|assistant|>\n", ["logo_RGBA"], 1),
    ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n", [], None),
    ("<|user|>\n<|image_1|>\nRead the text.<|end|>\n<|assistant|>\n", ["page_L"], 4),
]
