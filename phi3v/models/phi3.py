"""Phi-3 text decoder (the language model of Phi-3-vision and Phi-3.5-vision).

Pure tensor math: no cache, no sampling, no requests. Module names follow the checkpoint's parameter
names (`model.layers.{i}.self_attn.qkv_proj`, ...), so loading is a plain name -> tensor mapping.

Numerics follow Microsoft's reference (`modeling_phi3_v.py`):
- RMSNorm normalises in fp32, casts back to the activation dtype, then multiplies by its weight.
- LongRoPE ("su"): inv_freq = 1 / (factor * theta^(2i/d)) with per-frequency short or long factors;
  angles are computed in fp32, cos/sin are multiplied by `config.rope_mscale` in fp32 and then cast to
  the activation dtype. The regime (short/long) is a per-row input chosen by the caller.
- Attention softmax in fp32 (SDPA does this internally for half dtypes).

Attention is pluggable (`AttentionBackend`) so that the engine owns the KV cache; `attn=None` runs
plain causal attention over the given tokens. Nothing in `forward` reads tensor values on the host,
so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v.config import Phi3VConfig
from phi3v.kernels import fused as kernels
from phi3v.kernels import gemv
from phi3v.kernels.lora import LoraPending
from phi3v.models.quant import QuantLinear

__all__ = [
    "AttentionBackend",
    "attention",
    "causal_attention",
    "RMSNorm",
    "LongRoPE",
    "apply_rope",
    "proj",
    "Phi3Attention",
    "Phi3MLP",
    "Phi3DecoderLayer",
    "Phi3Model",
]


class AttentionBackend(Protocol):
    """Attention over cached + new tokens; implemented by the engine.

    q: (B, n_heads, T, head_dim), k/v: (B, n_kv_heads, T, head_dim) for the NEW tokens, RoPE applied.
    Returns (B, n_heads, T, head_dim). The backend stores k/v in its cache and attends over the cached
    and new tokens with the right causal mask. Per-call metadata (slots, lengths) lives in the backend.
    A backend whose `fused_rope` attribute is true may instead be given q/k unrotated with
    `rope=(cos, sin)`, each (B, head_dim), for T == 1 (decode: the rotation happens inside its kernel).
    """

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Scaled dot-product attention with GQA support (scale 1/sqrt(D), as in the reference).

    q: (B, Hq, Tq, D), k/v: (B, Hkv, Tk, D) with Hq % Hkv == 0 -> (B, Hq, Tq, D). `mask`: bool, True = may
    attend, or an SDPA bias object (e.g. `causal_lower_right`); `causal`: top-left aligned causal mask (Tq == Tk).
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        # Repeat each kv head for its group of query heads (what `repeat_kv` does in the reference);
        # an explicit expand is portable across SDPA kernels and torch versions.
        rep = hq // hkv
        b, _, t, d = k.shape
        k = k[:, :, None].expand(b, hkv, rep, t, d).reshape(b, hq, t, d)
        v = v[:, :, None].expand(b, hkv, rep, t, d).reshape(b, hq, t, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal self-attention over the T given tokens (no cache): q (B, Hq, T, D), k/v (B, Hkv, T, D)."""
    return attention(q, k, v, causal=True)


class KernelSwitches:
    """Mixin of the modules that have a Triton form: `fused` picks it (set by `Phi3VForCausalLM.set_kernels`
    where Triton runs), `pdl` launches it with programmatic dependent launch."""

    fused: bool = False
    pdl: bool = False


