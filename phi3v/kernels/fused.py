"""Fused elementwise kernels for the decoder on CUDA (Triton), with the eager math they replace.

A decode step is bound by launches, not by these ops' bytes: the eager RMSNorm is ~8 kernels,
RoPE ~12, SiLU*up 2. Fusing them takes a Phi-3 layer from ~40 launches to ~12. Each kernel
rounds to the activation dtype exactly where the reference's eager ops do (bf16 add, RMSNorm cast
back before the weight multiply, SiLU rounded before the multiply, RoPE products rounded before
their sum), so outputs match the eager path up to fp32 reduction order in the norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, pdl_args
from phi3v.kernels.lora import NORM_MAX_RMAX, SILU_MAX_RMAX, LoraPending, expand, lora_warps, no_lora_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start
    from phi3v.kernels.lora import lora_delta

    # LORA (add_rms_norm, silu_mul): x is a decode projection's output whose per-request LoRA update is still to add
    # (phi3v.kernels.lora.LoraPending: x rows x_stride apart, s_ptr.. its shrink and stacks); it is added as x is
    # loaded and rounded to x's dtype, as the expand kernel's own add would be.

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, x_stride, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps, s_ptr, s_stride, bt_ptr,
                             rows_ptr, offs_ptr, HAS_RES: tl.constexpr, LORA: tl.constexpr, RMAX: tl.constexpr,
                             RC: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0)
        if LORA:
            d = lora_delta(s_ptr + row * s_stride, bt_ptr, rows_ptr, offs_ptr, row, cols, m, N, BLOCK, RMAX, RC)
            x = (x.to(tl.float32) + d).to(x.dtype)
        if HAS_RES:  # residual stream += x, rounded as a bf16 add
            r = tl.load(res_ptr + row * N + cols, mask=m, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * N + cols, x, mask=m)
        elif LORA:  # the finished x is the new residual stream
            tl.store(res_out_ptr + row * N + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        h = (xf * tl.rsqrt(var + eps)).to(x.dtype)  # cast back before the weight multiply
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        tl.store(out_ptr + row * N + cols, (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask=m)

    # n_rows varies with the crop count: not specialised on (Triton would compile a second variant, mid-run,
    # the first time crops * 577 is a multiple of 16)
    @triton.jit(do_not_specialize=["n_rows"])
    def _add_layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, n_rows, N, eps,
                               HAS_RES: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # ROWS rows per program: a CLIP row is only 1024 values (2 KB)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        m = (rows < n_rows)[:, None] & (cols < N)[None, :]
        at = rows[:, None] * N + cols[None, :]  # (ROWS, BLOCK)
        x = tl.load(x_ptr + at, mask=m, other=0.0)
        if HAS_RES:  # residual stream += x, rounded as an eager add in x's dtype
            r = tl.load(res_ptr + at, mask=m, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + at, x, mask=m)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1) / N
        d = tl.where(m, xf - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        # nn.LayerNorm in half precision: fp32 statistics and affine, one rounding at the end
        tl.store(out_ptr + at, (d * rstd[:, None] * w + b).to(x.dtype), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, gu_stride, out_ptr, inter, s_ptr, s_stride, bt_ptr, rows_ptr, offs_ptr,
                         LORA: tl.constexpr, RMAX: tl.constexpr, RC: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        if LORA:  # rows gu_stride apart (a view of [gate_up | shrink])
            src = gu_ptr + row * gu_stride
        else:
            src = gu_ptr + row * 2 * inter
        g = tl.load(src + cols, mask=m, other=0.0)
        u = tl.load(src + inter + cols, mask=m, other=0.0)
        if LORA:  # gate columns `cols`, up columns inter + cols of the (2 * inter)-wide projection
            s_row = s_ptr + row * s_stride
            dg = lora_delta(s_row, bt_ptr, rows_ptr, offs_ptr, row, cols, m, 2 * inter, BLOCK, RMAX, RC)
            du = lora_delta(s_row, bt_ptr, rows_ptr, offs_ptr, row, inter + cols, m, 2 * inter, BLOCK, RMAX, RC)
            g = (g.to(tl.float32) + dg).to(g.dtype)
            u = (u.to(tl.float32) + du).to(u.dtype)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu's output, rounded
        tl.store(out_ptr + row * inter + cols, (u.to(tl.float32) * s.to(tl.float32)).to(g.dtype), mask=m)

    @triton.jit
    def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, row_stride, n_heads,
                     D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
                     PDL: tl.constexpr):
        # one program per (token, BLOCK_H heads) of the q and k heads; rotate_half layout
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK)
        m = (hs < n_heads)[:, None] & (offs < HALF)[None, :]
        src = qkv_ptr + row * row_stride + hs[:, None] * D + offs[None, :]  # (BLOCK_H, BLOCK)
        x1 = tl.load(src, mask=m, other=0.0)
        x2 = tl.load(src + HALF, mask=m, other=0.0)
        dt = x1.dtype
        cm = offs < HALF
        c1 = tl.load(cos_ptr + row * D + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + row * D + HALF + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + row * D + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + row * D + HALF + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # x*cos + rotate_half(x)*sin with each product rounded, as eager bf16 does
        o1 = ((a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
        dst = out_ptr + (row * n_heads + hs[:, None]) * D + offs[None, :]
        tl.store(dst, o1, mask=m)
        tl.store(dst + HALF, o2, mask=m)

    @triton.jit
    def to_cache(x, dtype, FP8: tl.constexpr):
        """x cast to the KV cache's dtype, saturated to e4m3's +-448 when that is fp8 (see kv_cache.py)."""
        if FP8:
            x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        return x.to(dtype)

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, blk_ptr, off_ptr, sk_t, sk_h, sv_t, sv_h,
                         sc_b, sc_h, sc_t, n_heads, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                         FP8: tl.constexpr):
        # one program per (token, BLOCK_H heads): k/v (T, H, D) rows -> cache[blk[t], h, off[t], :]
        t = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_D)
        m = (hs < n_heads)[:, None] & (offs < D)[None, :]
        blk = tl.load(blk_ptr + t).to(tl.int64)
        off = tl.load(off_ptr + t).to(tl.int64)
        dst = blk * sc_b + hs[:, None] * sc_h + off * sc_t + offs[None, :]
        k = tl.load(k_ptr + t * sk_t + hs[:, None] * sk_h + offs[None, :], mask=m)
        v = tl.load(v_ptr + t * sv_t + hs[:, None] * sv_h + offs[None, :], mask=m)
        tl.store(kc_ptr + dst, to_cache(k, kc_ptr.dtype.element_ty, FP8), mask=m)
        tl.store(vc_ptr + dst, to_cache(v, vc_ptr.dtype.element_ty, FP8), mask=m)

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        dt = x.dtype
        xf = x.to(tl.float32)
        t = (1.702 * xf).to(dt).to(tl.float32)  # eager rounds 1.702*x, then sigmoid, then the product
        sg = (1.0 / (1.0 + tl.exp(-t))).to(dt).to(tl.float32)
        tl.store(out_ptr + offs, (xf * sg).to(dt), mask=m)


def add_rms_norm(x: Tensor | LoraPending, residual: Tensor | None, weight: Tensor, eps: float,
                 pdl: bool = False) -> tuple[Tensor, Tensor]:
    """(normed, new_residual): new_residual = residual + x (or x), normed = RMSNorm(new_residual). x may be a
    projection's output with its LoRA update pending: added here, no kernel of its own."""
    n, shape = x.shape[-1], x.shape
    block, warps = triton.next_power_of_2(n), 4
    if isinstance(x, LoraPending) and x.rmax > NORM_MAX_RMAX:
        x = expand(x, pdl)
    if isinstance(x, LoraPending):
        x2, lora, warps = x.y, x.kernel_args(block), lora_warps(x.rmax, 8)
    else:
        x2 = x.reshape(-1, n)
        lora = no_lora_args(x2)
    out = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
    if residual is None and not lora["LORA"]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, n, x2, weight, out, out, n, eps, HAS_RES=False, BLOCK=block,
                                             num_warps=warps, **lora, **pdl_args(x2, pdl))
        return out.view(shape), x
    res_out = torch.empty_like(out)
    res = x2 if residual is None else residual.reshape(-1, n)
    _add_rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), res, weight, out, res_out, n, eps,
                                         HAS_RES=residual is not None, BLOCK=block, num_warps=warps, **lora,
                                         **pdl_args(x2, pdl))
    return out.view(shape), res_out.view(shape)


