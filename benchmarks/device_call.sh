#!/usr/bin/env bash
# One call on the lent GPU: run the named steps in order, each logged as "=== HH:MM:SS step" with its
# exit code; raw JSON under $OUT ($TAG_step.json), every step's output in one $OUT/$TAG_steps.log.
# A failing step does not stop the others.
#
#   TAG=2026-12-03_s6 bash benchmarks/device_call.sh bench engine_check ...
#
# Steps:
#   reference      Microsoft's recipe (needs carry .ref .wheels; see benchmarks/README.md), --n-offline $REF_N
#   bench          phi3v bench --parts abc (bf16), --compare the reference's JSON when there is one
#   bench_fp8      the same with --kv-cache-dtype fp8
#   bench_c        phi3v bench --parts c only (A/B of offline throughput)
#   bench_c_base   the same from the package copy in $BASE (default .ab_base, carried: an earlier commit's
#                  phi3v/, e.g. `git archive HEAD phi3v | tar -x -C .ab_base`), for an A/B in one call
#   cold_shapes    benchmarks/cold_shapes.py (first-call cost of new shapes; host waits on small copies)
#   ttft_lengths   benchmarks/ttft_lengths.py (16-crop TTFT prompt by prompt, at repeated and new lengths)
#   engine_check   benchmarks/gpu_engine_check.py (greedy tokens equal to the reference generator)
#   smoke          benchmarks/gpu_smoke.py (golden parity on CUDA, GPU preprocessing = CPU's)
#   decode_profile benchmarks/decode_profile.py
#   prefill_profile benchmarks/prefill_profile.py
#   attention      benchmarks/attention_bench.py
#   gemv_m1        benchmarks/gemv_sweep.py --m 1
#   vision         benchmarks/vision_buckets.py
#   timeline       benchmarks/offline_timeline.py (GPU idle time in (c), by host phase)
#   clip_ab        benchmarks/clip_ab.py (fused add + LayerNorm in CLIP against eager, alternating)
# The full-size random checkpoint is written to $M (/tmp/phi3v-full-random) first when missing.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/phi3v-out}
TAG=${TAG:-$(date +%F)}
M=${M:-/tmp/phi3v-full-random}
REF_N=${REF_N:-4}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

bench() { python3 -m phi3v.cli bench --model "$M" "$@"; }
ref_json=${REF_JSON:-$OUT/${TAG}_reference.json}
compare() { [ -f "$ref_json" ] && echo --compare "$ref_json"; }

if [ ! -f "$M/config.json" ]; then
    echo "=== $(date +%T) checkpoint"
    python3 -c "from phi3v.bench import write_random_checkpoint as w
w('tests/data/real-configs/phi-3-vision-128k-instruct', 'tests/data/tiny-phi3v', '$M')"
fi

for step in "$@"; do
    echo "=== $(date +%T) $step"
    log="/tmp/${TAG}_$step.log"  # appended to one $OUT log below: the device returns at most 8 files
    case $step in
        reference)
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/refpkgs \
                .wheels/*.whl && HF_HOME=/tmp/hfref PYTHONPATH=/tmp/refpkgs python3 benchmarks/reference_recipe.py \
                --model "$M" --create --verify-golden --n-offline "$REF_N" --json-out "$ref_json" >"$log" 2>&1 ;;
        bench) bench --parts abc $(compare) --json-out "$OUT/${TAG}_bench.json" >"$log" 2>&1 ;;
        bench_fp8) bench --parts abc --kv-cache-dtype fp8 $(compare) --json-out "$OUT/${TAG}_bench_fp8.json" >"$log" 2>&1 ;;
        bench_c) bench --parts c --json-out "$OUT/${TAG}_bench_c.json" >"$log" 2>&1 ;;
        bench_c_base) (cd "${BASE:-.ab_base}" && python3 -m phi3v.cli bench --model "$M" --parts c) >"$log" 2>&1 ;;
        cold_shapes) python3 benchmarks/cold_shapes.py --folder "$M" --out "$OUT/${TAG}_cold_shapes.json" >"$log" 2>&1 ;;
        ttft_lengths) python3 benchmarks/ttft_lengths.py --folder "$M" --out "$OUT/${TAG}_ttft_lengths.json" >"$log" 2>&1 ;;
        engine_check) python3 benchmarks/gpu_engine_check.py --out "$OUT/${TAG}_engine_check.json" >"$log" 2>&1 ;;
        smoke) python3 benchmarks/gpu_smoke.py --out "$OUT/${TAG}_smoke.json" >"$log" 2>&1 ;;
        decode_profile) python3 benchmarks/decode_profile.py --folder "$M" --out "$OUT/${TAG}_decode_profile.json" >"$log" 2>&1 ;;
        prefill_profile) python3 benchmarks/prefill_profile.py --folder "$M" --out "$OUT/${TAG}_prefill_profile.json" >"$log" 2>&1 ;;
        attention) python3 benchmarks/attention_bench.py --out "$OUT/${TAG}_attention.json" >"$log" 2>&1 ;;
        gemv_m1) timeout 240 python3 benchmarks/gemv_sweep.py --m 1 --json-out "$OUT/${TAG}_gemv_m1.json" >"$log" 2>&1 ;;
        timeline) python3 benchmarks/offline_timeline.py --folder "$M" --out "$OUT/${TAG}_timeline.json" >"$log" 2>&1 ;;
        clip_ab) python3 benchmarks/clip_ab.py --folder "$M" --out "$OUT/${TAG}_clip_ab.json" >"$log" 2>&1 ;;
        vision) python3 benchmarks/vision_buckets.py --folder "$M" --out "$OUT/${TAG}_vision.json" >"$log" 2>&1 ;;
        *) echo "unknown step $step"; false ;;
    esac
    rc=$?
    echo "rc $rc"
    # the headline numbers, so that the call's reply shows them
    grep -hE '"(a_decode_tok_s|b_ttft_ms_[0-9]+crop|c_offline_[0-9]+crop_images_per_s|d_peak_mem_gib|prefill_s|decode_s|all_equal|graph_replay_ms|wall_ms_per_image|unfused_ms|fused_ms|max_abs_diff|[a-z]+_rel_l2_vs_fp32|unprofiled_wall_s|gpu_first_ms|gpu_busy_ms|gpu_end_ms|first|again|profiled_wall_s)"' "$log" | head -40
    [ $rc -eq 0 ] || tail -5 "$log"
    { echo "=== $step rc $rc"; cat "$log"; } >>"$OUT/${TAG}_steps.log"
done
echo "=== $(date +%T) done"
