"""The slow reference generator: no cache, the whole sequence recomputed at every step.

It is what the fast engine is tested against. Recomputing everything each step is also exactly
the Phi-3.5 rule for LongRoPE: the regime follows the current length, for every position.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def reference_generate(model: torch.nn.Module, prompt_ids: list[int], image_features: list[torch.Tensor],
                       max_tokens: int, eos_ids: set[int] | frozenset[int] = frozenset(),
                       original_max: int | None = None) -> list[int]:
    """Greedy tokens after `prompt_ids` (negative = image placeholders, image k at -k)."""
    device = next(model.parameters()).device
    prompt = model.embed(torch.tensor(prompt_ids, device=device), image_features)  # (L, hidden)
    out: list[int] = []
    for _ in range(max_tokens):
        gen = model.model.embed_tokens(torch.tensor(out, dtype=torch.long, device=device)).to(prompt.dtype)
        x = torch.cat([prompt, gen], 0)[None]  # (1, L+t, hidden)
        n = x.shape[1]
        long_rope = torch.tensor([original_max is not None and n > original_max], device=device)
        h = model(x, torch.arange(n, device=device)[None], long_rope, None)
        tok = int(model.logits(h[:, -1]).argmax(-1))
        out.append(tok)
        if tok in eos_ids:
            break
    return out
