#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .device/ and .whl/ carried (see README.md
# here): our server and llama.cpp's llama-server, one after the other on the same synthetic
# Qwen2.5-0.5B Q4_K_M file and the same GPU, under the same load from loadgen.py: CONC
# concurrent streams (default 128) for DURATION seconds (default 60) of the MIX of prompt words
# and output tokens, then, idle, the time to first token with and without a cached 1,000-word
# prefix (prefix_ttft.py). llama-server builds in the background while ours is measured.
set -euo pipefail
OUT=${OUT:-/tmp/http-out}
MODEL=/tmp/qwen2.5-0.5b-synth.gguf
CONC=${CONC:-128}
DURATION=${DURATION:-60}
MIX=${MIX:-16:128,64:128,200:64}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-index -q --target /tmp/pydeps .device/gguf-*.whl .whl/*.whl
export PYTHONPATH=$PWD:/tmp/pydeps

bash bench/build_llamacpp.sh llama-server >"$OUT/build_server.log" 2>&1 &
BUILD=$!

[ -f "$MODEL" ] || python3 -m worker_orcd.cli synth --preset qwen2.5-0.5b --output "$MODEL"

wait_ready() {  # URL PID: until /health answers 200, or the server exits
  until curl -sf "$1/health" >/dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "the server at $1 exited" >&2; return 1; }
    sleep 1
  done
}

load() {  # NAME URL: warm up, then the measured run
  python3 bench/loadgen.py --url "$2" --concurrency "$CONC" --duration 10 --mix "$MIX" >/dev/null
  python3 bench/loadgen.py --url "$2" --concurrency "$CONC" --duration "$DURATION" --mix "$MIX" \
    --json >"$OUT/$1.json"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader >"$OUT/$1.vram"
  python3 bench/prefix_ttft.py --url "$2" --json >"$OUT/$1_prefix.json"
}

python3 -m worker_orcd.cli serve --model "$MODEL" --device cuda --port 8100 --ctx-size 4096 \
  >"$OUT/ours.log" 2>&1 &
OURS=$!
wait_ready http://127.0.0.1:8100 $OURS
load ours http://127.0.0.1:8100
kill -INT $OURS && wait $OURS || true

wait $BUILD
/tmp/llama-build/out/bin/llama-server -m "$MODEL" -ngl 99 -fa on -np "$CONC" \
  -c $((CONC * 4096)) --port 8101 >"$OUT/llama_server.log" 2>&1 &
LLAMA=$!
wait_ready http://127.0.0.1:8101 $LLAMA
load llama_server http://127.0.0.1:8101
kill $LLAMA || true

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {name: json.loads((out / f"{name}.json").read_text()) for name in ("ours", "llama_server")}
for name, r in rows.items():
    print(f"{name:13s} {r['requests']:6d} requests, {r['ok']} ok, {r['failed']} failed: "
          f"{r['output_tokens_per_second']:9,.0f} output tok/s; TTFT p50/p99 "
          f"{r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms; ITL p50/p99 "
          f"{r['itl_ms']['p50']:.1f}/{r['itl_ms']['p99']:.1f} ms; errors {r['errors'][:2]}")
for name in rows:
    p = json.loads((out / f"{name}_prefix.json").read_text())
    print(f"{name:13s} TTFT with a {p['prefix_words']}-word prompt {p['ttft_ms_first']:.1f} ms, "
          f"with its prefix cached {p['ttft_ms_second']:.1f} ms ({p['ratio']:.1f}x)")
ratio = rows["ours"]["output_tokens_per_second"] / rows["llama_server"]["output_tokens_per_second"]
print(f"output tok/s, ours / llama-server: {ratio:.2f}")
PY
