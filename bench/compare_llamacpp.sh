#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .device/ carried (see bench/README.md):
# builds llama.cpp's llama-bench, writes the synthetic Qwen2.5-0.5B Q4_K_M file, checks our GPU
# path against the CPU reference, then benchmarks both engines on that one file in one run.
set -euo pipefail
OUT=${OUT:-/tmp/bench-out}
MODEL=/tmp/qwen2.5-0.5b-synth.gguf
mkdir -p "$OUT" /tmp/llama-build
python3 -m pip install --no-deps -q --target /tmp/pydeps .device/gguf-0.19.0-py3-none-any.whl
export PYTHONPATH=$PWD:/tmp/pydeps

tar xzf .device/llama.cpp.tar.gz -C /tmp/llama-build
cmake -S /tmp/llama-build/llama.cpp -B /tmp/llama-build/out -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_ALL_QUANTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_CURL=OFF >"$OUT/cmake.log" 2>&1
cmake --build /tmp/llama-build/out --target llama-bench -j "$(nproc)" >"$OUT/build.log" 2>&1

python3 -m worker_orcd.cli synth --preset qwen2.5-0.5b --output "$MODEL"
python3 bench/gpu_check.py --out "$OUT" --model "$MODEL" ${GPU_CHECK_ARGS:-} | tee "$OUT/ours.txt"
/tmp/llama-build/out/bin/llama-bench -m "$MODEL" -ngl 99 -p 512 -n 128 -fa 1 -o json \
  >"$OUT/llama_bench.json" 2>"$OUT/llama_bench.log"
python3 bench/compare.py "$OUT/gpu_check.json" "$OUT/llama_bench.json"
