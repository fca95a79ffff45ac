"""Own worker processes: startup failures (M0-W-1111), SIGTERM drain and the ready callback."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sse_client import StreamReader, check_protocol, counting, new_job_id

if TYPE_CHECKING:
    from conftest import RunningServer

    StartServer = Callable[..., RunningServer]

EXIT_SECONDS = 60  # generous: loading alone takes a few seconds on this CPU


@pytest.fixture(scope="module")
def start_server(pytestconfig: pytest.Config) -> StartServer:
    """This directory's conftest `start_server`, found by path: `from conftest import` gets
    whichever conftest.py pytest loaded last (tests/tokenizer's, say)."""
    conftest = pytestconfig.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    assert conftest is not None
    return conftest.start_server


def bad_magic(tmp_path: Path, _model: Path) -> Path:
    path = tmp_path / "bad-magic.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    return path


def truncated(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    with model.open("rb") as source:
        path.write_bytes(source.read(100_000))  # inside the tokenizer metadata
    return path


def missing(tmp_path: Path, _model: Path) -> Path:
    return tmp_path / "absent.gguf"


def failed_startup(server: RunningServer) -> tuple[int, list[str]]:
    """The exit code and the lines printed for people (stdout); stderr holds narration only,
    ending with the failure's `error` event."""
    code = server.process.wait(EXIT_SECONDS)
    assert server.logs()[-1]["event"] == "error"
    return code, server.output()


@pytest.mark.parametrize("make_model", [bad_magic, truncated, missing])
def test_a_bad_model_file_exits_1_with_one_clear_line(
    start_server: StartServer,
    tmp_path: Path,
    smollm2_path: Path,
    make_model: Callable[[Path, Path], Path],
):
    model = make_model(tmp_path, smollm2_path)
    began = time.monotonic()
    code, lines = failed_startup(start_server(model, tmp_path / "worker.log"))
    print(f"\n{make_model.__name__}: exit {code} after {time.monotonic() - began:.1f} s")
    assert code == 1
    assert len(lines) == 1, lines  # no traceback, nothing else
    assert "Model load failed" in lines[0] and "MODEL_LOAD_FAILED" in lines[0]
    assert str(model) in lines[0]


def test_an_unsupported_architecture_exits_1(
    start_server: StartServer, tmp_path: Path, gemma_path: Path
):
    code, lines = failed_startup(start_server(gemma_path, tmp_path / "worker.log"))
    assert code == 1
    assert len(lines) == 1 and "Unsupported architecture: gemma3" in lines[0], lines


def test_a_port_in_use_exits_1_before_the_model_loads(
    start_server: StartServer, tmp_path: Path, smollm2_path: Path
):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        server = start_server(smollm2_path, tmp_path / "worker.log", "--port", port)
        code, lines = failed_startup(server)
    assert code == 1
    assert len(lines) == 1 and port in lines[0] and "in use" in lines[0], lines
    events = [record["event"] for record in server.logs()]
    assert events == ["startup", "error"]  # no model load began
    assert server.logs()[-1]["code"] == "BIND_FAILED"


class Callbacks(HTTPServer):
    """Records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.received = threading.Event()
        super().__init__(("127.0.0.1", 0), CallbackHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v2/internal/workers/ready"


class CallbackHandler(BaseHTTPRequestHandler):
    server: Callbacks

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.server.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()
        self.server.received.set()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def callbacks() -> Iterator[Callbacks]:
    receiver = Callbacks()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.shutdown()
    receiver.server_close()


def draining(url: str, timeout: float = 10) -> httpx.Response:
    """The answer to a new job once the worker has begun to drain (it keeps its socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health", timeout=5).json()["status"] == "draining":
            return httpx.post(f"{url}/execute", json=counting(new_job_id("late")), timeout=5)
        time.sleep(0.05)
    raise AssertionError(f"not draining within {timeout} s")


def check_refused_while_draining(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {
        "code": "SHUTTING_DOWN",
        "message": "the worker is shutting down",
        "retriable": True,
    }
    assert int(response.headers["retry-after"]) > 0


def test_ready_callback_then_sigterm_drains_and_exits_0(
    start_server: StartServer, tmp_path: Path, smollm2_path: Path, callbacks: Callbacks
):
    worker_id = str(uuid.uuid4())
    server = start_server(
        smollm2_path,
        tmp_path / "worker.log",
        "--worker-id",
        worker_id,
        "--callback-url",
        callbacks.url,
        "--shutdown-timeout",
        "120",  # the running job is let finish
    )
    try:
        assert callbacks.received.wait(30), "no ready callback"
        assert callbacks.bodies == [
            {
                "worker_id": worker_id,
                "model_ref": str(smollm2_path),
                "vram_bytes": 0,
                "uri": server.url,
            }
        ]
        running = StreamReader(server.url, counting(new_job_id("running"), max_tokens=40))
        running.start()
        running.wait_for("token")
        queued = StreamReader(server.url, counting(new_job_id("queued"), max_tokens=4))
        queued.start()
        assert queued.responded.wait(30)
        server.process.send_signal(signal.SIGTERM)

        check_refused_while_draining(draining(server.url))
        queued_stream = queued.result(timeout=10)
        assert queued_stream.events == ["error"]  # it never started
        assert queued_stream.terminal.data == {
            "type": "error",
            "code": "SHUTTING_DOWN",
            "message": "the worker is shutting down",
            "retriable": True,
        }
        running_stream = running.result(timeout=EXIT_SECONDS)
        check_protocol(running_stream)
        assert running_stream.terminal.event == "end"  # the running job was let finish
        assert running_stream.terminal.data["tokens_out"] == 40
        assert server.process.wait(EXIT_SECONDS) == 0
    finally:
        server.stop()
    events = [line["event"] for line in server.logs()]
    assert events.index("ready") < events.index("ready_callback") < events.index("shutdown")
    assert events[-1] == "shutdown_complete"


@pytest.mark.parametrize("how", ["SIGTERM", "POST /shutdown"])
def test_a_job_past_the_shutdown_deadline_still_gets_its_one_terminal_event(
    start_server: StartServer, tmp_path: Path, smollm2_path: Path, how: str
):
    deadline = 1.0
    server = start_server(
        smollm2_path, tmp_path / "worker.log", "--shutdown-timeout", str(deadline)
    )
    try:
        running = StreamReader(server.url, counting(new_job_id("endless")))
        running.start()
        running.wait_for("token")
        began = time.monotonic()
        if how == "SIGTERM":
            server.process.send_signal(signal.SIGTERM)
        else:
            answer = httpx.post(f"{server.url}/shutdown", timeout=10)
            assert (answer.status_code, answer.json()) == (202, {"status": "draining"})
        check_refused_while_draining(draining(server.url))
        stream = running.result(timeout=EXIT_SECONDS)
        ended = time.monotonic() - began
        assert server.process.wait(EXIT_SECONDS) == 0
    finally:
        server.stop()
    check_protocol(stream)
    assert stream.events.count("error") == 1 and stream.terminal.event == "error"
    assert stream.terminal.data == {
        "type": "error",
        "code": "SHUTTING_DOWN",
        "message": "the worker shut down before the job finished",
        "retriable": True,
    }
    print(f"\n{how}: the job ended {ended:.2f} s after the drain began (deadline {deadline} s)")
    assert ended >= deadline
    lines = server.logs()  # every stderr line parses as JSON
    shutdown = next(line for line in lines if line["event"] == "shutdown")
    assert shutdown["cause"] == how and shutdown["timeout_seconds"] == deadline
    assert lines[-1] == {**lines[-1], "event": "shutdown_complete", "exit_code": 0}
