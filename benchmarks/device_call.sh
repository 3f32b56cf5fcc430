#!/usr/bin/env bash
# One call on the lent GPU: run the named steps in order, each logged as "=== HH:MM:SS step" with its
# exit code; raw JSON under $OUT ($TAG_step.json), every step's output in one $OUT/$TAG_steps.log.
# A failing step does not stop the others.
#
#   TAG=2026-12-05_a bash benchmarks/device_call.sh gpu_tests bench bench_fp8 ...
#
# Steps:
#   reference      Microsoft's recipe (needs carry .ref .wheels; see benchmarks/README.md), --n-offline $REF_N
#   bench          phi3v bench --parts abc (bf16), --compare the reference's JSON when there is one
#   bench_fp8      the same with --kv-cache-dtype fp8
#   bench_c        phi3v bench --parts c only (A/B of offline throughput)
#   bench_abce     phi3v bench --parts abce (bf16)
#   bench_e        phi3v bench --parts e only (a follow-up question and a second chat turn: prefix-cache hits)
#   followup_host  benchmarks/followup_host.py --device cuda (preparing a repeat image with / without the image memo)
#   server_g       benchmarks/server_concurrency.py: (g) 200 streaming requests without max_tokens against phi3v serve
#   bench_fp8w, bench_int4w, bench_fp8w_kv8
#                  phi3v bench --parts abc with --quantization fp8 / int4 / fp8 and --kv-cache-dtype fp8 (issue 20)
#   quant_check    benchmarks/quant_check.py: bf16 / fp8 / fp8_dot / int4 / int4_dot error, kernels vs torch, decode
#                  tok/s, GEMM TFLOP/s, memory (exits 1 when a quantized kernel disagrees with its torch math);
#                  _dot: the decode GEMVs on tensor cores (QuantSpec.decode_dot; fp8_dot is W8A8)
#   quant_sweep    benchmarks/quant_sweep.py: tuning of the FP8 / int4 GEMV and the int4 GEMM per Phi-3 shape
#                  (CUDA-core and tensor-core GEMVs side by side: best_by_kernel per shape)
#   quant_sweep_dot  the tensor-core GEMVs only, 1 and 4 rows, every shape with lm_head (shorter)
#   gemv_compile   benchmarks/gemv_compile.py --sweep-lists: the swept tensor-core configs' registers, spills,
#                  wgmma and SASS instructions per weight byte with the GPU machine's Triton (no GPU time)
#   gemv_dot_check tests/gpu/test_gpu_gemv_dot.py: every swept tensor-core GEMV config against torch on the GPU
#   lora           benchmarks/lora_bench.py: decode tok/s and offline throughput of base / merged / 1 / 4 per-request
#                  LoRA adapters (issue 23; cost_vs_base per mode; $LORA_MODES, rank $LORA_RANK, default 16)
#   lora_base      the same from the copy in $BASE (default .ab_base, carried), e.g. the kernels before the shrink
#                  moved into the GEMV: `git archive 1e9cb5f phi3v benchmarks/lora_bench.py | tar -x -C .ab_base`
#   bench_c_base   the same from the package copy in $BASE (default .ab_base, carried: an earlier commit's
#                  phi3v/, e.g. `git archive HEAD phi3v | tar -x -C .ab_base`), for an A/B in one call
#   bench_parts, bench_parts_base
#                  phi3v bench --parts $PARTS (default b) from this tree and from $BASE: an A/B of any part
#   gpu_tests      python -m pytest -m gpu tests/gpu (golden parity on CUDA, the engine against the reference
#                  generator, the fp8 KV kernels), then tests/test_engine_cache.py on CUDA (prefix-cache hits,
#                  preemption, the LongRoPE crossing, chunked long prompts, against the reference generator)
#   profile_decode | profile_prefill | profile_ttft | profile_offline | profile_followup
#                  benchmarks/profiler.py MODE (where the time of (a) / a (c) prefill step / (b) / (c) goes)
#   profile_decode_lora  profiler.py decode with a per-request adapter of rank $LORA_RANK (kernels_per_step)
#   long_prefill_tma  issue 17 (f): tests/gpu/test_prefill_tma_check.py (the TMA variant of the paged prefill kernel
#                  against the pointer kernel, every SWEEP_TMA config), then benchmarks/long_prefill.py --tma at 35k /
#                  107k tokens in 16,384-token chunks (the default config beside SWEEP_TMA, one layer; without the
#                  Gluon configs when the check failed), then `bench --parts f --max-model-len 110000` with the
#                  sweep's best config (PHI3V_PREFILL_ATTN_CONFIG)
#   attention_backends  benchmarks/attention_backends.py (long-prompt prefill attention: Triton vs SDPA backends)
#   attention      benchmarks/attention_sweep.py (bf16; attention_fp8: --kv-dtype fp8), a tuning sweep
#   gemv_m1        benchmarks/gemv_sweep.py --m 1 (the GEMV table's tuning sweep at batch 1)
#   batch_job      benchmarks/batch_job.py (phi3v batch end to end, 64 images, 16 crops)
#   batch_folder   benchmarks/batch_folder.py (a folder of 500 PNGs, 4 and 16 crops, single-process and --ray local)
#   json           benchmarks/json_overhead.py (decode with and without a JSON schema)
#   peer, peer_fp8 benchmarks/vllm_peer_bench.py (vLLM with PYTHONPATH=$VLLM_SITE, default /tmp/vllm_site, installed as
#                  benchmarks/README.md says; carry .ref: the model folder $PEER_M is made from $M and .ref/)
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
PEER_M=${PEER_M:-$M-vllm}
peer() {  # $1: JSON name, $2: extra vLLM engine arguments as JSON
    if [ ! -f "$PEER_M/config.json" ]; then  # the checkpoint's files plus the processor's remote code
        mkdir -p "$PEER_M" && ln -sf "$M"/* "$PEER_M"/ && \
            cp .ref/remote_code/{configuration,processing,image_processing}_phi3_v.py "$PEER_M"/ || return 1
    fi
    VLLM_KW="$2" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        DO_NOT_TRACK=1 PYTHONPATH="${VLLM_SITE:-/tmp/vllm_site}" python3 benchmarks/vllm_peer_bench.py "$PEER_M" "$OUT/${TAG}_$1.json"
}

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
        bench_abce) bench --parts abce --json-out "$OUT/${TAG}_bench_abce.json" >"$log" 2>&1 ;;
        bench_e) bench --parts e --json-out "$OUT/${TAG}_bench_e.json" >"$log" 2>&1 ;;
        server_g) python3 benchmarks/server_concurrency.py --model "$M" --device cuda --n 200 --image \
            --json "$OUT/${TAG}_server_g.json" >"$log" 2>&1 ;;
        followup_host) python3 benchmarks/followup_host.py --model "$M" --device cuda \
            --json "$OUT/${TAG}_followup_host.json" >"$log" 2>&1 ;;
        bench_c) bench --parts c --json-out "$OUT/${TAG}_bench_c.json" >"$log" 2>&1 ;;
        bench_fp8w|bench_int4w) bench --parts abc --quantization "${step#bench_}" --json-out "$OUT/${TAG}_$step.json" \
            >"$log" 2>&1 ;;
        bench_fp8w_kv8) bench --parts abc --quantization fp8 --kv-cache-dtype fp8 --json-out "$OUT/${TAG}_$step.json" \
            >"$log" 2>&1 ;;
        quant_check) python3 benchmarks/quant_check.py --model "$M" --out "$OUT/${TAG}_quant_check.json" >"$log" 2>&1 ;;
        quant_sweep) python3 benchmarks/quant_sweep.py --out "$OUT/${TAG}_quant_sweep.json" >"$log" 2>&1 ;;
        lora) python3 benchmarks/lora_bench.py --model "$M" --modes "${LORA_MODES:-base,merged,lora1,lora4,base}" \
            --rank "${LORA_RANK:-16}" --json-out "$OUT/${TAG}_lora.json" >"$log" 2>&1 ;;
        lora_base) (cd "${BASE:-.ab_base}" && python3 benchmarks/lora_bench.py --model "$M" \
            --modes "${LORA_MODES:-base,merged,lora1,lora4,base}" --rank "${LORA_RANK:-16}" \
            --json-out "$OUT/${TAG}_lora_base.json") >"$log" 2>&1 ;;
        quant_sweep_dot) python3 benchmarks/quant_sweep.py --only-dot --rows 1,4 --shapes qkv,o,gate_up,down,lm_head \
            --out "$OUT/${TAG}_quant_sweep_dot.json" >"$log" 2>&1 ;;
        gemv_compile) python3 benchmarks/gemv_compile.py --sweep-lists >"$log" 2>&1 ;;
        gemv_dot_check) python3 -m pytest -p no:cacheprovider -m gpu -q -s tests/gpu/test_gpu_gemv_dot.py >"$log" 2>&1 ;;
        bench_c_base) (cd "${BASE:-.ab_base}" && python3 -m phi3v.cli bench --model "$M" --parts c) >"$log" 2>&1 ;;
        bench_parts) bench --parts "${PARTS:-b}" --json-out "$OUT/${TAG}_bench_parts.json" >"$log" 2>&1 ;;
        bench_parts_base) (cd "${BASE:-.ab_base}" && python3 -m phi3v.cli bench --model "$M" --parts "${PARTS:-b}") \
            >"$log" 2>&1 ;;
        gpu_tests) { PHI3V_GPU_OUT=/tmp/gpu_out timeout 420 python3 -m pytest -p no:cacheprovider -m gpu -q tests/gpu \
                         --ignore=tests/gpu/test_prefill_tma_check.py; r1=$?  # (its own step, long_prefill_tma)
                     PHI3V_TEST_DEVICE=cuda python3 -m pytest -p no:cacheprovider -q tests/test_engine_cache.py \
                         tests/test_prepare_memo.py; r2=$?
                     [ $r1 -eq 0 ] && [ $r2 -eq 0 ]; } >"$log" 2>&1 ;;
        profile_decode_lora) python3 benchmarks/profiler.py decode --folder "$M" --lora-rank "${LORA_RANK:-16}" \
            --out "$OUT/${TAG}_$step.json" >"$log" 2>&1 ;;
        profile_decode|profile_prefill|profile_ttft|profile_offline|profile_followup)
            python3 benchmarks/profiler.py "${step#profile_}" --folder "$M" --out "$OUT/${TAG}_$step.json" >"$log" 2>&1 ;;
        long_prefill_tma) { chk="/tmp/${TAG}_tma_check.txt"
            timeout 300 python3 -m pytest -p no:cacheprovider -m gpu -q -rA tests/gpu/test_prefill_tma_check.py \
                | tee "$chk"; r1=${PIPESTATUS[0]}
            j="$OUT/${TAG}_long_prefill_tma.json"
            skip=""  # a Gluon config that failed its check, or a hung check, keeps Gluon out of the timing
            { [ $r1 -eq 124 ] || grep -q "FAILED.*gluon" "$chk"; } && skip="--skip-variant gluon"
            timeout 300 python3 benchmarks/long_prefill.py --tma $skip --chunks 16384 --out "$j"; r2=$?
            best=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("best_config", ""))' "$j")
            echo "best config: $best"
            [ -n "$best" ] && PHI3V_PREFILL_ATTN_CONFIG="bf16=$best" bench --parts f --max-model-len 110000 \
                --json-out "$OUT/${TAG}_bench_f_tma.json"; r3=$?
            [ $r1 -eq 0 ] && [ $r2 -eq 0 ] && [ $r3 -eq 0 ]; } >"$log" 2>&1 ;;
        attention) python3 benchmarks/attention_sweep.py --out "$OUT/${TAG}_attention.json" >"$log" 2>&1 ;;
        attention_backends) python3 benchmarks/attention_backends.py --out "$OUT/${TAG}_attention_backends.json" >"$log" 2>&1 ;;
        attention_fp8) python3 benchmarks/attention_sweep.py --kv-dtype fp8 --out "$OUT/${TAG}_attention_fp8.json" >"$log" 2>&1 ;;
        gemv_m1) timeout 240 python3 benchmarks/gemv_sweep.py --m 1 --json-out "$OUT/${TAG}_gemv_m1.json" >"$log" 2>&1 ;;
        batch_job) python3 benchmarks/batch_job.py --model "$M" --out "$OUT/${TAG}_batch_job.json" >"$log" 2>&1 ;;
        batch_folder) python3 benchmarks/batch_folder.py --model "$M" --out "$OUT/${TAG}_batch_folder.json" >"$log" 2>&1 ;;
        json) python3 benchmarks/json_overhead.py --model "$M" --out "$OUT/${TAG}_json.json" >"$log" 2>&1 ;;
        peer) peer peer '{}' >"$log" 2>&1 ;;
        peer_fp8) peer peer_fp8 '{"quantization": "fp8", "kv_cache_dtype": "fp8"}' >"$log" 2>&1 ;;
        *) echo "unknown step $step"; false ;;
    esac
    rc=$?
    echo "rc $rc"
    # the headline numbers, so that the call's reply shows them
    grep -hE '"(e_[a-z_]+|a_decode_tok_s|b_ttft_ms_[0-9]+crop|c_offline_[0-9]+crop_images_per_s|d_peak_mem_gib|prefill_s|decode_s|engine_step_ms|wall_ms_per_image|wall_ms_median|unprofiled_wall_s|gpu_first_ms|gpu_busy_ms|gpu_end_ms|profiled_wall_s|images_per_s_incl_load)"|passed|failed' "$log" | head -40
    [ $rc -eq 0 ] || tail -5 "$log"
    { echo "=== $step rc $rc"; cat "$log"; } >>"$OUT/${TAG}_steps.log"
done
echo "=== $(date +%T) done"
