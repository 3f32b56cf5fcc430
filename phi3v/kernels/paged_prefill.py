"""Prefill attention over the paged KV cache: a flash-attention Triton kernel for one sequence's chunk.

T queries at positions start..start+T-1 attend causally over positions 0..start+T-1. The past
(0..start-1) is read from the cache blocks in place, through the sequence's block table: no gather
of the whole prefix per chunk, no concatenation. The chunk's own keys (start..start+T-1) come either
from the K/V tensors the layer just computed (`k`, `v`: full precision, as PrefillAttention's SDPA
path uses them, which matters for an fp8 cache) or, without them, from the cache as well.

Grid (query tiles, query heads): each program holds BLOCK_M queries of one head in registers and
streams BLOCK_N keys at a time with an online softmax (running max m, sum l, fp32 accumulator; exp2
with the scale folded into log2 units). Every query sees every past key, so past tiles need no mask
except the last, partial one; the chunk's keys below the query tile are full tiles, and only the
BLOCK_M / BLOCK_N tiles on the diagonal apply the causal mask. head_dim as two power-of-2 parts (96 =
64 + 32, as the decode kernel splits it): two tl.dot per product instead of one padded to 128, so no
multiply-adds are wasted on padding. GQA: a program's query head h reads kv head h // GROUP. An fp8
(e4m3) cache is widened to the activation dtype as it is loaded (through fp16: exact).

Programs are launched heaviest first (the last query tile sees the most keys), so that the GPU's
last wave holds short programs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start

    @triton.jit
    def _mm(a, b, acc, IEEE: tl.constexpr):
        if IEEE:  # fp32 activations: exact products (tl.dot would round to tf32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _load_rows(ptr, rows, d_lo, d_hi, rm, FP8: tl.constexpr, DT: tl.constexpr, MASKED: tl.constexpr,
                   HAS_HI: tl.constexpr, D: tl.constexpr):
        # rows (BLOCK_N,) element offsets of one head's vectors -> its (BLOCK_N, D_LO) and (BLOCK_N, D_HI)
        # parts in the activation dtype DT; rm: rows in range (only used when MASKED)
        if MASKED:
            lo = tl.load(ptr + rows[:, None] + d_lo[None, :], mask=rm[:, None], other=0.0)
        else:
            lo = tl.load(ptr + rows[:, None] + d_lo[None, :])
        hi = lo  # unused without a second part
        if HAS_HI:
            hm = d_hi[None, :] < D
            if MASKED:
                hm = hm & rm[:, None]
            hi = tl.load(ptr + rows[:, None] + d_hi[None, :], mask=hm, other=0.0)
        if FP8:  # e4m3 -> fp16 is exact and native; then the activation dtype (exact too)
            lo = lo.to(tl.float16).to(DT)
            hi = hi.to(tl.float16).to(DT)
        return lo, hi

    @triton.jit
    def _load_tile(base, tile_lo, tile_hi, d_hi, FP8: tl.constexpr, DT: tl.constexpr, HAS_HI: tl.constexpr,
                   D: tl.constexpr):
        # a whole tile at base + tile offsets (BLOCK_N, D_LO) / (BLOCK_N, D_HI), in the activation dtype
        lo = tl.load(base + tile_lo)
        hi = lo
        if HAS_HI:
            hi = tl.load(base + tile_hi, mask=(d_hi < D)[None, :], other=0.0)
        if FP8:
            lo = lo.to(tl.float16).to(DT)
            hi = hi.to(tl.float16).to(DT)
        return lo, hi

    @triton.jit
    def _cache_rows(bt_ptr, sbt, t, tm, head_off, sc_b, sc_t, BS: tl.constexpr, MASKED: tl.constexpr):
        # cache positions t (BLOCK_N,) of one kv head -> element offsets of their rows, through the block table
        if MASKED:
            phys = tl.load(bt_ptr + (t // BS) * sbt, mask=tm, other=0)
        else:
            phys = tl.load(bt_ptr + (t // BS) * sbt)
        return phys.to(tl.int64) * sc_b + head_off + (t % BS) * sc_t

    @triton.jit
    def _attend(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, m, l, acc_lo, acc_hi, qk_scale, keep,
                MASK: tl.constexpr, HAS_HI: tl.constexpr, IEEE: tl.constexpr):
        # one (BLOCK_M, BLOCK_N) tile of the online softmax, in log2 units; keep (BLOCK_M, BLOCK_N): the
        # pairs that count (only when MASK). Every row has seen a key before or in its first tile, so m
        # stays finite and a row with no key in this tile gets p = 0.
        s = _mm(q_lo, tl.trans(k_lo), tl.zeros((q_lo.shape[0], k_lo.shape[0]), tl.float32), IEEE)
        if HAS_HI:
            s = _mm(q_hi, tl.trans(k_hi), s, IEEE)
        s = s * qk_scale
        if MASK:
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if not IEEE:  # P rounded to the activation dtype for the second product, as flash attention does
            p = p.to(v_lo.dtype)
        acc_lo = _mm(p, v_lo, acc_lo * alpha[:, None], IEEE)
        if HAS_HI:
            acc_hi = _mm(p, v_hi, acc_hi * alpha[:, None], IEEE)
        return m_new, l, acc_lo, acc_hi

    @triton.jit
    def _new_rows(kn_ptr, vn_ptr, bt_ptr, sbt, start, j, jm, kvh, sk_t, sk_h, sv_t, sv_h, sc_h, sc_b, sc_t,
                  BS: tl.constexpr, NEW_PAGED: tl.constexpr, MASKED: tl.constexpr):
        # chunk keys j (BLOCK_N,): their row offsets in (K source, V source), the cache or the new tensors
        if NEW_PAGED:
            rk = _cache_rows(bt_ptr, sbt, start + j, jm, kvh * sc_h, sc_b, sc_t, BS, MASKED)
            rv = rk
        else:
            rk = j.to(tl.int64) * sk_t + kvh * sk_h
            rv = j.to(tl.int64) * sv_t + kvh * sv_h
        return rk, rv

    @triton.jit(do_not_specialize=["start", "T"])
    def _prefill_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, start, T,
                        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_b, sc_h, sc_t, sbt, so_t, so_h, qk_scale,
                        GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr,
                        D_HI: tl.constexpr, HAS_HI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        NEW_PAGED: tl.constexpr, FP8: tl.constexpr, NEW_FP8: tl.constexpr, IEEE: tl.constexpr,
                        PDL: tl.constexpr, DYN: tl.constexpr):
        pdl_start(PDL)  # everything read here (q, k, v, the cache) comes from earlier kernels
        if DYN:  # start and T from device memory (`start` is then a pointer): one CUDA graph serves any prefix
            T = tl.load(start + 1)
            start = tl.load(start)
        mt = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest query tile first
        h = tl.program_id(1)
        kvh = h // GROUP
        m0 = mt * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)  # chunk-relative query index; position start + offs_m
        qm = offs_m < T
        offs_n = tl.arange(0, BLOCK_N)
        d_lo = tl.arange(0, D_LO)
        d_hi = D_LO + tl.arange(0, D_HI)
        DT = q_ptr.dtype.element_ty
        q_rows = offs_m.to(tl.int64) * sq_t + h * sq_h
        q_lo, q_hi = _load_rows(q_ptr, q_rows, d_lo, d_hi, qm, False, DT, True, HAS_HI, D)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc_lo = tl.zeros((BLOCK_M, D_LO), tl.float32)
        acc_hi = tl.zeros((BLOCK_M, D_HI), tl.float32)
        # the past, positions 0..start-1 from the cache: full tiles, then a partial one
        head_off = kvh * sc_h
        past_full = (start // BLOCK_N) * BLOCK_N
        # a tile within one block (BLOCK_N divides BS): one block-table entry, then a fixed (BLOCK_N, D) pattern
        tile_lo = offs_n[:, None] * sc_t + d_lo[None, :]
        tile_hi = offs_n[:, None] * sc_t + d_hi[None, :]
        for n0 in range(0, past_full, BLOCK_N):
            if BS % BLOCK_N == 0:
                phys = tl.load(bt_ptr + (n0 // BS) * sbt).to(tl.int64)
                off = phys * sc_b + head_off + (n0 % BS) * sc_t
                k_lo, k_hi = _load_tile(kc_ptr + off, tile_lo, tile_hi, d_hi, FP8, DT, HAS_HI, D)
                v_lo, v_hi = _load_tile(vc_ptr + off, tile_lo, tile_hi, d_hi, FP8, DT, HAS_HI, D)
            else:
                r = _cache_rows(bt_ptr, sbt, n0 + offs_n, qm, head_off, sc_b, sc_t, BS, False)
                k_lo, k_hi = _load_rows(kc_ptr, r, d_lo, d_hi, qm, FP8, DT, False, HAS_HI, D)
                v_lo, v_hi = _load_rows(vc_ptr, r, d_lo, d_hi, qm, FP8, DT, False, HAS_HI, D)
            m, l, acc_lo, acc_hi = _attend(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, m, l, acc_lo, acc_hi, qk_scale,
                                           qm, False, HAS_HI, IEEE)
        if past_full < start:
            t = past_full + offs_n
            tm = t < start
            r = _cache_rows(bt_ptr, sbt, t, tm, head_off, sc_b, sc_t, BS, True)
            k_lo, k_hi = _load_rows(kc_ptr, r, d_lo, d_hi, tm, FP8, DT, True, HAS_HI, D)
            v_lo, v_hi = _load_rows(vc_ptr, r, d_lo, d_hi, tm, FP8, DT, True, HAS_HI, D)
            m, l, acc_lo, acc_hi = _attend(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, m, l, acc_lo, acc_hi, qk_scale,
                                           tm[None, :], True, HAS_HI, IEEE)
        # the chunk's keys: those below the query tile are seen by all its queries (BLOCK_M % BLOCK_N == 0)
        if NEW_PAGED:
            k_src, v_src = kc_ptr, vc_ptr
        else:
            k_src, v_src = kn_ptr, vn_ptr
        for n0 in range(0, m0, BLOCK_N):
            j = n0 + offs_n
            rk, rv = _new_rows(kn_ptr, vn_ptr, bt_ptr, sbt, start, j, qm, kvh, sk_t, sk_h, sv_t, sv_h, sc_h, sc_b,
                               sc_t, BS, NEW_PAGED, False)
            k_lo, k_hi = _load_rows(k_src, rk, d_lo, d_hi, qm, NEW_FP8, DT, False, HAS_HI, D)
            v_lo, v_hi = _load_rows(v_src, rv, d_lo, d_hi, qm, NEW_FP8, DT, False, HAS_HI, D)
            m, l, acc_lo, acc_hi = _attend(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, m, l, acc_lo, acc_hi, qk_scale,
                                           qm, False, HAS_HI, IEEE)
        # ... and the diagonal tiles, causal: chunk key j is seen by query i when j <= i (j < T follows)
        for n0 in range(m0, tl.minimum(m0 + BLOCK_M, T), BLOCK_N):
            j = n0 + offs_n
            jm = j < T
            rk, rv = _new_rows(kn_ptr, vn_ptr, bt_ptr, sbt, start, j, jm, kvh, sk_t, sk_h, sv_t, sv_h, sc_h, sc_b,
                               sc_t, BS, NEW_PAGED, True)
            k_lo, k_hi = _load_rows(k_src, rk, d_lo, d_hi, jm, NEW_FP8, DT, True, HAS_HI, D)
            v_lo, v_hi = _load_rows(v_src, rv, d_lo, d_hi, jm, NEW_FP8, DT, True, HAS_HI, D)
            m, l, acc_lo, acc_hi = _attend(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, m, l, acc_lo, acc_hi, qk_scale,
                                           j[None, :] <= offs_m[:, None], True, HAS_HI, IEEE)
        o_rows = offs_m.to(tl.int64) * so_t + h * so_h
        tl.store(out_ptr + o_rows[:, None] + d_lo[None, :], (acc_lo / l[:, None]).to(DT), mask=qm[:, None])
        if HAS_HI:
            tl.store(out_ptr + o_rows[:, None] + d_hi[None, :], (acc_hi / l[:, None]).to(DT),
                     mask=qm[:, None] & (d_hi[None, :] < D))


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch of the kernel: BLOCK_M queries x BLOCK_N keys per step (BLOCK_M a multiple
    of BLOCK_N for variant ptr), num_warps, num_stages (software-pipelined key tiles). variant "ptr": `_prefill_kernel`
    (pointer loads, any GPU); "tma": `prefill_hopper._prefill_tma_kernel` (TMA loads, sm90+; a key tile at most
    two cache blocks), where `pad` loads head_dim as one zero-padded power of 2 instead of two parts; "gluon":
    `prefill_gluon._prefill_gluon_kernel` (sm90, experimental: bf16, head_dim 96, BLOCK_N = the cache block, one
    warpgroup; every key from the cache, so the caller passes the chunk's blocks in the table and no k/v). maxnreg caps
    the registers per thread (ptxas), e.g. 128 so that two programs of 8 warps fit on one SM (one's softmax
    overlapping the other's wgmma)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    variant: str = "ptr"
    pad: bool = False
    maxnreg: int | None = None

    def __post_init__(self) -> None:
        if self.block_m % self.block_n and self.variant == "ptr" or min(self.block_m, self.block_n) < 16:
            raise ValueError(f"{self}: block_m must be a multiple of block_n (variant ptr), both >= 16")
        if self.variant not in VARIANTS or self.pad and self.variant != "tma":
            raise ValueError(f"{self}: variant one of {VARIANTS}; pad needs variant tma")
        if self.variant == "gluon" and (self.num_warps != 4 or self.num_stages < 2 or self.maxnreg):
            raise ValueError(f"{self}: variant gluon runs one warpgroup (num_warps 4), num_stages >= 2, "
                             "no register cap")

    @classmethod
    def parse(cls, text: str) -> PrefillConfig:
        """'128,64,8,3' -> PrefillConfig(128, 64, 8, 3); '128,64,8,2,tma,r128' -> the TMA variant, at most 128
        registers per thread; ',pad': head_dim padded."""
        parts = [x.strip() for x in text.split(",")]
        flags = set(parts[4:])
        regs = [f for f in flags if f[:1] == "r" and f[1:].isdigit()]
        try:
            variant = [f for f in flags if f in VARIANTS[1:]]
            if not flags - set(regs) <= {"tma", "gluon", "pad"} or len(regs) > 1 or len(variant) > 1:
                raise ValueError
            return cls(*(int(x) for x in parts[:4]), variant=variant[0] if variant else "ptr",
                       pad="pad" in flags, maxnreg=int(regs[0][1:]) if regs else None)
        except (TypeError, ValueError):
            raise ValueError(f"prefill attention config {text!r}: expected 'block_m,block_n,num_warps,num_stages' "
                             "with block_m a multiple of block_n, e.g. '128,64,8,3', optionally followed by "
                             "',tma' / ',tma,pad' and / or ',r128' (a register cap)") from None

    def text(self) -> str:
        """The form parse reads."""
        flags = [f for f, on in ((self.variant, self.variant != "ptr"), ("pad", self.pad),
                                 (f"r{self.maxnreg}", self.maxnreg)) if on]
        return ",".join([str(x) for x in (self.block_m, self.block_n, self.num_warps, self.num_stages)] + flags)


VARIANTS = ("ptr", "tma", "gluon")


def parse_configs(raw: str) -> dict[str, PrefillConfig]:
    """"bf16=128,64,8,3;fp8=128,64,8,2" -> a config per KV storage (bf16: 16-bit activations with a cache of the
    same dtype, fp8: an e4m3 cache, fp32: fp32 activations): overrides of CONFIGS for tuning runs
    (`EngineConfig.prefill_attn_configs`, CLI environment PHI3V_PREFILL_ATTN_CONFIG)."""
    out = {}
    for part in filter(None, raw.split(";")):
        name, _, vals = part.partition("=")
        if name.strip() not in CONFIGS:
            raise ValueError(f"prefill attention config {raw!r}: the KV storage must be one of {', '.join(CONFIGS)}")
        out[name.strip()] = PrefillConfig.parse(vals)
    return out


# bf16: the best of benchmarks/long_prefill.py's sweep on the H200 (docs/perf-log.md); fp8: untuned. fp32 (exact products, no tensor
# cores): small tiles, as its dot layouts take many registers (sm90 compile: 128 x 64 spills, 16 x 16 barely).
CONFIGS: dict[str, PrefillConfig] = {"bf16": PrefillConfig(128, 128, 8, 2), "fp8": PrefillConfig(128, 64, 8, 3),
                                     "fp32": PrefillConfig(16, 16, 4, 2)}


def suffix_config(t_len: int, dtype: torch.dtype, kv_dtype: torch.dtype) -> PrefillConfig:
    """Tiles for a short suffix after a cached prefix (SuffixAttention): small query tiles, so that its few
    queries make cdiv(T, BLOCK_M) x heads programs, each streaming the whole past once."""
    if dtype == torch.float32:
        return CONFIGS["fp32"]
    bm = 16 if t_len <= 16 else 32 if t_len <= 64 else 64
    return PrefillConfig(bm, min(bm, 32) if kv_dtype == torch.float8_e4m3fn else bm, 4, 2)


def config_key(q: Tensor, k_cache: Tensor) -> str:
    if k_cache.dtype == torch.float8_e4m3fn:
        return "fp8"
    return "fp32" if q.dtype == torch.float32 else "bf16"


# Which prefill chunks take the kernel (`EngineConfig.paged_prefill`): "past" = chunks with earlier chunks in the
# cache (start > 0; a first chunk has no past to read, and SDPA's flash kernel serves it), "all" = every
# chunk, "off" = none (SDPA over the gathered past: the A/B baseline).
MODES = ("past", "all", "off")

# launches per kernel variant since import: a tuning run (benchmarks/long_prefill.py) checks that the variant it times
# is the one that ran (a config falls back to the pointer kernel where its variant does not apply)
LAUNCHES: Counter[str] = Counter()


def use_kernel(mode: str, start: int) -> bool:
    """Whether a chunk starting at `start` takes the kernel (the caller checks Triton)."""
    return mode == "all" or (mode == "past" and start > 0)


def launch_args(cfg: PrefillConfig, q: Tensor) -> dict:
    """Launch kwargs beside the tile constexprs: PDL (off: see pdl_args) and the register cap when set."""
    return {**pdl_args(q, False), **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})}


def _split_head_dim(d: int) -> tuple[int, int]:
    # (D_LO, D_HI): d itself when a power of 2 (D_HI unused), else the largest power of 2 below d and the
    # rest rounded up to a power of 2 (96 -> 64 + 32, 48 -> 32 + 16, 112 -> 64 + 64 with 16 lanes masked)
    if d & (d - 1) == 0:
        return d, 0
    lo = 1 << (d.bit_length() - 1)
    return lo, triton.next_power_of_2(d - lo)


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int | Tensor,
                            k: Tensor | None = None, v: Tensor | None = None,
                            config: PrefillConfig | None = None) -> Tensor:
    """Causal attention of one sequence's chunk over its paged cache, scale 1/sqrt(D).

    q (T, Hq, D): queries at positions start..start+T-1 (last dim contiguous; any other strides).
    k_cache, v_cache: one layer's (n_blocks, Hkv, BS, D), contiguous, in q's dtype or fp8 e4m3.
    block_table: (n,) the sequence's block ids (any integer dtype, any stride), covering positions
    0..start-1, and start..start+T-1 too when k/v are not given.
    k, v (T, Hkv, D): the chunk's own K/V (last dim contiguous), read from here instead of the cache
    (positions start.. must then be in the cache only when k/v are None).
    `start` may be a device tensor [start, T] (int32 or int64): read by the kernel, so that a CUDA graph captured
    for q's length serves any prefix; queries from T on are padding (not computed; their output rows are zeros).
    Returns (T, Hq, D), contiguous, in q's dtype."""
    t_len, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv or k_cache.shape[3] != d or (k is None) != (v is None):
        raise ValueError(f"q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, k/v given: {k is not None}")
    cfg = config or CONFIGS[config_key(q, k_cache)]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    paged = k is None
    if paged:
        k = v = q  # unused
    assert k.stride(2) == 1 and v.stride(2) == 1
    # dynamic T: rows from T on (padding) are never written; zeros, not garbage, flow on through the layer
    out = (torch.zeros if isinstance(start, Tensor) else torch.empty)(t_len, hq, d, device=q.device, dtype=q.dtype)
    if t_len == 0:
        return out
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if cfg.variant == "gluon" and paged and not isinstance(start, Tensor):
        from phi3v.kernels import prefill_gluon
        if prefill_gluon.applies(q, k_cache, cfg):  # else the pointer kernel, below
            prefill_gluon.launch(q, k_cache, v_cache, block_table, start, out, cfg)
            LAUNCHES["gluon"] += 1
            return out
    if cfg.variant == "tma" and not (paged or fp8 or isinstance(start, Tensor)):
        from phi3v.kernels import prefill_hopper
        if prefill_hopper.applies(k_cache, k, v):  # else the pointer kernel, below
            prefill_hopper.launch(q, k_cache, v_cache, block_table, start, k, v, out, cfg)
            LAUNCHES["tma"] += 1
            return out
    LAUNCHES["ptr"] += 1
    if cfg.variant != "ptr":  # a variant that does not apply here: the pointer kernel's own tile for this cache
        cfg = CONFIGS[config_key(q, k_cache)]
    d_lo, d_hi = _split_head_dim(d)
    grid = (triton.cdiv(t_len, cfg.block_m), hq)
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_table, out, start, t_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
        d ** -0.5 * 1.4426950408889634,  # log2(e): exp(x) = exp2(x * log2 e)
        GROUP=hq // hkv, BS=bs, D=d, D_LO=d_lo, D_HI=max(d_hi, 1), HAS_HI=d_hi > 0, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, NEW_PAGED=paged, FP8=fp8, NEW_FP8=fp8 and paged,
        IEEE=q.dtype == torch.float32, DYN=isinstance(start, Tensor), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_args(cfg, q))
    return out


def warmup(k_cache: Tensor, v_cache: Tensor, n_heads: int, dtype: torch.dtype,
           configs: dict[str, PrefillConfig] | None = None) -> None:
    """Compile the kernel as the engine calls it (a later chunk: the past read from this cache, the chunk's K/V
    from the layer's tensors; strides divisible by 16, a strided block table), with the config the engine will use
    (`configs`: EngineConfig.prefill_attn_configs, else CONFIGS), so that the first long prompt does not wait for
    Triton. Reads block 0 of the given layer's cache; writes nothing there."""
    hkv, bs, d = k_cache.shape[1:]
    q = torch.zeros(16, n_heads, d, device=k_cache.device, dtype=dtype)
    kv = torch.zeros(16, hkv, d, device=k_cache.device, dtype=dtype)
    bt = torch.zeros(2 * bs, device=k_cache.device, dtype=torch.long)[::bs]  # as PrefillAttention's past[0][::bs]
    cfg = (configs or {}).get(config_key(q, k_cache))
    if cfg is not None and cfg.variant == "gluon":  # as PrefillAttention calls it: every key from the cache
        kv = None
    paged_prefill_attention(q, k_cache, v_cache, bt, bs, kv, kv, config=cfg)
