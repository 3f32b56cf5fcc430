"""Host time to prepare a follow-up question about an image already asked about: the work before the GPU starts,
with the image memo (phi3v/prepare.py: the source recognised by a digest, no decode, resize, crops or copies)
and without it (every request decodes and crops its image again). Runs on the CPU with any checkpoint (the tiny
test one by default): the model only has to encode the image once.

Usage: python benchmarks/followup_host.py [--model DIR] [--crops 16] [--reps 20] [--json OUT]
On a GPU machine pass --device cuda: the crops are then built on the GPU, as a server does.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v import LLM, SamplingParams  # noqa: E402

Q1 = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"
Q2 = "<|user|>\n<|image_1|>\nWhat is in the top left corner?<|end|>\n<|assistant|>\n"


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients plus mild noise: compresses like a photo (pure noise is every codec's worst case)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))


def sources(tmp: Path) -> dict[str, object]:
    img = photo_like(1600, 1200, 0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    path = tmp / "photo.jpg"
    path.write_bytes(buf.getvalue())
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"pil_1600x1200": img, "jpeg_path_1600x1200": str(path), "jpeg_data_uri_1600x1200": uri}


def median_ms(fn, reps: int) -> float:
    fn()
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return 1000 * statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "tests/data/tiny-phi3v"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    llm = LLM(a.model, device=a.device, max_model_len=8192)
    res: dict[str, object] = {"device": a.device, "crops": a.crops, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in sources(Path(tmp)).items():
            llm.generate(Q1, [src], SamplingParams(max_tokens=1), a.crops)  # features cached from here on
            pin = llm.preparer.pin
            assert llm.prepare(Q2, [src], None, a.crops).images[0].crops is None, "expected a memo hit"
            hit = median_ms(lambda: llm.prepare(Q2, [src], None, a.crops), a.reps)
            llm.preparer.pin = None  # the memo off: what every request paid before
            miss = median_ms(lambda: llm.prepare(Q2, [src], None, a.crops), a.reps)
            llm.preparer.pin = pin
            res[name] = {"prepare_ms_memo": round(hit, 2), "prepare_ms_no_memo": round(miss, 2)}
            print(f"{name}: prepare {miss:.2f} ms -> {hit:.2f} ms with the memo")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
