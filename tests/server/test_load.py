"""Load: 64 concurrent streams for two minutes through `bench/loadgen.py`, a tenth of them
hanging up partway. Every request that stays must end with its finish_reason and [DONE], none
may fail, and afterwards the worker is idle with its KV cache free."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from conftest import RunningServer

SERVER_ARGS = ("--max-num-seqs", "64")
LOADGEN = Path(__file__).parents[2] / "bench" / "loadgen.py"


def test_64_streams_for_two_minutes_lose_nothing(module_server: RunningServer):
    command = [
        sys.executable,
        str(LOADGEN),
        "--url",
        module_server.url,
        "--concurrency",
        "64",
        "--duration",
        "120",
        "--mix",
        "4:8,24:16,80:24",
        "--cancel-fraction",
        "0.1",
        "--json",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["failed"] == 0, report["errors"]
    assert report["ok"] + report["cancelled"] == report["requests"] >= 64
    assert report["ok"] > report["cancelled"] > 0
    # the hung-up streams' cancels land within a step; then nothing runs or waits
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(module_server.url + "/health", timeout=10).json()
        if health["running"] == health["waiting"] == 0 and health["kv_cache_usage"] == 0:
            break
        time.sleep(0.5)
    assert health["running"] == health["waiting"] == 0
    assert health["kv_cache_usage"] == 0.0
