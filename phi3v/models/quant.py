"""Quantized linear layers of the decoder: FP8 (e4m3) and int4 weights, with their error bounds.

`QuantSpec` says what is quantized; `swap_linears` replaces the decoder's nn.Linear modules (qkv, o, gate_up,
down; lm_head when `spec.lm_head`) by `FP8Linear` / `Int4Linear`, whose parameters keep the checkpoint's module
names (`model.layers.{i}.self_attn.qkv_proj.weight` + `.weight_scale`, or `.qweight` + `.scales` + `.mins`),
so a quantized checkpoint loads with the same name -> tensor mapping. The vision tower stays in bf16.

fp8: W = q * scale[n], q float8 e4m3 (N, K), one fp32 scale per output feature (row amax / 448).
  Decode (1..8 rows, Triton): bf16 x times W upcast in registers (weight-only numerics); with
  `QuantSpec.decode_dot` the W8A8 tensor-core GEMV instead (x quantized per row, the prefill numerics below).
  Prefill and decode batches over 8 rows (CUDA): x quantized per token (row amax / 448, dynamic; one Triton
  kernel, phi3v.kernels.fp8_act) and an FP8 tensor-core GEMM
  (`torch._scaled_mm`, row-wise scales, needs compute capability >= 8.9). On an older GPU loading refuses
  fp8 (ValueError); on the CPU the same math runs in plain torch (exact emulation, slow: for tests).
  Error: a weight's relative rounding error is at most 2**-4 (3 mantissa bits), about 2.5 % rms; the per-token
  activation quantization adds about as much again in prefill. Bound tested (tests/test_quant.py):
  per-layer relative error < 5 %; on the tiny checkpoint last-token logit cosine > 0.98.
int4: weight-only, groups of `group_size` (128) along K, ASYMMETRIC: code q in 0..15 with w = q * scale + min
  (scale = (max - min) / 15 and min per group, fp16). Why asymmetric: the 16 codes then span each group's own
  [min, max] instead of a symmetric [-amax, amax] of which one side is often half empty (a skewed group, or
  one outlier), so the step is smaller for the same bits; it costs 2 bytes per group (0.125 bit per weight)
  and one FMA per weight in registers, free in a bandwidth-bound GEMV. Layout: `phi3v.kernels.int4`.
  Error: |w - w_q| <= scale / 2 per weight; for Gaussian weights about 10 % rms of the layer's output.
  Bound tested: per-layer relative error < 13 %; on the tiny checkpoint logit cosine > 0.93.
  No dequantised matrix is kept: on the GPU the kernels dequantise tiles in registers, elsewhere (CPU, tests)
  each call dequantises its layer into a temporary.
Real checkpoints have outlier channels that random weights lack: a per-channel (fp8) or per-group (int4)
scale stretched by an outlier rounds the rest of its row or group more coarsely, so expect larger errors
than the random-weight numbers of benchmarks/quant_check.py, most of all for int4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v.engine.config import QUANT_METHODS
from phi3v.kernels import fp8_act, gemv, int4

__all__ = ["QuantSpec", "QuantLinear", "FP8Linear", "Int4Linear", "swap_linears", "quantize_fp8",
           "quantize_int4", "dequantize_int4", "quantize_rows_fp8", "METHODS", "FP8", "FP8_MAX"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
METHODS = QUANT_METHODS
DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantSpec:
    """What is quantized: `method` fp8 | int4, int4's `group_size`, and whether lm_head is too. `decode_dot` (a
    run-time choice, not saved with a checkpoint): decode's 1..8-row GEMVs on tensor cores (phi3v.kernels.gemv_dot,
    `Int4GemvConfig.dot`) instead of CUDA cores; for fp8 that is W8A8, x quantized per row as in prefill."""

    method: str
    group_size: int = 128
    lm_head: bool = False
    decode_dot: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization must be one of {', '.join(METHODS)} (or None), got {self.method!r}")
        if self.group_size not in int4.GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {int4.GROUP_SIZES}, got {self.group_size!r}")

    @classmethod
    def parse(cls, value: "str | QuantSpec | None") -> "QuantSpec | None":
        if value is None or isinstance(value, QuantSpec):
            return value
        if isinstance(value, str) and value.lower() in ("", "none", "auto"):
            return None
        return cls(str(value).lower())

    def to_config(self) -> dict[str, Any]:
        """The `quantization_config` entry of a saved checkpoint's config.json."""
        out: dict[str, Any] = {"quant_method": "phi3v", "method": self.method, "lm_head": self.lm_head,
                               "modules": list(DECODER_LINEARS)}
        if self.method == "int4":
            out.update(group_size=self.group_size, symmetric=False, layout="phi3v.kernels.int4")
        else:
            out.update(weight_scale="per_output_channel", activation_scale="dynamic_per_token")
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "QuantSpec":
        if cfg.get("quant_method") != "phi3v":
            raise ValueError(f"quantization_config of quant_method {cfg.get('quant_method')!r} is not supported "
                             "(only checkpoints written by `phi3v quantize`)")
        return cls(cfg.get("method", ""), int(cfg.get("group_size", 128)), bool(cfg.get("lm_head", False)))


