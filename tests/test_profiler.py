"""benchmarks/profiler.py on the tiny checkpoint (CPU), in a subprocess because it wraps engine methods in profiler
labels for the life of the process: each mode runs, and every host phase it labels still exists in the engine (a
renamed method shows up in `phases_missing`; PHASES in the script must follow it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CKPT = str(ROOT / "tests" / "data" / "tiny-phi3v")


def profile(mode: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profiler.py"), mode, "--folder", CKPT,
                        "--device", "cpu", "--out", str(out), *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode, args", [("ttft", ("--crops", "1", "--reps", "2")),
                                        ("offline", ("--crops", "1", "--n", "2", "--tokens", "2"))])
def test_profiler_mode_runs_and_labels_every_phase(mode: str, args: tuple[str, ...], tmp_path: Path) -> None:
    res = profile(mode, tmp_path, *args)
    assert res["mode"] == mode and res["phases_missing"] == []
    part = res["nc1"]
    timeline = part["profiled"] if mode == "ttft" else part
    assert timeline["host_wall_ms"] > 0  # the labelled phases were recorded
    if mode == "ttft":
        assert part["prompt_tokens"] > 0 and part["decoder_prefill_eager_ms"] > 0
    else:
        assert part["profiled_wall_s"] > 0 and part["second_run"]["unprofiled_wall_s"] > 0
