"""A real worker process on the default model, shared by the server tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path  # stderr: narration, one JSON object a line and nothing else
    out_path: Path  # stdout

    def logs(self) -> list[dict]:
        """The narration lines written so far, parsed: every line of stderr must be one."""
        text = self.log_path.read_text()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits
        return [json.loads(line) for line in complete.splitlines()]

    def output(self) -> list[str]:
        """What the worker printed on stdout (a startup failure's line for people)."""
        return self.out_path.read_text().splitlines()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)


def start_server(model: str | Path, log_path: Path, *args: str) -> RunningServer:
    """Start `worker-orcd serve` and wait until it answers /health (or has exited)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "worker_orcd.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    out_path = log_path.with_suffix(".out")
    with log_path.open("w") as log, out_path.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=log)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, out_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    return server  # exited (the caller checks) or too slow (its requests fail)


def serving(server: RunningServer) -> Iterator[RunningServer]:
    """A started worker for a fixture: it must be up, and stop cleanly after (exit 0, the last
    narration line `shutdown_complete`, every stderr line JSON)."""
    assert server.process.poll() is None, server.log_path.read_text()
    yield server
    assert server.stop() == 0
    assert server.logs()[-1]["event"] == "shutdown_complete"


@pytest.fixture(scope="session")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serving(start_server(smollm2_path, tmp_path_factory.mktemp("server") / "worker.log"))


@pytest.fixture(scope="module")
def module_server(
    request: pytest.FixtureRequest, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A worker of the test module's own, started with its `SERVER_ARGS`."""
    log = tmp_path_factory.mktemp(request.module.__name__) / "worker.log"
    yield from serving(start_server(smollm2_path, log, *request.module.SERVER_ARGS))
