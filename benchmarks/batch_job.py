"""The main job end to end: `phi3v batch` over N noise images of the bench's mixed sizes written as PNG
files (decode, preparation, generation and writing the JSONL all included), for a checkpoint folder.

Usage: python benchmarks/batch_job.py --model /tmp/phi3v-full-random [--n 64] [--num-crops 16] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v.bench import MIXED_SIZES, emit, noise_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--num-crops", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "in.jsonl"), "w", encoding="utf-8") as f:
            for i in range(a.n):
                noise_image(*MIXED_SIZES[i % len(MIXED_SIZES)], 3000 + i).save(os.path.join(tmp, f"{i}.png"))
                f.write(json.dumps({"id": str(i), "prompt": "Describe the image in detail.", "images": [f"{i}.png"],
                                    "num_crops": a.num_crops, "max_tokens": a.max_tokens, "ignore_eos": True}) + "\n")
        cmd = [sys.executable, "-m", "phi3v.cli", "batch", "--model", a.model, "--input", os.path.join(tmp, "in.jsonl"),
               "--output", os.path.join(tmp, "out.jsonl"), "--image-dir", tmp]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(r.stderr[-2000:])
        recs = [json.loads(x) for x in open(os.path.join(tmp, "out.jsonl"), encoding="utf-8")]
    ok = [x for x in recs if "text" in x]
    emit({"n": a.n, "num_crops": a.num_crops, "wall_s_incl_load": dt, "images_per_s_incl_load": len(ok) / dt,
          "completion_tokens": sum(x["usage"]["completion_tokens"] for x in ok), "errors": len(recs) - len(ok),
          "stderr_tail": r.stderr.strip().splitlines()[-1:], "command": " ".join(cmd[1:])}, a.out)


if __name__ == "__main__":
    main()
