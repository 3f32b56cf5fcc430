"""Decode-attention kernel variants over a paged KV cache (fp8 e4m3 and bf16), to find why the fp8 kernel
reached only 1.55 TB/s (BENCHMARKS.md, third session) and what would stream it near bandwidth. The FMA
variant won (fp8 2.62 TB/s against 1.35 for the tl.dot kernel) and is now the engine's fp8 path.

Variants (flags of one probe kernel; cached positions 0..L-1 only, no new-token store; split-KV + merge):
- SPLIT_D: head_dim 96 as two tiles of 64 + 32 (the present kernel pads it to 128: a quarter of the loads,
  conversions and products are wasted on masked lanes);
- V_T: V stored transposed inside a block, (D, BS), so that V is K-contiguous as the second product's B
  operand (8-bit data cannot be transposed by ldmatrix, which 16-bit data can);
- FMA: no tensor cores, multiply-and-sum in fp32 with one online softmax per token lane of the tile
  (no cross-thread reduction inside the loop), merged at the end; one query head per kv head only.

Usage: python benchmarks/attention_variants.py [--small | --real] [--out variants.json]
--small: tiny shapes, checks every variant against torch (runs under TRITON_INTERPRET=1 on a CPU).
--real: the engine's kernel alone at KV splits and fp8 (tile, warps); prints the best as PHI3V_ATTN_CONFIG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.bench import emit  # noqa: E402
from phi3v.engine.paged_attention import _merge_kernel, num_splits, paged_decode_attention  # noqa: E402

FP8 = torch.float8_e4m3fn


@triton.jit
def _probe_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, out_ptr, pacc_ptr, pml_ptr,
                  sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sv_d, sbt, so_b, so_h, scale,
                  BS: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, BLOCK_D: tl.constexpr,
                  TILE: tl.constexpr, NSPLIT: tl.constexpr, FMA: tl.constexpr, FP8: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    L = tl.load(len_ptr + b)
    lo = tl.arange(0, D_LO)
    hi = D_LO + tl.arange(0, D_HI)  # D_HI = 0 is not allowed: the probe runs head_dim 96 (64 + 32) only
    hm = hi < D
    offs_t = tl.arange(0, TILE)
    per = tl.cdiv(tl.cdiv(L, TILE), NSPLIT) * TILE
    t_lo = s * per
    t_hi = tl.minimum(t_lo + per, L)
    qb = q_ptr + b * sq_b + h * sq_h
    if FMA:
        q_lo = tl.load(qb + lo).to(tl.float32)
        q_hi = tl.load(qb + hi, mask=hm, other=0.0).to(tl.float32)
        m = tl.full((TILE,), float("-inf"), tl.float32)
        l = tl.zeros((TILE,), tl.float32)
        a_lo = tl.zeros((TILE, D_LO), tl.float32)
        a_hi = tl.zeros((TILE, D_HI), tl.float32)
    else:
        offs_g = tl.arange(0, 16)
        g0 = offs_g == 0  # one query head per kv head, as row 0 of a 16-row tile (tl.dot's minimum)
        q_lo = tl.load(qb + offs_g[:, None] * 0 + lo[None, :], mask=g0[:, None], other=0.0)
        q_hi = tl.load(qb + offs_g[:, None] * 0 + hi[None, :], mask=g0[:, None] & hm[None, :], other=0.0)
        if FP8:
            q_lo = q_lo.to(tl.float16)
            q_hi = q_hi.to(tl.float16)
        m = tl.full((16,), float("-inf"), tl.float32)
        l = tl.zeros((16,), tl.float32)
        a_lo = tl.zeros((16, D_LO), tl.float32)
        a_hi = tl.zeros((16, D_HI), tl.float32)
    for t0 in range(t_lo, t_hi, TILE):
        t = t0 + offs_t
        tm = t < t_hi
        phys = tl.load(bt_ptr + b * sbt + t // BS, mask=tm, other=0).to(tl.int64)
        kb = phys * sk_b + h * sk_h + (t % BS) * sk_t  # (TILE,)
        vb = phys * sv_b + h * sv_h + (t % BS) * sv_t
        k_lo = tl.load(kc_ptr + kb[:, None] + lo[None, :], mask=tm[:, None], other=0.0)
        k_hi = tl.load(kc_ptr + kb[:, None] + hi[None, :], mask=tm[:, None] & hm[None, :], other=0.0)
        v_lo = tl.load(vc_ptr + vb[:, None] + lo[None, :] * sv_d, mask=tm[:, None], other=0.0)
        v_hi = tl.load(vc_ptr + vb[:, None] + hi[None, :] * sv_d, mask=tm[:, None] & hm[None, :], other=0.0)
        if FMA:
            if FP8:  # e4m3 -> fp16 is one native conversion per two values; fp16 -> fp32 exact
                k_lo = k_lo.to(tl.float16)
                k_hi = k_hi.to(tl.float16)
                v_lo = v_lo.to(tl.float16)
                v_hi = v_hi.to(tl.float16)
            sc = tl.sum(k_lo.to(tl.float32) * q_lo[None, :], axis=1) + tl.sum(k_hi.to(tl.float32) * q_hi[None, :], axis=1)
            sc = tl.where(tm, sc * scale, float("-inf"))  # (TILE,)
            m_new = tl.maximum(m, sc)
            ms = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes without tokens yet: no NaN
            alpha = tl.exp(m - ms)
            p = tl.exp(sc - ms)
            l = l * alpha + p
            a_lo = a_lo * alpha[:, None] + p[:, None] * v_lo.to(tl.float32)
            a_hi = a_hi * alpha[:, None] + p[:, None] * v_hi.to(tl.float32)
            m = m_new
        else:
            if FP8:
                k_lo = k_lo.to(tl.float16)
                k_hi = k_hi.to(tl.float16)
                v_lo = v_lo.to(tl.float16)
                v_hi = v_hi.to(tl.float16)
            sc = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))  # (16, TILE)
            sc = tl.where(tm[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            ms = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - ms[:, None])
            alpha = tl.exp(m - ms)
            l = l * alpha + tl.sum(p, axis=1)
            pv = p.to(v_lo.dtype)
            a_lo = a_lo * alpha[:, None] + tl.dot(pv, v_lo)
            a_hi = a_hi * alpha[:, None] + tl.dot(pv, v_hi)
            m = m_new
    if FMA:  # merge the token lanes
        mx = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx))
        lt = tl.sum(l * w, axis=0)
        o_lo = tl.sum(a_lo * w[:, None], axis=0)  # (D_LO,)
        o_hi = tl.sum(a_hi * w[:, None], axis=0)
        mt = mx
    else:  # row 0 of the tile
        sel = (tl.arange(0, 16) == 0)
        lt = tl.sum(tl.where(sel, l, 0.0), axis=0)
        mt = tl.max(tl.where(sel, m, float("-inf")), axis=0)
        o_lo = tl.sum(tl.where(sel[:, None], a_lo, 0.0), axis=0)
        o_hi = tl.sum(tl.where(sel[:, None], a_hi, 0.0), axis=0)
    if NSPLIT == 1:
        ob = out_ptr + b * so_b + h * so_h
        tl.store(ob + lo, (o_lo / lt).to(out_ptr.dtype.element_ty))
        tl.store(ob + hi, (o_hi / lt).to(out_ptr.dtype.element_ty), mask=hm)
    else:
        row = (b * tl.num_programs(1) + h) * NSPLIT + s
        tl.store(pacc_ptr + row * BLOCK_D + lo, o_lo)
        tl.store(pacc_ptr + row * BLOCK_D + hi, o_hi, mask=hm)
        tl.store(pml_ptr + row * 2, mt)
        tl.store(pml_ptr + row * 2 + 1, lt)


def probe_attention(q, kc, vc, bt, lengths, nsplit, *, v_t: bool, fma: bool, tile: int, warps: int = 4,
                    stages: int = 2):
    """q (n, H, D); kc (blocks, H, BS, D); vc the same, or (blocks, H, D, BS) with v_t. -> (n, H, D)."""
    n, h, d = q.shape
    bs = kc.shape[2]
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(d)
    d_lo = 1 << (d.bit_length() - 1)
    d_hi = triton.next_power_of_2(d - d_lo) if d > d_lo else 0
    assert d_hi >= 16 or fma, "the probe needs head_dim = 2^a + 2^b"
    pacc = torch.empty(n * h * nsplit, block_d, device=q.device, dtype=torch.float32)
    pml = torch.empty(n * h * nsplit, 2, device=q.device, dtype=torch.float32)
    sv_t, sv_d = (1, vc.stride(2)) if v_t else (vc.stride(2), 1)
    _probe_kernel[(n, h, nsplit)](
        q, kc, vc, bt, lengths, out, pacc, pml, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), sv_t, sv_d, bt.stride(0), out.stride(0), out.stride(1), d ** -0.5,
        BS=bs, D=d, D_LO=d_lo, D_HI=d_hi, BLOCK_D=block_d, TILE=tile, NSPLIT=nsplit, FMA=fma,
        FP8=kc.dtype == FP8, num_warps=warps, num_stages=stages)
    if nsplit > 1:
        _merge_kernel[(n, h)](pacc, pml, out, out.stride(0), out.stride(1), D=d, BLOCK_D=block_d, NSPLIT=nsplit, PDL=False,
                              num_warps=2)
    return out


def reference(q, kc, vc, bt, lens):
    """fp32 attention of each row over its cached positions (v in the normal layout)."""
    outs = []
    bs = kc.shape[2]
    for b, L in enumerate(lens):
        blocks = bt[b, : -(-L // bs)].long()
        k = kc[blocks].float().transpose(1, 2).flatten(0, 1)[:L]  # (L, H, D)
        v = vc[blocks].float().transpose(1, 2).flatten(0, 1)[:L]
        sc = torch.einsum("hd,thd->ht", q[b].float(), k) * q.shape[-1] ** -0.5
        outs.append(torch.einsum("ht,thd->hd", sc.softmax(-1), v))
    return torch.stack(outs)


def make_case(batch, ctx, h, d, bs, dev, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [max(1, int(ctx * (1 - 0.3 * torch.rand(1, generator=g).item()))) for _ in range(batch)]
    nb = -(-max(lens) // bs)
    kc = torch.randn(batch * nb, h, bs, d, generator=g).to(dev, dtype)
    vc = torch.randn(batch * nb, h, bs, d, generator=g).to(dev, dtype)
    bt = torch.randperm(batch * nb, generator=g).int().view(batch, nb).to(dev)
    q = torch.randn(batch, h, d, generator=g).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    return lens, kc, vc, bt, q


VARIANTS = {  # name: (v_t, fma, tile, warps, stages); V_T for fp8 hit an illegal address on the H100 (bf16: slower,
    # 0.7-1.1 TB/s at batch 1), so it is no longer run
    "dot_splitd_t32": (False, False, 32, 4, 2),
    "dot_splitd_t64": (False, False, 64, 4, 2),
    "dot_splitd_t64_s3": (False, False, 64, 4, 3),
    "dot_splitd_t128": (False, False, 128, 4, 2),
    "dot_splitd_t128_w8": (False, False, 128, 8, 2),
    "fma_t32": (False, True, 32, 4, 1),
    "fma_t64": (False, True, 64, 4, 1),
    "fma_t64_w2": (False, True, 64, 2, 1),
}


def small_check() -> None:
    for dtype in (torch.float32, torch.float16, FP8):
        lens, kc, vc, bt, q = make_case(3, 150, 2, 96, 16, "cpu", dtype)
        if dtype != FP8:
            q = q.to(dtype)
        lengths = torch.tensor(lens)
        ref = reference(q, kc, vc, bt, lens)
        for name, (v_t, fma, tile, _, _) in VARIANTS.items():
            if dtype == torch.float32 and not fma:
                continue  # the interpreter's fp32 dot rounds like TF32 unless asked otherwise; the GPU check covers it
            vcl = vc.transpose(2, 3).contiguous() if v_t else vc
            for ns in (1, 4):
                out = probe_attention(q, kc, vcl, bt, lengths, ns, v_t=v_t, fma=fma, tile=min(tile, 32))
                err = (out.float() - ref).abs().max().item()
                print(f"{dtype} {name} nsplit {ns}: max err {err:.2e}")
                assert err < (2e-2 if dtype != torch.float32 else 1e-4), (dtype, name, ns, err)
    print("small check ok")


def time_us(fn, layers: int) -> float:
    from attention_bench import graph_ms

    return 1000 * graph_ms(fn, 10) / layers


def real_kernel(layers: int, h: int, d: int, bs: int, dev: str) -> dict:
    """The engine's kernel (paged_decode_attention, new-token store included) at settings."""
    out: dict = {}
    for batch, ctx in ((1, 2600), (64, 2400)):
        for dtype, tag in ((torch.bfloat16, "bf16"), (FP8, "fp8")):
            caches = [make_case(batch, ctx, h, d, bs, dev, dtype, seed=i) for i in range(layers)]
            lens, _, _, bt, q = caches[0]
            lengths = torch.tensor(lens, device=dev) - 1  # the new token goes to the last cached position
            nbytes = sum(lens) * h * d * 2 * (1 if dtype == FP8 else 2)
            kn = torch.randn(batch, h, d, device=dev, dtype=torch.bfloat16)
            splits = (16,) if batch == 1 else (1, 2)
            cfgs = ((64, 2, 1), (32, 2, 1), (32, 4, 1), (64, 4, 1), (16, 2, 1)) if dtype == FP8 else ((64, 4, 2),)
            for ns in splits:
                for tile, warps, stages in cfgs:
                    us = time_us(lambda: [paged_decode_attention(q, kn, kn, c[1], c[2], bt, lengths, ns, tile, warps,
                                                                 stages) for c in caches], layers)
                    key = f"b{batch}_{tag}_ns{ns}_t{tile}_w{warps}"
                    out[key] = {"us": us, "tb_s": nbytes / us / 1e6}
                    print(f"{key}: {us:.1f} us {nbytes / us / 1e6:.2f} TB/s", flush=True)
            del caches
            torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--real", action="store_true", help="time the engine's kernel only: KV splits, and tile and "
                    "warps for fp8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.small:
        small_check()
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    layers, h, d, bs, dev = 8, 32, 96, 64, "cuda"
    res: dict = {"device": torch.cuda.get_device_name(0), "cases": []}
    if a.real:
        res["real"] = real_kernel(layers, h, d, bs, dev)
        emit(res, a.out)
        # the fastest fp8 setting at batch 64, as PHI3V_ATTN_CONFIG's value (last line)
        best = min((k for k in res["real"] if k.startswith("b64_fp8_ns1")),
                   key=lambda k: res["real"][k]["us"])
        tile, warps = (int(x[1:]) for x in best.split("_")[3:5])
        print(f"fp8={tile},{warps},1")
        return
    for batch, ctx in ((1, 2600), (64, 2400)):
        case: dict = {"batch": batch, "runs": {}}
        for dtype, tag in ((torch.bfloat16, "bf16"), (FP8, "fp8")):
            caches = [make_case(batch, ctx, h, d, bs, dev, dtype, seed=i) for i in range(layers)]
            lens, _, _, bt, q = caches[0]
            bt = caches[0][3]
            lengths = torch.tensor(lens, device=dev)
            ns = num_splits(batch, h)
            nbytes = sum(lens) * h * d * 2 * (1 if dtype == FP8 else 2)
            case.setdefault("mean_len", sum(lens) / batch)
            kn = torch.zeros(batch, h, d, device=dev, dtype=torch.bfloat16)

            def cur():  # the present kernel (it also stores a new token: into a spare row of the last block)
                return [paged_decode_attention(q, kn, kn, c[1], c[2], bt, lengths - 1, ns) for c in caches]

            us = time_us(cur, layers)
            case["runs"][f"{tag}_current"] = {"us": us, "tb_s": nbytes / us / 1e6}
            print(f"batch {batch} {tag} current: {us:.1f} us {nbytes / us / 1e6:.2f} TB/s", flush=True)
            ref = reference(q, caches[0][1], caches[0][2], bt, lens)  # after `cur` wrote its token
            for name, (v_t, fma, tile, warps, stages) in VARIANTS.items():
                vcs = [c[2].transpose(2, 3).contiguous() if v_t else c[2] for c in caches]
                try:
                    out = probe_attention(q, caches[0][1], vcs[0], bt, lengths, ns, v_t=v_t, fma=fma, tile=tile,
                                          warps=warps, stages=stages)
                    err = (out.float() - ref).abs().max().item()
                    us = time_us(lambda: [probe_attention(q, c[1], vv, bt, lengths, ns, v_t=v_t, fma=fma, tile=tile,
                                                          warps=warps, stages=stages)
                                          for c, vv in zip(caches, vcs)], layers)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                    case["runs"][f"{tag}_{name}"] = {"error": str(e)[:200]}
                    print(f"batch {batch} {tag} {name}: error {str(e)[:200]}", flush=True)
                    continue
                case["runs"][f"{tag}_{name}"] = {"us": us, "tb_s": nbytes / us / 1e6, "max_err": err}
                print(f"batch {batch} {tag} {name}: {us:.1f} us {nbytes / us / 1e6:.2f} TB/s err {err:.1e}", flush=True)
            del caches
            torch.cuda.empty_cache()
        res["cases"].append(case)
    emit(res, a.out)


if __name__ == "__main__":
    main()
