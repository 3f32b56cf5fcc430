"""A user's folder through `phi3v batch`, single-process and on Ray Data (issue 19): N noise images of the bench's
mixed sizes written to disk as PNG files first (not timed), then read back as a folder would be, `--prompt` for all,
200 tokens each (eos ignored), at 4 and 16 crops. Reports images/s of each run (wall time with start-up, and the
summary line's rate after the first record, which leaves out model load, warm-up and Ray's actor start), to compare
with `phi3v bench`'s (c) (c_offline_{4,16}crop_images_per_s): the target is the single-process batch <= 5 % under (c)
and the Ray path <= 5 % under the single-process one.

Usage (on the GPU machine; JSON to $OUT/batch_folder.json or --out):
    python benchmarks/batch_folder.py --model /tmp/phi3v-full-random [--n 500] [--crops 4 16] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v.bench import MIXED_SIZES, emit, noise_image  # noqa: E402

QUESTION = "Describe the image in detail."  # wrapped as phi3v.bench.PROMPT is: the same prompt tokens as (c)


def write_folder(folder: str, n: int) -> None:
    for i in range(n):  # two levels, as photo folders are; mixed sizes as (c)'s
        sub = os.path.join(folder, f"part{i % 4}")
        os.makedirs(sub, exist_ok=True)
        noise_image(*MIXED_SIZES[i % len(MIXED_SIZES)], 1000 + i).save(os.path.join(sub, f"{i:05d}.png"))


def run(a: argparse.Namespace, folder: str, nc: int, ray: bool, tmp: str) -> dict:
    out = os.path.join(tmp, f"out_{nc}_{'ray' if ray else 'single'}.jsonl")
    cmd = [sys.executable, "-m", "phi3v.cli", "batch", "--model", a.model, "--input", folder, "--prompt", QUESTION,
           "--output", out, "--num-crops", str(nc), "--max-tokens", str(a.max_tokens), "--ignore-eos", "--quiet",
           "--batch-size", str(a.batch_size)]
    if ray:
        cmd += ["--ray", "local"] + (["--num-replicas", str(a.num_replicas)] if a.num_replicas else [])
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = [ln for ln in r.stderr.splitlines() if ln.startswith("phi3v batch:")]
    recs = [json.loads(x) for x in open(out, encoding="utf-8")] if os.path.exists(out) else []
    ok = [x for x in recs if "text" in x]
    m = re.search(r"in ([\d.]+)s: ([\d.]+) images/s.*?\(([\d.]+) records/s after the first\)", summary[-1]) \
        if summary else None
    return {"returncode": r.returncode, "records": len(recs), "errors": len(recs) - len(ok),
            "completion_tokens": sum(x["usage"]["completion_tokens"] for x in ok),
            "wall_s_incl_start": wall, "images_per_s_incl_start": len(ok) / wall,
            "job_s": float(m.group(1)) if m else None, "images_per_s": float(m.group(2)) if m else None,
            "images_per_s_after_first": float(m.group(3)) if m else None,
            "summary": summary[-1:] or r.stderr.strip().splitlines()[-3:], "command": " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--crops", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-replicas", type=int, default=None, help="Ray engines (default: one per GPU)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "batch_folder.json"))
    a = ap.parse_args()
    res: dict = {"n": a.n, "max_tokens": a.max_tokens, "batch_size": a.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        t = time.perf_counter()
        write_folder(folder, a.n)
        res["write_folder_s"] = time.perf_counter() - t
        for nc in a.crops:
            for ray in (False, True):
                res[f"{nc}crop_{'ray' if ray else 'single'}"] = run(a, folder, nc, ray, tmp)
                print(json.dumps({k: v for k, v in res.items() if k.startswith(f"{nc}crop")}), flush=True)
    emit(res, a.out)


if __name__ == "__main__":
    main()
