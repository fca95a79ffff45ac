"""`worker-orcd serve`: startup in the spec's order (M0-W-1110), then HTTP until a signal.

1. the device (CUDA init failed -> exit 1), 2. the model (load failed -> exit 1, one line naming
the code, the file and the reason), 3. the HTTP socket, 4. ready (log and optional callback).
SIGTERM/SIGINT: new jobs are refused, queued ones end with `error` CANCELLED, the running one
finishes with its terminal event, then the process exits 0.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import uvicorn
from gguf import GGMLQuantizationType, LlamaFileType
from sse_starlette.sse import AppStatus

from worker_orcd import model_store
from worker_orcd.engine.engine import Engine, Event, Failed, Finished, Job, Started
from worker_orcd.engine.llm import DEFAULT_MAX_CONTEXT, LLM, resolve_device
from worker_orcd.engine.memory import InsufficientVram, resident, vram_bytes_used
from worker_orcd.gguf.reader import GGUFError, GGUFFile
from worker_orcd.models import UnsupportedArchitectureError
from worker_orcd.server.app import Worker, create_app
from worker_orcd.server.narration import Narrator
from worker_orcd.tokenizer import TokenizerError

GRACEFUL_SHUTDOWN_SECONDS = 30
LOAD_ERRORS = (
    GGUFError,
    UnsupportedArchitectureError,
    model_store.ModelStoreError,
    TokenizerError,
    OSError,
    ValueError,
)


@dataclass(frozen=True)
class ServeOptions:
    worker_id: str
    model: str
    gpu_device: int
    port: int
    host: str = "127.0.0.1"
    device: str = "auto"
    callback_url: str | None = None
    ctx_size: int = DEFAULT_MAX_CONTEXT
    residency_interval: float = 60.0  # seconds between residency checks (M0-W-1012)


def quant_kind(gguf: GGUFFile) -> str:
    """The file's quantization as users name it (Q4_K_M, Q4_1, ...), from general.file_type."""
    file_type = gguf.metadata.get("general.file_type")
    if file_type in LlamaFileType._value2member_map_:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    matrices = [t.qtype for t in gguf.tensors.values() if len(t.shape) == 2]
    return max(set(matrices), key=matrices.count, default=GGMLQuantizationType.F32).name


def job_narration(narrate: Narrator) -> Callable[[Job, Event], None]:
    def listen(job: Job, event: Event) -> None:
        fields = {"job_id": job.job_id, "correlation_id": job.context.get("correlation_id")}
        match event:
            case Started(seed=seed, prompt_tokens=prompt_tokens):
                digest = {k: v for k, v in job.context.items() if k.startswith("prompt_")}
                narrate(
                    "execute_start",
                    seed=seed,
                    prompt_tokens=prompt_tokens,
                    max_tokens=job.params.max_tokens,
                    **digest,
                    **fields,
                )
            case Finished(result=result):
                narrate(
                    "execute_end",
                    outcome="completed",
                    tokens_out=len(result.token_ids),
                    stop_reason=result.stop_reason,
                    **fields,
                )
            case Failed(code=code, message=message):
                level = "WARN" if code == "CANCELLED" else "ERROR"
                narrate("error", level=level, code=code, message=message, **fields)
                narrate("execute_end", outcome=code, **fields)

    return listen


def watch_residency(
    worker: Worker, llm: LLM, device: torch.device, interval: float, stop: threading.Event
) -> None:
    """Every `interval` seconds: are all weights still device memory, and how much VRAM is in
    use? `/health` serves the answers; a weight found off the GPU makes the worker unhealthy."""
    while not stop.wait(interval):
        worker.vram_bytes_used = vram_bytes_used(device)
        is_resident = resident(llm.model, device)
        if not is_resident and worker.resident:
            worker.narrate(
                "error",
                level="CRITICAL",
                code="VRAM_RESIDENCY_FAILED",
                message="a weight tensor is no longer in device memory",
            )
        worker.resident = is_resident
        worker.healthy = is_resident