class RMSNorm(KernelSwitches, nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back *before* the weight multiply (reference order; matters in bf16).
        return self.weight * h.to(dtype)

    def add(self, x: Tensor | LoraPending, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(normed, new_residual): new_residual = residual + x (or x alone), normed = RMSNorm(new_residual);
        fused, one kernel reads x and the residual once (and adds x's pending LoRA update: `proj`'s defer)."""
        if self.fused:
            return kernels.add_rms_norm(x, residual, self.weight, self.eps, self.pdl)
        r = x if residual is None else residual + x
        return self(r), r


class LongRoPE(nn.Module):
    """LongRoPE / "su" rotary embedding with short and long per-frequency factors.

    Holds two fp32 inverse-frequency vectors (head_dim/2 each) as non-persistent buffers and computes
    cos/sin on the fly for arbitrary positions (cheap: B*T*head_dim/2 values, no big table, no host
    sync). With `rope_type=None` both vectors are the plain RoPE frequencies and mscale is 1.
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.mscale = config.rope_mscale if config.rope_type is not None else 1.0
        half = self.head_dim // 2
        self._short = list(config.short_factor) if config.rope_type is not None else [1.0] * half
        self._long = list(config.long_factor) if config.rope_type is not None else [1.0] * half
        self.register_buffer("inv_freq_short", torch.empty(half), persistent=False)
        self.register_buffer("inv_freq_long", torch.empty(half), persistent=False)
        self.materialize_buffers(None)

    def _inv_freq(self, factors: list[float]) -> Tensor:
        # Same op sequence as the reference, on CPU so every device gets bit-identical frequencies.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim  # (d/2,)
        ext = torch.tensor(factors, dtype=torch.float32)
        return 1.0 / (ext * self.theta**exponent)

    def materialize_buffers(self, device: torch.device | str | None) -> None:
        """(Re)compute the frequency buffers; used after building the model on the meta device."""
        if device is None:
            device = self.inv_freq_short.device
            if device.type == "meta":
                return
        self.inv_freq_short = self._inv_freq(self._short).to(device)
        self.inv_freq_long = self._inv_freq(self._long).to(device)

    def forward(self, positions: Tensor, long_rope: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T) int, long_rope (B,) bool -> cos, sin: (B, T, head_dim) in `dtype`."""
        inv = torch.where(long_rope[:, None], self.inv_freq_long, self.inv_freq_short)  # (B, d/2) fp32
        # fp32 angles: bf16 would lose whole radians at long positions.
        freqs = positions.float()[:, :, None] * inv[:, None, :]  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): rotate_half layout
        cos = emb.cos() * self.mscale
        sin = emb.sin() * self.mscale
        return cos.to(dtype), sin.to(dtype)


def proj(layer: nn.Linear | QuantLinear, x: Tensor, fused: bool, pdl: bool = False,
         defer: bool = False) -> Tensor | LoraPending:
    """layer(x) (no bias); with the fused kernels on, 1..8 rows (decode) go through the Triton GEMV,
    which streams the weight closer to HBM bandwidth than cuBLAS does at these sizes. A quantized layer
    (fp8 / int4 weights, phi3v.models.quant) picks its own kernels. A layer with per-request LoRA adapters
    attached adds the selected rows' low-rank updates (phi3v.models.lora); `defer` (fused callers whose next
    kernel is RMSNorm.add or silu_mul): a decode step's update may be left for that kernel to add."""
    lora = layer.__dict__.get("lora")  # per-request LoRA adapters (phi3v.models.lora): only when loaded
    if lora is not None and lora.selected:
        if lora.stacked is not None:  # [W; A] in one buffer: one GEMV / GEMM gives y and the shrink
            return lora.project(x, fused, pdl, defer)
        return lora.add(x, _project(layer, x, fused, pdl), fused, pdl, defer)
    return _project(layer, x, fused, pdl)


def _project(layer: nn.Linear | QuantLinear, x: Tensor, fused: bool, pdl: bool) -> Tensor:
    if isinstance(layer, QuantLinear):
        return layer.project(x, fused, pdl)
    if fused and gemv.supported(x, layer.weight):
        return gemv.linear(x, layer.weight, pdl=pdl)
    return layer(x)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D), cos/sin: (B, T, D) -> (B, H, T, D). Computed in x's dtype, as the reference."""
    cos = cos[:, None]
    sin = sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Phi3Attention(KernelSwitches, nn.Module):
    def __init__(self, config: Phi3VConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        # Fused projection, rows ordered [q | k | v] as in the checkpoint.
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend | None) -> Tensor | LoraPending:
        """-> o_proj's output, for the residual add + norm after it (RMSNorm.add)."""
        b, t, _ = x.shape
        fused, pdl = self.fused, self.pdl
        qkv = proj(self.qkv_proj, x, fused, pdl)  # (B, T, (Hq+2Hkv)*D)
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if fused and t == 1 and getattr(attn, "fused_rope", False):  # decode: RoPE inside the attention kernel
            heads = qkv.view(b, hq + 2 * hkv, 1, d)  # unrotated q | k | v heads, (B, H, 1, D) views
            o = attn(self.layer_idx, heads[:, :hq], heads[:, hq: hq + hkv], heads[:, hq + hkv:],
                     rope=(cos.view(b, d), sin.view(b, d)))
        else:
            if fused:  # one kernel rotates q and k: (B*T, Hq+Hkv, D)
                qk = kernels.rope_qk(qkv.view(b * t, -1), cos.reshape(b * t, d), sin.reshape(b * t, d), hq, hkv, d, pdl)
                qk = qk.view(b, t, hq + hkv, d)
                q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)  # (B, H, T, D)
                v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d).transpose(1, 2)
            else:
                q, k, v = qkv.split(self.split, dim=-1)  # (B, T, Hq*D), (B, T, Hkv*D) x2
                q = apply_rope(q.view(b, t, hq, d).transpose(1, 2), cos, sin)  # (B, Hq, T, D)
                k = apply_rope(k.view(b, t, hkv, d).transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
                v = v.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
            o = causal_attention(q, k, v) if attn is None else attn(self.layer_idx, q, k, v)
        o = o.transpose(1, 2).reshape(b, t, hq * d)  # (B, T, Hq*D)
        return proj(self.o_proj, o, fused, pdl, defer=True)


class Phi3MLP(KernelSwitches, nn.Module):
    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        # Fused [gate | up] projection, as in the checkpoint.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor | LoraPending:
        """-> down_proj's output, for the residual add + norm after it (RMSNorm.add)."""
        if self.fused:
            gate_up = proj(self.gate_up_proj, x, True, self.pdl, defer=True)  # (B, T, 2I)
            return proj(self.down_proj, kernels.silu_mul(gate_up, self.pdl), True, self.pdl, defer=True)
        gate, up = proj(self.gate_up_proj, x, False).chunk(2, dim=-1)  # (B, T, I) each
        return proj(self.down_proj, up * F.silu(gate), False)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3VConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Phi3Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Phi3MLP(config)

    def forward(self, h: Tensor, residual: Tensor, cos: Tensor, sin: Tensor,
                attn: AttentionBackend | None) -> tuple[Tensor, Tensor]:
        """h: this layer's normed input (input_layernorm already applied), residual: the stream it came from.
        Returns (mlp output, residual stream after the attention block): the caller adds them inside the next
        norm (the reference's `x + mlp(norm(x))`, one fused kernel on the Triton path)."""
        h, residual = self.post_attention_layernorm.add(self.self_attn(h, cos, sin, attn), residual)
        return self.mlp(h), residual


class Phi3Model(nn.Module):
    """Embedding table + decoder stack + final norm (checkpoint prefix `model.`).

    `forward` takes embeddings rather than ids, so that image features can be spliced in by the caller
    (`Phi3VForCausalLM.embed`). The vision tower is attached by `Phi3VForCausalLM` as
    `vision_embed_tokens`, matching the checkpoint, and is not used here.
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.config = config
        # padding_idx only affects training gradients; inference is a plain lookup.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LongRoPE(config)

    def forward(self, x: Tensor, positions: Tensor, long_rope: Tensor,
                attn: AttentionBackend | None = None) -> Tensor:
        """x (B, T, hidden) embeddings, positions (B, T) int64, long_rope (B,) bool -> (B, T, hidden).

        `long_rope[b]` selects the long factors for row b. The reference rule is
        long iff max(position) + 1 > original_max_position_embeddings for that forward call; the
        engine decides (e.g. it recomputes a sequence with long factors once it crosses).
        """
        cos, sin = self.rotary_emb(positions, long_rope, x.dtype)  # (B, T, D) each, shared by all layers
        # each residual add happens inside the norm after it (RMSNorm.add): the same ops as the reference's
        # x = x + attn(norm(x)); x = x + mlp(norm(x)), one kernel per add + norm on the Triton path
        h, res = self.layers[0].input_layernorm.add(x, None)
        for i, layer in enumerate(self.layers):
            out, res = layer(h, res, cos, sin, attn)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, res = nxt.add(out, res)
        return h