# ------------------------------------------------------------------------------------------- the math
def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (q (N, K) e4m3, scale (N,) fp32) with w ~= q * scale[:, None]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)  # an all-zero row gets a harmless scale
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Activations (M, K) -> (q (M, K) e4m3, scale (M, 1) fp32): dynamic per-token scales (row amax / 448)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) float -> (qweight (N, K/2) uint8, scales (N, K/G) fp16, mins (N, K/G) fp16), the layout of
    phi3v.kernels.int4. G = min(group_size, K); K must be a multiple of G. Codes are rounded against the fp16
    scale and min actually stored, so the bound |w - dequant| <= scale / 2 holds for what the kernels see."""
    n, k = w.shape
    g = min(group_size, k)
    if k % g or g % 2:
        raise ValueError(f"int4: K = {k} is not a multiple of the group size {g}")
    wf = w.float().reshape(n, k // g, g)
    lo, hi = wf.amin(-1), wf.amax(-1)  # (N, K/G)
    # fp16 min rounded down and scale rounded up, so that min <= every w <= min + 15 * scale: no code clamps
    mins = _round_f16(lo, down=True)
    # the smallest normal fp16 keeps a constant group's division finite (its codes are then all 0)
    scales = ((hi - mins.float()) / 15).clamp_min(2.0**-14)
    scales = _round_f16(scales, down=False)
    short = mins.float() + 15 * scales.float() < hi  # the fp32 product fell short by a rounding
    scales = torch.where(short, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    q = torch.round((wf - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(n, k // g, 2, g // 2)  # [..., 0, j] element j of the group, [..., 1, j] element G/2 + j
    packed = q[:, :, 0] | (q[:, :, 1] << 4)  # (N, K/G, G/2)
    return packed.reshape(n, k // 2).contiguous(), scales.contiguous(), mins.contiguous()


def _round_f16(x: Tensor, down: bool) -> Tensor:
    """x (fp32) -> fp16 rounded toward -inf (down) or +inf."""
    h = x.to(torch.float16)
    off = h.float() > x if down else h.float() < x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, float("-inf") if down else float("inf"))), h)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """The inverse layout: (N, K/2) uint8 + (N, K/G) fp16 x2 -> W (N, K) fp32 (reference and CPU path)."""
    n, groups = scales.shape
    half = qweight.shape[1] // groups
    b = qweight.view(n, groups, half)
    q = torch.stack([b & 15, b >> 4], dim=2).float()  # (N, K/G, 2, G/2)
    w = q * scales.float()[:, :, None, None] + mins.float()[:, :, None, None]
    return w.reshape(n, groups * 2 * half)


def fp8_linear_reference(x2: Tensor, w: Tensor, scale: Tensor, per_token: bool) -> Tensor:
    """What the GPU computes, in plain fp32 torch (CPU and tests): per_token -> the prefill GEMM's numerics
    (x quantized per token), else the decode GEMV's (x as is). x2 (M, K) -> (M, N) fp32."""
    if per_token:
        xq, xs = quantize_rows_fp8(x2)
        return (xq.float() @ w.float().t()) * xs * scale[None, :]
    return (x2.float() @ w.float().t()) * scale[None, :]


