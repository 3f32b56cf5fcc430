"""LoRA for several adapters at once, chosen per batch row: the low-rank add of each targeted linear layer.

Layout. The n adapters are laid side by side along one rank axis of width R = r_1 + ... + r_n (r_k: adapter k's
largest rank over the layers). For each linear layer some adapter targets, `LoraSlot` holds
  a (R, in)   rows [off_k, off_k + r) = adapter k's lora_A for this layer, zero rows where it has none / less rank,
  bt (R, out) rows [off_k, off_k + r) = scale_k * lora_B.T (scale folded in once, in fp32, then cast),
both in the activations' dtype, and `LoraSet.owner` (R,) says which adapter (1..n) each rank column belongs to.

Math. A forward over rows b (batch rows: one sequence each, any number of tokens T; a decode step is T = 1) gets
`rows` (B,) int64, the adapter of each row (0 = the base model). `LoraSet` turns it into one mask
(B, 1, R) = [owner == rows[b]] shared by every layer, and each targeted layer adds
  y += ((x @ a.T) * mask) @ bt           x (B, T, in), y (B, T, out)
i.e. every row multiplies by all adapters' A (R columns: tiny next to the layer's own weight), keeps only its own
adapter's columns and expands through B. Three kernels per layer, no gather, no host read: the shapes depend on
B and T alone, so the decode step stays one CUDA graph per batch bucket with `rows` one of its static inputs.
The cost grows with R (the number of adapters loaded times their rank), not with how the rows mix. Decode-sized
batches (a few rows) take one Triton kernel per layer instead where the fused kernels are on (phi3v.kernels.lora:
each row's own adapter only, no mask), since there the three kernels' launches and latency are the cost.

With no adapter loaded nothing here runs (no slot is attached, `Phi3VForCausalLM.loras` is None); with adapters
loaded, a forward given rows=None computes the base model (no rows selected: every slot returns y as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v.kernels import lora as kernels

__all__ = ["LoraLayer", "LoraSet", "LoraSlot", "attach_loras", "DECODER_MODULE"]

DECODER_MODULE = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


@dataclass
class LoraLayer:
    """One adapter's update of one linear layer: a (r, in), b (out, r) in fp32; W' = W + scale * b @ a."""

    a: Tensor
    b: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> Tensor:
        """scale * B @ A, (out, in) fp32."""
        return (self.b.float() @ self.a.float()) * self.scale


class LoraSet:
    """The adapters served per request: their names (row index k + 1 = names[k]; 0 = the base model), the rank
    columns' owners and, during a forward, the rows' mask."""

    def __init__(self, names: list[str], ranks: list[int], device: torch.device, dtype: torch.dtype) -> None:
        self.names, self.ranks, self.dtype = list(names), list(ranks), dtype
        self.offsets = [sum(ranks[:k]) for k in range(len(ranks))]
        owner = torch.cat([torch.full((r,), k + 1, dtype=torch.long) for k, r in enumerate(ranks)])
        self.owner = owner.to(device)  # (R,)
        # for the decode kernel (phi3v.kernels.lora): where each adapter's columns start and end, the widest one
        self.offs = torch.tensor(self.offsets + [sum(ranks)], dtype=torch.int32).to(device)  # (n + 1,)
        self.rmax = 1 << (max(ranks) - 1).bit_length()
        self.rows: Tensor | None = None  # (B,) during a forward given rows
        self._mask: Tensor | None = None

    @property
    def width(self) -> int:
        return self.owner.shape[0]

    def index(self, name: str | None) -> int:
        """The row index of adapter `name` (0 for None: the base model); ValueError for a name not loaded."""
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(self.names)}") from None

    def select(self, rows: Tensor | None) -> None:
        """rows (B,) int64 on the device: the adapter of each batch row (0 = base); None: every row is base."""
        self.rows, self._mask = rows, None

    @property
    def mask(self) -> Tensor:
        """(B, 1, R) in the activations' dtype: 1 where rank column j belongs to row b's adapter; computed once per
        forward, by the first layer that needs it."""
        if self._mask is None:
            self._mask = (self.owner == self.rows[:, None, None]).to(self.dtype)
        return self._mask


class LoraSlot:
    """The stacked updates of one linear layer (see the module docstring); a plain object, not a submodule, so that
    the layer's parameters (what loading and quantization see) are unchanged."""

    def __init__(self, lset: LoraSet, a: Tensor, bt: Tensor) -> None:
        self.set, self.a, self.bt = lset, a.contiguous(), bt.contiguous()  # a (R, in), bt (R, out)

    def add(self, x: Tensor, y: Tensor, fused: bool = False, pdl: bool = False) -> Tensor:
        """x (..., in), y = base(x) (..., out) -> y + the selected rows' low-rank updates (in place when it can).
        `fused`: decode steps of a few rows (x (B, 1, in): row b = batch row b) run phi3v.kernels.lora (one kernel)
        where Triton runs, `pdl`: launched with programmatic dependent launch."""
        s = self.set
        if s.rows is None:
            return y
        if fused and x.dim() == 3 and x.shape[1] == 1 and y.is_contiguous() and kernels.supported(x, self.a):
            return kernels.lora_add_(x, y, self.a, self.bt, s.rows, s.offs, s.rmax, pdl)
        xa = F.linear(x, self.a)  # (B, T, R): every adapter's shrink at once
        xa = (xa * s.mask).reshape(-1, self.a.shape[0])  # only the row's own adapter's columns stay
        if y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(xa, self.bt)
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa, self.bt).view(y.shape)


def attach_loras(model: nn.Module, adapters: Mapping[str, Mapping[str, LoraLayer]], dtype: torch.dtype) -> LoraSet:
    """Attach the per-request adapters {name: {module name: LoraLayer}} to `model`'s linear layers (loaded, on
    their device); sets and returns `model.loras`. Each layer's stacks are built in fp32 and cast once."""
    names = list(adapters)
    ranks = [max((lay.rank for lay in adapters[n].values()), default=1) for n in names]
    device = model.model.embed_tokens.weight.device
    lset = LoraSet(names, ranks, device, dtype)
    modules = sorted({m for n in names for m in adapters[n]})
    for mod in modules:
        layer = model.get_submodule(mod)
        a = torch.zeros(lset.width, layer.in_features)
        bt = torch.zeros(lset.width, layer.out_features)
        for k, n in enumerate(names):
            lay = adapters[n].get(mod)
            if lay is not None:
                off = lset.offsets[k]
                a[off: off + lay.rank] = lay.a.float()
                bt[off: off + lay.rank] = (lay.b.float() * lay.scale).t()
        layer.__dict__["lora"] = LoraSlot(lset, a.to(device=device, dtype=dtype), bt.to(device=device, dtype=dtype))
    model.loras = lset
    return lset
