"""The host side of image preparation, op by op, on this machine's CPU: where do the milliseconds of a
16-crop image (1344 x 1344, no resize needed) go before the GPU sees it?

Each op runs on 20 fresh images (median, ms). `--mallopt` first asks glibc to serve blocks of up to
256 MB from its heap and to keep freed memory (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD): if the ops are
bound by page faults on freshly mapped memory, they get faster.

Usage: python benchmarks/host_prep.py [--mallopt] [--out host_prep.json]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.bench import emit, noise_image  # noqa: E402
from phi3v.processing.image import ImageProcessor, content_key, hd_resized, pad_canvas  # noqa: E402


def median_ms(fn, imgs) -> float:
    out = []
    for im in imgs:
        t = time.perf_counter()
        fn(im)
        out.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(out), 3)


def encode_into(im, out: np.ndarray) -> None:
    """What PIL's tobytes() does, chunk by chunk, but into `out` instead of joining a fresh bytes object
    (Pillow's encoder API, semi-private: a probe, not what phi3v runs)."""
    from PIL import Image, ImageFile

    flat = out.reshape(-1)
    e = Image._getencoder(im.mode, "raw", im.mode)
    e.setimage(im.im, (0, 0, *im.size))
    pos = 0
    try:
        while True:
            _n, err, data = e.encode(max(ImageFile.MAXBLOCK, im.size[0] * 4))
            flat[pos: pos + len(data)] = np.frombuffer(data, np.uint8)
            pos += len(data)
            if err:
                break
    finally:
        e.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mallopt", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.mallopt:
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-3, 256 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    cuda = torch.cuda.is_available()
    imgs = [noise_image(1344, 1344, s) for s in range(21)]
    px = np.asarray(imgs[0])
    dst = np.empty_like(px)
    proc = ImageProcessor()
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
           "mallopt": a.mallopt, "ms": {
               "pil_copy": median_ms(lambda im: im.copy(), imgs),
               "pil_tobytes": median_ms(lambda im: im.tobytes(), imgs),
               "np_asarray": median_ms(np.asarray, imgs),
               "np_empty_and_fill": median_ms(lambda im: np.empty(px.shape, np.uint8).fill(7), imgs),
               "copy_into_existing": median_ms(lambda im: np.copyto(dst, px), imgs),
               "pil_chunks_into_existing": median_ms(lambda im: encode_into(im, dst), imgs),
               "sha256_one_thread": median_ms(lambda im: hashlib.sha256(memoryview(px).cast("B")).digest(), imgs),
               "content_key_threads": median_ms(lambda im: content_key(px, 1344, False), imgs),
               "hd_resized": median_ms(lambda im: hd_resized(im, 16), imgs),
               "pad_canvas_new": median_ms(lambda im: pad_canvas(px, 1344), imgs),
               "preprocess_total": median_ms(lambda im: proc.preprocess(im, 16, device="cuda" if cuda else None), imgs),
           }}
    encode_into(imgs[3], dst)
    res["chunks_equal_asarray"] = bool((dst == np.asarray(imgs[3])).all())
    emit(res, a.out)


if __name__ == "__main__":
    main()