class WorkerServer(uvicorn.Server):
    """uvicorn, plus the worker's ready step after binding and its drain on the first signal."""

    def __init__(self, config: uvicorn.Config, worker: Worker, options: ServeOptions):
        super().__init__(config)
        self.worker = worker
        self.options = options
        self.exit_code = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        uri = f"http://{self.options.host}:{self.options.port}"
        self.worker.narrate("ready", uri=uri, vram_bytes=self.worker.vram_bytes_used)
        if self.options.callback_url:
            threading.Thread(target=self._callback, args=(uri,), daemon=True).start()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, minus its re-raise of the signal after the drain: that re-raise killed
        the process by the signal (exit -15) and skipped the rest of `serve`, not exit 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            self.worker.narrate("shutdown", signal=sig)
            threading.Thread(target=self.worker.engine.shutdown, daemon=True).start()
        super().handle_exit(sig, frame)

    def _callback(self, uri: str) -> None:
        body = {
            "worker_id": self.options.worker_id,
            "model_ref": self.options.model,
            "vram_bytes": self.worker.vram_bytes_used,
            "uri": uri,
        }
        request = urllib.request.Request(
            self.options.callback_url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                self.worker.narrate("ready_callback", status=response.status)
        except OSError as error:
            self.worker.narrate("error", level="ERROR", code="CALLBACK_FAILED", message=str(error))
            self.exit_code = 1
            self.handle_exit(0, None)


def fail(narrate: Narrator, code: str, line: str) -> int:
    narrate("error", level="ERROR", code=code, message=line)
    print(line, file=sys.stderr, flush=True)
    return 1


def serve(options: ServeOptions) -> int:
    gpu = options.gpu_device if options.device != "cpu" else None
    narrate = Narrator(options.worker_id, options.model, gpu)
    narrate("startup", host=options.host, port=options.port, device=options.device)
    try:
        device = resolve_device(options.device, options.gpu_device)
    except ValueError as error:
        return fail(narrate, "CUDA_ERROR", f"{error} (code: CUDA_ERROR)")
    narrate("model_load_start", device=str(device))
    try:
        path = model_store.resolve(
            options.model, lambda message: narrate("model_pull", message=message)
        )
        gguf = GGUFFile(path)
        llm = LLM(
            gguf,
            device,
            progress=lambda percent: narrate("model_load_progress", percent=percent),
            max_context=options.ctx_size,
        )
    except InsufficientVram as error:
        return fail(narrate, "INSUFFICIENT_VRAM", f"{error} (code: INSUFFICIENT_VRAM)")
    except LOAD_ERRORS as error:
        line = f"Model load failed: {error} (code: MODEL_LOAD_FAILED, model: {options.model})"
        return fail(narrate, "MODEL_LOAD_FAILED", line)
    worker = Worker(
        engine=Engine(llm, job_narration(narrate)),
        narrate=narrate,
        model_name=options.model if options.model in model_store.CATALOG else path.stem,
        device=str(device),
        quant_kind=quant_kind(gguf),
        resident=device.type == "cuda",
        vram_bytes_used=vram_bytes_used(device),
        started=time.monotonic(),
    )
    narrate(
        "model_load_complete",
        path=str(path),
        quant_kind=worker.quant_kind,
        architecture=gguf.architecture,
        vram_bytes=worker.vram_bytes_used,
    )
    try:
        listener = socket.create_server((options.host, options.port))
        # Accepted sockets inherit this. asyncio sets TCP_NODELAY itself only on sockets whose
        # proto is IPPROTO_TCP, and create_server's is 0: without it, Nagle's algorithm and
        # delayed ACKs added ~40 ms to every keep-alive request and to streamed SSE events.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:
        return fail(
            narrate, "BIND_FAILED", f"HTTP bind failed: {options.host}:{options.port}: {error}"
        )
    config = uvicorn.Config(
        create_app(worker),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    # sse-starlette cancels every open stream at the first signal; the running job's stream
    # must instead end with its own terminal event (queued ones end via engine.shutdown).
    AppStatus.disable_automatic_graceful_drain()
    server = WorkerServer(config, worker, options)
    stop_watch = threading.Event()
    if device.type == "cuda":
        watch = (worker, llm, device, options.residency_interval, stop_watch)
        threading.Thread(target=watch_residency, args=watch, daemon=True).start()
    server.run(sockets=[listener])
    stop_watch.set()
    worker.engine.shutdown()
    narrate("shutdown_complete", exit_code=server.exit_code)
    return server.exit_code
