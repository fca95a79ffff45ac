#!/usr/bin/env bash
# Builds llama.cpp's TARGETS (default: llama-bench, llama-batched-bench, llama-server) from the
# carried .device/llama.cpp.tar.gz into /tmp/llama-build/out/bin, on the GPU machine. One
# configuration for every target, so that a build started early (in the background of another
# call) leaves the next script nothing to rebuild.
set -euo pipefail
TARGETS=${*:-llama-bench llama-batched-bench llama-server}
mkdir -p /tmp/llama-build
[ -d /tmp/llama-build/llama.cpp ] || tar xzf .device/llama.cpp.tar.gz -C /tmp/llama-build
[ -f /tmp/llama-build/out/CMakeCache.txt ] ||
  cmake -S /tmp/llama-build/llama.cpp -B /tmp/llama-build/out -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_ALL_QUANTS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
# shellcheck disable=SC2086 (one word per target)
cmake --build /tmp/llama-build/out --target $TARGETS -j 12