def add_layer_norm(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
                   eps: float) -> tuple[Tensor, Tensor]:
    """(normed, new_residual): new_residual = residual + x (or x), normed = LayerNorm(new_residual).
    CLIP's pre-norm layers read and write the residual stream twice per layer; this is one pass
    instead of an add and a norm (a (crops*577, 1024) tensor each)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    res_out = out if residual is None else torch.empty_like(x2)
    rows_per = 4
    grid = (triton.cdiv(x2.shape[0], rows_per),)
    _add_layer_norm_kernel[grid](x2, x2 if residual is None else residual.reshape(-1, n), weight, bias, out, res_out,
                                 x2.shape[0], n, eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                                 ROWS=rows_per)
    return out.view(x.shape), (x if residual is None else res_out.view(x.shape))


def silu_mul(gate_up: Tensor | LoraPending, pdl: bool = False) -> Tensor:
    """(..., 2I) [gate | up] -> (..., I) up * silu(gate). gate_up may be a projection's output with its LoRA update
    pending: added here (smaller tiles then: the update reads a (rank, tile) block of B per program)."""
    inter = gate_up.shape[-1] // 2
    if isinstance(gate_up, LoraPending) and gate_up.rmax > SILU_MAX_RMAX:
        gate_up = expand(gate_up, pdl)
    if isinstance(gate_up, LoraPending):
        gu, block, warps = gate_up.y, 256, lora_warps(gate_up.rmax, 4)
        lora = gate_up.kernel_args(block)
    else:
        gu, block, warps = gate_up.reshape(-1, 2 * inter), 1024, 4
        lora = no_lora_args(gu)
    out = torch.empty(gu.shape[0], inter, device=gu.device, dtype=gu.dtype)
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(inter, block))](gu, gu.stride(0), out, inter, BLOCK=block,
                                                                num_warps=warps, **lora, **pdl_args(gu, pdl))
    return out.view(*gate_up.shape[:-1], inter)


def rope_qk(qkv: Tensor, cos: Tensor, sin: Tensor, n_q: int, n_kv: int, head_dim: int, pdl: bool = False) -> Tensor:
    """qkv (R, (n_q+2*n_kv)*D) contiguous rows, cos/sin (R, D) -> (R, n_q+n_kv, D): rotated q and k heads."""
    rows = qkv.shape[0]
    out = torch.empty(rows, n_q + n_kv, head_dim, device=qkv.device, dtype=qkv.dtype)
    half = head_dim // 2
    bh = 16  # heads per program: a prefill row's 64 heads in 4 programs, not 64 tiny ones
    _rope_kernel[(rows, triton.cdiv(n_q + n_kv, bh))](qkv, cos, sin, out, qkv.stride(0), n_q + n_kv, D=head_dim,
                                                      HALF=half, BLOCK=triton.next_power_of_2(half), BLOCK_H=bh,
                                                      **pdl_args(qkv, pdl))
    return out


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, blk: Tensor, off: Tensor) -> None:
    """k, v (T, H, D) (last dim contiguous) -> k_cache/v_cache (n_blocks, H, BS, D) at [blk[t], :, off[t]].
    Replaces two advanced-index puts, which run at a tenth of the bandwidth."""
    t, h, d = k.shape
    assert k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    bh = 8
    _store_kv_kernel[(t, triton.cdiv(h, bh))](k, v, k_cache, v_cache, blk, off, k.stride(0), k.stride(1),
                                              v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
                                              k_cache.stride(2), h, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=bh,
                                              FP8=k_cache.dtype == torch.float8_e4m3fn)


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 * x) (CLIP's activation) in one pass instead of three over a (crops*577, 4096) tensor."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    _quick_gelu_kernel[(triton.cdiv(n, 4096),)](xc, out, n, BLOCK=4096)
    return out
