"""Sockets a client cannot hold: idle, slow-header and stalled-body connections are closed within
their deadline, and connections past the cap get a 503 instead of a queue."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from conftest import RunningServer

READ_TIMEOUT = 1.0  # --http-timeout for this module's worker
MAX_CONNECTIONS = 6
SLACK = 2.0  # a loaded CI machine may fire a timer late
SERVER_ARGS = ("--http-timeout", str(READ_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))


@contextlib.contextmanager
def connect(server: RunningServer) -> Iterator[socket.socket]:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        yield connection


def until_closed(connection: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent before."""
    began, answer = time.monotonic(), b""
    while chunk := connection.recv(65536):
        answer += chunk
    return time.monotonic() - began, answer


def read_response(connection: socket.socket) -> bytes:
    """One whole response with a Content-Length, off a kept-alive connection."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def trickle(connection: socket.socket, data: bytes, every: float) -> Callable[[], None]:
    """Send `data` a byte at a time on a thread; returns a function that stops it."""
    stop = threading.Event()

    def send() -> None:
        for byte in data:
            if stop.wait(every):
                return
            try:
                connection.send(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=send, daemon=True).start()
    return stop.set


def test_an_idle_connection_is_closed_within_the_deadline(module_server: RunningServer):
    with connect(module_server) as connection:
        seconds, answer = until_closed(connection)
    assert answer == b""
    assert READ_TIMEOUT - 0.1 <= seconds < READ_TIMEOUT + SLACK


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_deadline(module_server: RunningServer):
    headers = b"GET /health HTTP/1.1\r\nHost: worker\r\nX-Padding: " + b"x" * 1000 + b"\r\n\r\n"
    with connect(module_server) as connection:
        stop = trickle(connection, headers, every=0.05)  # 50 s for the whole request
        seconds, answer = until_closed(connection)
        stop()
    assert answer == b""
    assert seconds < READ_TIMEOUT + SLACK


def test_a_stalled_body_gets_408_and_the_connection_closes(module_server: RunningServer):
    with connect(module_server) as connection:
        connection.sendall(
            b"POST /execute HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
            b'Content-Length: 200\r\n\r\n{"job_id": "stalled", '
        )
        seconds, answer = until_closed(connection)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(body)["code"] == "REQUEST_TIMEOUT"
    assert seconds < READ_TIMEOUT + SLACK


def test_a_keep_alive_connection_gets_a_new_deadline_after_each_answer(
    module_server: RunningServer,
):
    with connect(module_server) as connection:
        for _ in range(3):  # each request within the deadline, the three together beyond it
            time.sleep(READ_TIMEOUT / 2)
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: worker\r\n\r\n")
            assert read_response(connection).startswith(b"HTTP/1.1 200 ")
        seconds, answer = until_closed(connection)
    assert answer == b"" and seconds < READ_TIMEOUT + SLACK


def test_connections_past_the_cap_get_503_in_the_endpoint_s_shape(module_server: RunningServer):
    with contextlib.ExitStack() as held:
        for _ in range(MAX_CONNECTIONS):
            held.enter_context(connect(module_server))
        for path, shape in (("/health", "code"), ("/v1/models", "error")):
            with connect(module_server) as extra:
                extra.sendall(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
                _, answer = until_closed(extra)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), answer
            assert b"retry-after: " in head.lower()
            error = json.loads(body)
            assert shape in error and "OVERLOADED" in json.dumps(error)
    # the held connections are gone: new ones are served again
    deadline = time.monotonic() + 10
    while (status := httpx.get(module_server.url + "/health").status_code) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
