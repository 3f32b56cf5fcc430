"""The batched on-device sampler (the parameters it takes: `phi3v.sampling_params`).

The sampler turns a (B, V) float32 logits tensor into B token ids with per-row parameters and no
host sync: logit bias, repetition / presence / frequency penalties, temperature, top-k, top-p and
seeded randomness are all tensor ops, in that order (the structured-output mask after the penalties).
Randomness is counter-based (a hash of seed, step and token id), so a seeded request gives the same
tokens whatever else shares its batch, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phi3v.device import to_device
from phi3v.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic): a good hash of the counter."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as signed int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1) from per-row seeds (B,) and step counters (B,), int64 on device."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = _mix(seeds[:, None] * 1000003 + steps[:, None]) + idx[None, :] * -7046029254386353131
    x = _mix(x)
    # top 53 bits -> float64 in [0,1); shift into (0,1) so that -log(u) is finite.
    u = ((x >> 11) & ((1 << 53) - 1)).to(torch.float64) * (1.0 / (1 << 53))
    return (u + 0.5 / (1 << 53)).to(torch.float32)


@dataclass
class SamplingTensors:
    """Per-row parameters as device tensors, built once per batch composition."""

    temperature: torch.Tensor  # (B,) float32; 0 = greedy
    top_p: torch.Tensor  # (B,) float32
    top_k: torch.Tensor  # (B,) int64; 0 = off
    penalty: torch.Tensor  # (B,) float32
    seeds: torch.Tensor  # (B,) int64
    any_sampling: bool
    any_top: bool
    any_penalty: bool
    presence: torch.Tensor | None = None  # (B,) float32, when any row has a presence or frequency penalty
    frequency: torch.Tensor | None = None  # (B,) float32
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, values), (nnz,) each

    @property
    def any_counts(self) -> bool:
        return self.presence is not None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], device: torch.device | str) -> "SamplingTensors":
        dev = torch.device(device)
        # one (6, B) float64 host tensor -> one (pinned, non-blocking on CUDA) copy; float64 holds every
        # int32 top_k exactly, and the int64 seeds travel separately as int64
        host = torch.tensor([[p.temperature for p in params], [p.top_p for p in params],
                             [max(p.top_k, 0) for p in params], [p.repetition_penalty for p in params],
                             [p.presence_penalty for p in params], [p.frequency_penalty for p in params]],
                            dtype=torch.float64)
        seed_host = torch.tensor(seeds, dtype=torch.int64)
        d = to_device(host, dev)
        counts = any(p.counts_penalty for p in params)
        return cls(
            temperature=d[0].float(), top_p=d[1].float(), top_k=d[2].long(), penalty=d[3].float(),
            seeds=to_device(seed_host, dev),
            any_sampling=any(not p.greedy for p in params),
            any_top=any(not p.greedy and (p.top_p < 1.0 or p.top_k > 0) for p in params),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
            presence=d[4].float() if counts else None, frequency=d[5].float() if counts else None,
            bias=_sparse_bias(params, dev),
        )


def _sparse_bias(params: list[SamplingParams], dev: torch.device) -> tuple[torch.Tensor, ...] | None:
    """Every row's logit_bias as three (nnz,) device tensors: row, token id, value (None when no row has one)."""
    entries = [(i, tok, v) for i, p in enumerate(params) for tok, v in (p.logit_bias or {}).items()]
    if not entries:
        return None
    rows, toks, vals = zip(*entries)
    return (to_device(torch.tensor(rows, dtype=torch.int64), dev),
            to_device(torch.tensor(toks, dtype=torch.int64), dev),
            to_device(torch.tensor(vals, dtype=torch.float32), dev))


def apply_logit_bias(logits: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """OpenAI's logit_bias: each (row, token) entry's value added to that logit (out of place)."""
    rows, toks, vals = bias
    return logits.index_put((rows, toks), vals, accumulate=True)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI semantics: logit[j] -= presence * (count[j] > 0) + frequency * count[j]. counts: (B, V) float32 of
    the generated tokens (the prompt's do not count)."""
    return logits - presence[:, None] * (counts > 0).to(logits.dtype) - frequency[:, None] * counts


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by p if positive, multiplied by p if not.
    seen: (B, V) bool of the prompt's and generated token ids."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits of tokens whose bit is 0 in the packed masks (B, ceil(V/32)) int32
    (bit j of word w = token 32*w + j). One masked_fill: all-ones rows keep their exact values."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, device=logits.device, dtype=torch.int32)
    B, V = logits.shape
    allowed = ((masks[:, :, None] >> shifts) & 1).view(B, -1)[:, :V]
    return logits.masked_fill(allowed == 0, float("-inf"))


def sample(logits: torch.Tensor, t: SamplingTensors, steps: torch.Tensor, seen: torch.Tensor | None = None,
           masks: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row. logits (B, V) float32 raw; steps (B,) int64 per-row step counters;
    masks: packed allowed-token bitmasks of structured output (see apply_token_bitmask) or None;
    counts: (B, V) float32 counts of each row's generated tokens (presence / frequency penalties) or None.
    Returns (B,) int64. Greedy rows take the argmax of the (biased, penalised, masked) logits."""
    if t.bias is not None:
        logits = apply_logit_bias(logits, t.bias)
    if t.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, t.penalty)
    if t.any_counts and counts is not None:
        logits = apply_presence_frequency(logits, counts, t.presence, t.frequency)
    if masks is not None:
        logits = apply_token_bitmask(logits, masks)
    greedy_tok = logits.argmax(dim=-1)
    if not t.any_sampling:
        return greedy_tok
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    scaled = logits / temp[:, None]
    if t.any_top:
        scaled = _top_k_top_p(scaled, t.top_k, t.top_p)
    probs = torch.softmax(scaled, dim=-1)
    # Exponential race (equivalent to sampling from probs): argmax p_i / E_i, E_i ~ Exp(1).
    e = -torch.log(uniform_noise(t.seeds, steps, logits.shape[-1]))
    sampled = (probs / e).argmax(dim=-1)
    return torch.where(t.temperature > 0, sampled, greedy_tok)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus top-p. logits (B, V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always survives)
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= top_p[:, None]
    masked_sorted = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked_sorted)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """log-softmax of the raw logits: the chosen token's and the top-k, packed as one (B, 1+k, 2)
    float tensor [logprob, id] so that the step still needs a single device-to-host copy."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = lp.topk(max(k, 1), dim=-1)
    vals = torch.cat([lp.gather(-1, chosen[:, None]), vals], dim=1)
    ids = torch.cat([chosen[:, None], ids], dim=1)
    return torch.stack([vals, ids.to(torch.float32)], dim=-1)
