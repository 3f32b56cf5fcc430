"""What a shape seen for the first time costs on the GPU, and whether small host-to-device copies make the
host wait: the candidate causes of the offline job's mid-run stalls (BENCHMARKS.md, "What limits (c)").

Usage: python benchmarks/cold_shapes.py [--folder /tmp/phi3v-full-random] [--out cold.json]
For each op: the first call at a new shape against the median of the next 5 (ms, synchronised). Shapes are
odd sizes no earlier call used. Copies: the host time of one copy issued behind ~30 ms of queued GPU work;
a copy that waits for the stream takes about as long as that work. Last, after `LLM.warmup()`: the time to
first token of a 16-crop image with a prompt length not seen before, then again at that length (another image).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import checkpoint_args  # noqa: E402  (benchmarks/ is the script's folder)
from phi3v import LLM  # noqa: E402
from phi3v import SamplingParams  # noqa: E402
from phi3v.bench import PROMPT, emit, noise_image  # noqa: E402
from phi3v.models import kernels  # noqa: E402


def cold_warm(fn: Callable[[], object]) -> dict[str, float]:
    """(first call, median of the next 5) in ms, each synchronised."""
    ms = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t) * 1000)
    return {"cold_ms": round(ms[0], 3), "warm_ms": round(statistics.median(ms[1:]), 3)}


def sdpa(shape: tuple[int, int, int, int], causal: bool, backend: SDPBackend | None) -> dict[str, float]:
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def run() -> object:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return cold_warm(run)


def busy(ms: float = 30.0) -> None:
    """Queue about `ms` of GPU work without waiting for it."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    a @ a
    torch.cuda.synchronize()
    one = (time.perf_counter() - t) * 1000
    for _ in range(max(1, int(ms / one))):
        a @ a


def copy_wait(copy: Callable[[], object]) -> dict[str, float]:
    """Host ms of `copy` issued behind ~30 ms of queued GPU work (median of 5)."""
    out = []
    for _ in range(5):
        busy()
        t = time.perf_counter()
        copy()
        out.append((time.perf_counter() - t) * 1000)
        torch.cuda.synchronize()
    return {"host_ms": round(statistics.median(out), 3)}


@torch.inference_mode()
def main() -> None:
    a = checkpoint_args()
    llm = LLM(a.folder, device="cuda", max_num_seqs=4, max_model_len=3072)
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
                 "torch": torch.__version__}
    # SDPA at CLIP's shape (crops, 16 heads, 577, 64) and the decoder's (1, 32 heads, T, 96), per backend
    for name, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        off = {"default": 0, "flash": 2, "cudnn": 4}[name]
        try:
            sdpa((3, 16, 577, 64), False, backend), sdpa((1, 32, 999, 96), True, backend)  # library set-up
            res[f"sdpa_clip_{name}"] = {n + off: sdpa((n + off, 16, 577, 64), False, backend) for n in (11, 23, 37)}
            res[f"sdpa_decoder_{name}"] = {t + off: sdpa((1, 32, t + off, 96), True, backend) for t in (1201, 1733, 2291)}
        except RuntimeError as e:  # a backend this build or GPU lacks
            res[f"sdpa_{name}"] = f"unavailable: {str(e)[:200]}"
    # the whole eager CLIP tower, the patch convolution alone, and a decoder GEMM at a new row count
    tower = llm.model.model.vision_embed_tokens.img_processor
    res["clip_tower_eager"] = {}
    for n in (19, 26, 44):
        px = torch.randn(n, 3, 336, 336, device="cuda", dtype=llm.dtype)
        res["clip_tower_eager"][n] = cold_warm(lambda: tower(px))
    conv = torch.nn.Conv2d(3, 1024, 14, 14, bias=False, device="cuda", dtype=llm.dtype)
    res["patch_conv"] = {}
    for n in (21, 33):
        px = torch.randn(n, 3, 336, 336, device="cuda", dtype=llm.dtype)
        res["patch_conv"][n] = cold_warm(lambda: conv(px))
    w = torch.randn(9216, 3072, device="cuda", dtype=llm.dtype)
    res["gemm_qkv"] = {}
    for m in (1777, 2459):
        x = torch.randn(m, 3072, device="cuda", dtype=llm.dtype)
        res["gemm_qkv"][m] = cold_warm(lambda: x @ w.t())
    # Triton: the fused add + LayerNorm at a row count divisible by 16 after odd ones, as committed and as a
    # twin of the same kernel that specialises on n_rows (Triton's default)
    if kernels.HAVE_TRITON:
        import triton

        twin = triton.jit(kernels._add_layer_norm_kernel.fn)
        wt, bs = (torch.randn(1024, device="cuda", dtype=llm.dtype) for _ in range(2))
        for label, kern in (("committed", kernels._add_layer_norm_kernel), ("specialising", twin)):
            row = {}
            for rows in (577 * 3, 577 * 16, 577 * 32 + 16 * 3):  # odd, then two multiples of 16
                x = torch.randn(rows, 1024, device="cuda", dtype=llm.dtype)
                o, r = torch.empty_like(x), torch.empty_like(x)
                row[rows] = cold_warm(lambda: kern[(triton.cdiv(rows, 4),)](x, x, wt, bs, o, r, rows, 1024, 1e-5,
                                                                           HAS_RES=True, BLOCK=1024, ROWS=4))
            res[f"add_layer_norm_{label}"] = row
    # host-to-device copies of a prefill's cache positions (2 x 2,500 int64) behind queued GPU work
    host = [list(range(2500)), list(range(2500))]
    res["h2d_pageable_non_blocking"] = copy_wait(lambda: torch.tensor(host).to(dev, non_blocking=True))
    res["h2d_to_device_pinned"] = copy_wait(lambda: kernels.to_device(torch.tensor(host), dev))
    res["h2d_blocking"] = copy_wait(lambda: torch.tensor(host).to(dev))
    big = torch.randn(17, 3, 336, 336).to(llm.dtype)  # a 16-crop image's crops, pageable
    res["h2d_crops_pageable_non_blocking"] = copy_wait(lambda: big.to(dev, non_blocking=True))
    res["h2d_crops_to_device_pinned"] = copy_wait(lambda: kernels.to_device(big, dev))
    for kb in (64, 256, 1024, 4096):  # where the driver starts to wait for the stream
        blob = torch.zeros(kb * 256, dtype=torch.int32)
        res[f"h2d_{kb}KiB_pageable_non_blocking"] = copy_wait(lambda: blob.to(dev, non_blocking=True))
    # time to first token at new prompt lengths (16 crops), after the warm-up the server and batch jobs do
    llm.warmup()
    llm.generate(PROMPT, [noise_image(1344, 1344, 499)], SamplingParams(max_tokens=1), num_crops=16)  # first call
    res["ttft_new_length_ms"] = []
    for k in range(1, 4):
        row = []
        for seed in (1, 2):  # a new image each time: no embedding-cache hit
            torch.cuda.synchronize()
            t = time.perf_counter()
            prompt = PROMPT.replace("detail.", "detail." + " Be brief." * k)
            llm.generate(prompt, [noise_image(1344, 1344, 500 + 10 * k + seed)], SamplingParams(max_tokens=1),
                         num_crops=16)
            row.append(round((time.perf_counter() - t) * 1000, 2))
        res["ttft_new_length_ms"].append({"first": row[0], "again": row[1]})
    emit(res, a.out)


if __name__ == "__main__":
    main()
