"""LoRA for several adapters at once, chosen per batch row: the low-rank add of each targeted linear layer.

Layout. The n adapters are laid side by side along one rank axis of width R = r_1 + ... + r_n (r_k: adapter k's
largest rank over the layers). For each linear layer some adapter targets, `LoraSlot` holds
  a (R, in)   rows [off_k, off_k + r) = adapter k's lora_A for this layer, zero rows where it has none / less rank,
  bt (R, out) rows [off_k, off_k + r) = scale_k * lora_B.T (scale folded in once, in fp32, then cast),
both in the activations' dtype, and `LoraSet.owner` (R,) says which adapter (1..n) each rank column belongs to
(R is rounded up to a multiple of 16 with zero columns no row owns, -1).

Math. A forward over rows b (batch rows: one sequence each, any number of tokens T; a decode step is T = 1) gets
`rows` (B,) int64, the adapter of each row (0 = the base model). `LoraSet` turns it into one mask
(B, 1, R) = [owner == rows[b]] shared by every layer, and each targeted layer adds
  y += ((x @ a.T) * mask) @ bt           x (B, T, in), y (B, T, out)
i.e. every row multiplies by all adapters' A (R columns: tiny next to the layer's own weight), keeps only its own
adapter's columns and expands through B. No gather, no host read: the shapes depend on B and T alone, so the decode
step stays one CUDA graph per batch bucket with `rows` one of its static inputs. The cost grows with R (the number
of adapters loaded times their rank), not with how the rows mix.

Where it runs. A plain linear layer's W and a share one buffer, `LoraSlot.stacked` = [W; a] (out + R, in), the
layer's weight a view of its first rows, so x @ a.T comes out of the layer's own GEMM / GEMV as its last R columns.
Prefill (and the eager path): that GEMM, the mask, one addmm. Decode steps with the fused kernels on
(phi3v.kernels.lora): the Triton GEMV over [W; a] (the GEMM past 8 rows), then the expand (each row's own adapter
only, no mask) added by the next kernel that reads y where the caller passes `defer` (the norm after o_proj and
down_proj, SiLU after gate_up_proj) or by one kernel of its own (qkv_proj): a decode step's cost there is its
kernels' launches and waits. Quantized layers (fp8, int4) keep their own kernels; their shrink is one GEMV over a.

With no adapter loaded nothing here runs (no slot is attached, `Phi3VForCausalLM.loras` is None); with adapters
loaded, a forward given rows=None computes the base model (no rows selected: every slot returns y as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v.kernels import available, gemv
from phi3v.kernels import lora as kernels
from phi3v.kernels.lora import LoraPending

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
        # R rounded up to a multiple of 16 with columns no row owns (zeros in a and bt): the stacked GEMV's and the
        # decode kernels' row strides (out + R) stay multiples of 16, which their loads are compiled for
        pad = -sum(ranks) % 16
        owner = torch.cat([torch.full((r,), k + 1, dtype=torch.long) for k, r in enumerate(ranks)] +
                          [torch.full((pad,), -1, dtype=torch.long)])
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
    the layer's parameters (what loading and quantization see) are unchanged. `stacked` (out + R, in): for a plain
    linear layer, its weight W and `a` in one buffer ([W; a], W its first rows: the layer's weight is a view of it),
    so that one GEMV or GEMM computes [x W.T | x a.T]; None for a quantized layer (its own kernels project)."""

    def __init__(self, lset: LoraSet, a: Tensor, bt: Tensor, stacked: Tensor | None = None) -> None:
        self.set, self.bt, self.stacked = lset, bt.contiguous(), stacked  # bt (R, out)
        self.a = a.contiguous() if stacked is None else stacked[stacked.shape[0] - a.shape[0]:]  # (R, in)

    @property
    def selected(self) -> bool:
        """Whether this forward was given the rows' adapters (else the layer computes the base model)."""
        return self.set.rows is not None

    def _decode(self, x: Tensor, fused: bool) -> bool:
        # a decode step (x (B, 1, in): row b = batch row b) where the Triton kernels run
        return fused and x.dim() == 3 and x.shape[1] == 1 and available(x.device)

    def project(self, x: Tensor, fused: bool, pdl: bool = False, defer: bool = False) -> Tensor | LoraPending:
        """x (..., in) -> W x + the selected rows' updates (a plain layer: `stacked`). `fused` decode steps: one
        GEMV (1..8 rows; a GEMM past that) over [W; a] gives [y | s] and the expand is one kernel, or with `defer`
        left to the caller's next kernel (LoraPending); else (prefill, eager) the GEMM, the rows' mask, one addmm."""
        n = self.bt.shape[1]
        if self._decode(x, fused):
            m = x.shape[0]
            if gemv.supported(x, self.stacked):
                ys = gemv.linear(x, self.stacked, gemv.default_config(m, n, x.shape[-1]), pdl)
            else:
                ys = F.linear(x, self.stacked)
            ys = ys.view(m, -1)  # (M, out + R): [y | s]
            return self._pending(ys[:, :n], ys[:, n:], (m, 1, n), pdl, defer)
        ys = F.linear(x, self.stacked)  # (..., out + R)
        return self._expand_eager(ys[..., :n], ys[..., n:])

    def add(self, x: Tensor, y: Tensor, fused: bool, pdl: bool = False, defer: bool = False) -> Tensor | LoraPending:
        """x (..., in), y = base(x) (..., out) of a quantized layer -> y + the selected rows' updates; decode steps
        shrink in a GEMV (or GEMM) of their own, then as project."""
        if self._decode(x, fused) and y.is_contiguous():
            m = x.shape[0]
            s = gemv.linear(x, self.a, pdl=pdl) if gemv.supported(x, self.a) else F.linear(x, self.a)
            return self._pending(y.view(m, -1), s.view(m, -1), y.shape, pdl, defer)
        return self._expand_eager(y, F.linear(x, self.a))

    def _pending(self, y: Tensor, s: Tensor, shape: tuple[int, ...], pdl: bool, defer: bool) -> Tensor | LoraPending:
        s_ = self.set
        p = LoraPending(y, s, self.bt, s_.rows, s_.offs, s_.rmax, tuple(shape))
        return p if defer else kernels.expand(p, pdl)

    def _expand_eager(self, y: Tensor, s: Tensor) -> Tensor:
        """y (B, T, out), s (B, T, R) every adapter's shrink (views of one GEMM's output, or not) -> a new tensor:
        y + (s masked to each row's own adapter's columns) @ bt."""
        r, n = self.bt.shape
        s = (s * self.set.mask).reshape(-1, r)
        return torch.addmm(y.reshape(-1, n), s, self.bt).view(*y.shape[:-1], n)


def _stack(layer: nn.Module, a: Tensor) -> Tensor | None:
    """For a plain linear layer of a's dtype: [W; a] (out + R, in), the layer's weight replaced by a view of its first
    rows (contiguous; the old W freed: W is not kept twice). None for a quantized layer."""
    if not isinstance(layer, nn.Linear) or layer.weight.dtype != a.dtype:
        return None
    w = layer.weight
    stacked = torch.cat([w.detach(), a])
    layer.weight = nn.Parameter(stacked[: w.shape[0]], requires_grad=w.requires_grad)
    return stacked


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
        a, bt = a.to(device=device, dtype=dtype), bt.to(device=device, dtype=dtype)
        layer.__dict__["lora"] = LoraSlot(lset, a, bt, _stack(layer, a))
    model.loras = lset
    if device.type == "cuda":  # the replaced weights' blocks (each W now lives in its [W; a]): back to the driver,
        torch.cuda.empty_cache()  # which the engine asks for the memory its KV cache may take
    return lset
