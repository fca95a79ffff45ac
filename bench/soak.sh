#!/usr/bin/env bash
# A soak of our server (on the GPU machine, or anywhere with DEVICE=cpu): CONC concurrent streams
# (default 128) for DURATION seconds (default 540: one device call holds at most 10 minutes) of
# mixed lengths, with a CANCEL_FRACTION of clients hanging up partway (default 0.1), while the
# GPU's used memory is sampled every 30 s. It ends by checking that every request ended with its
# terminal event (loadgen counts lost ones as failed), that the worker is idle with its KV cache
# free, and that it shuts down cleanly. Carries .device and .whl on the device (bench/README.md).
set -euo pipefail
OUT=${OUT:-/tmp/soak-out}
MODEL=${MODEL:-/tmp/qwen2.5-0.5b-synth.gguf}
CONC=${CONC:-128}
DURATION=${DURATION:-540}
CANCEL_FRACTION=${CANCEL_FRACTION:-0.1}
DEVICE=${DEVICE:-cuda}
MIX=${MIX:-16:128,64:256,200:64,400:32}
PORT=${PORT:-8102}
mkdir -p "$OUT"
if ! python3 -c "import fastapi, gguf" 2>/dev/null; then  # the device: the carried wheels
  python3 -m pip install --no-deps --no-index -q --target /tmp/pydeps .device/gguf-*.whl .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/pydeps
fi
[ -f "$MODEL" ] || python3 -m worker_orcd.cli synth --preset qwen2.5-0.5b --output "$MODEL"

python3 -m worker_orcd.cli serve --model "$MODEL" --device "$DEVICE" --port "$PORT" \
  --ctx-size 4096 >"$OUT/worker.out" 2>"$OUT/worker.log" &
WORKER=$!
URL=http://127.0.0.1:$PORT
until curl -sf "$URL/health" >/dev/null; do
  kill -0 $WORKER 2>/dev/null || { echo "the worker exited" >&2; exit 1; }
  sleep 1
done
vram() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null || echo 0; }
( while kill -0 $WORKER 2>/dev/null; do echo "$(date +%s) $(vram)"; sleep 30; done ) \
  >"$OUT/vram.txt" &
python3 bench/loadgen.py --url "$URL" --concurrency "$CONC" --duration "$DURATION" --mix "$MIX" \
  --cancel-fraction "$CANCEL_FRACTION" --json >"$OUT/soak.json"
sleep 2  # cancels reach the engine within a step
curl -s "$URL/health" >"$OUT/health.json"
kill -TERM $WORKER
wait $WORKER && echo 0 >"$OUT/exit_code" || echo $? >"$OUT/exit_code"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "soak.json").read_text())
health = json.loads((out / "health.json").read_text())
vram = [int(line.split()[1]) for line in (out / "vram.txt").read_text().split("\n") if line]
print(f"{report['requests']} requests in {report['seconds']:.0f} s at concurrency "
      f"{report['concurrency']}: {report['ok']} ok, {report['cancelled']} cancelled, "
      f"{report['failed']} failed (lost or errored); {report['output_tokens_per_second']:,.0f} "
      f"output tok/s; errors {report['errors'][:3]}")
print(f"after: running {health['running']}, waiting {health['waiting']}, KV cache usage "
      f"{health['kv_cache_usage']}; GPU memory used (MiB) first/last/max "
      f"{vram[0] if vram else '-'}/{vram[-1] if vram else '-'}/{max(vram) if vram else '-'}; "
      f"worker exit code {(out / 'exit_code').read_text().strip()}")
PY
