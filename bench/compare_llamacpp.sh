#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .device/ carried (see bench/README.md):
# builds llama.cpp's llama-bench and llama-batched-bench in the background, writes the synthetic
# Qwen2.5-0.5B Q4_K_M file, checks our GPU path against the CPU reference and measures our engine
# (single stream, depths, batch sizes), then runs llama.cpp's benches on that one file.
set -euo pipefail
OUT=${OUT:-/tmp/bench-out}
MODEL=/tmp/qwen2.5-0.5b-synth.gguf
DEPTHS=${DEPTHS:-512,2048,8192,16384}
BATCHES=${BATCHES:-1,8,32,128}
mkdir -p "$OUT"
python3 -m pip install --no-deps -q --target /tmp/pydeps .device/gguf-0.19.0-py3-none-any.whl
export PYTHONPATH=$PWD:/tmp/pydeps

bash bench/build_llamacpp.sh llama-bench llama-batched-bench >"$OUT/build.log" 2>&1 &
BUILD=$!

[ -f "$MODEL" ] || python3 -m worker_orcd.cli synth --preset qwen2.5-0.5b --output "$MODEL"
python3 bench/gpu_check.py --out "$OUT" --model "$MODEL" --depths "$DEPTHS" \
  --batch-sizes "$BATCHES" --ctx-size 16640 ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/ours.txt"

wait $BUILD
BIN=/tmp/llama-build/out/bin
$BIN/llama-bench -m "$MODEL" -ngl 99 -fa 1 -r "${REPS:-3}" -p 512 -n 128 -d "0,$DEPTHS" -o json \
  >"$OUT/llama_bench.json" 2>"$OUT/llama_bench.log"
$BIN/llama-bench -m "$MODEL" -ngl 99 -fa 1 -r "${REPS:-3}" -p 2048,8192 -n 0 -o json \
  >"$OUT/llama_bench_pp.json" 2>>"$OUT/llama_bench.log"
$BIN/llama-batched-bench -m "$MODEL" -ngl 99 -c 33792 -b 2048 -ub 512 -npp 128 -ntg 128 \
  -npl "$BATCHES" >"$OUT/llama_batched.txt" 2>"$OUT/llama_batched.log"
python3 bench/compare.py "$OUT"