# ------------------------------------------------------------------------------------------ the modules
class QuantLinear(nn.Module):
    """Base of the quantized linear layers (no bias, as every Phi-3 linear). `project(x, fused, pdl)` is what
    `phi3.proj` calls (with the model's kernel switches); `forward(x)` is the unfused path, what an unfused
    caller gets from an nn.Linear; `quantize_(w)` fills the parameters from a float weight (N, K)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.decode_dot = False  # QuantSpec.decode_dot: decode's GEMVs on tensor cores

    def _param(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))

    def _set(self, **tensors: Tensor) -> None:
        for name, t in tensors.items():
            self._parameters[name] = nn.Parameter(t.contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x, fused=False)

    def project(self, x: Tensor, fused: bool, pdl: bool = False) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize_(self, w: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class FP8Linear(QuantLinear):
    """weight (N, K) float8 e4m3, weight_scale (N,) fp32."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self._param("weight", (out_features, in_features), FP8)
        self._param("weight_scale", (out_features,), torch.float32)

    def quantize_(self, w: Tensor) -> None:
        q, s = quantize_fp8(w)
        self._set(weight=q, weight_scale=s)

    def project(self, x: Tensor, fused: bool, pdl: bool = False) -> Tensor:
        w, s = self.weight, self.weight_scale
        if fused and gemv.supported(x, w, s):  # decode: bandwidth-bound; weight-only numerics, or W8A8 with decode_dot
            cfg = gemv.default_dot_config(*w.shape) if self.decode_dot else None
            return gemv.linear(x, w, cfg, pdl=pdl, scale=s)
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda:  # FP8 tensor cores, x quantized per token; W (N, K) row-major is the column-major B
            xq, xs = fp8_act.quantize_rows(x2, pdl) if fused and fp8_act.supported(x2) else quantize_rows_fp8(x2)
            y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.view(1, -1), out_dtype=torch.bfloat16)
        else:  # the same numerics in fp32 (CPU: tests); few rows as the decode GEMV, more as the prefill GEMM
            y = fp8_linear_reference(x2, w, s, per_token=self.decode_dot or x2.shape[0] > gemv.MAX_M)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int4Linear(QuantLinear):
    """qweight (N, K/2) uint8, scales and mins (N, K/G) fp16: the layout of phi3v.kernels.int4."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128) -> None:
        super().__init__(in_features, out_features)
        g = min(group_size, in_features)
        if in_features % g:
            raise ValueError(f"int4: in_features {in_features} is not a multiple of the group size {g}")
        self._param("qweight", (out_features, in_features // 2), torch.uint8)
        self._param("scales", (out_features, in_features // g), torch.float16)
        self._param("mins", (out_features, in_features // g), torch.float16)
        self.group_size = group_size

    def quantize_(self, w: Tensor) -> None:
        q, s, m = quantize_int4(w, self.group_size)
        self._set(qweight=q, scales=s, mins=m)

    def project(self, x: Tensor, fused: bool, pdl: bool = False) -> Tensor:
        q, s, m = self.qweight, self.scales, self.mins
        if fused and int4.supported(x, q, s, m):
            cfg = int4.default_dot_config(q.shape[0], self.in_features) if self.decode_dot else None
            return int4.linear(x, q, s, m, pdl=pdl, gemv_config=cfg)
        # unfused (CPU, or the kernels switched off): one dequantised temporary per call
        return F.linear(x, dequantize_int4(q, s, m).to(x.dtype))


def swap_linears(model: nn.Module, spec: QuantSpec) -> dict[str, QuantLinear]:
    """Replace the decoder's linear layers of `model` (a Phi3VForCausalLM, typically on the meta device) by
    empty quantized ones on the same device; returns {module name: new module}."""
    names = [f"model.layers.{i}.{leaf}" for i in range(len(model.model.layers)) for leaf in DECODER_LINEARS]
    if spec.lm_head and not model.config.tie_word_embeddings:  # a tied head is the embedding table: kept
        names.append("lm_head")
    out: dict[str, QuantLinear] = {}
    for name in names:
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear) and old.bias is None, name
        with torch.device(old.weight.device):
            new: QuantLinear = (FP8Linear(old.in_features, old.out_features) if spec.method == "fp8"
                                else Int4Linear(old.in_features, old.out_features, spec.group_size))
        new.decode_dot = spec.decode_dot
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        out[name] = new
    return out
