"""`worker-orcd serve`: startup in the spec's order (M0-W-1110), then HTTP until a signal.

1. the device (CUDA init failed -> exit 1), 2. the model (load failed -> exit 1, one line naming
the code, the file and the reason on stdout; stderr carries narration only), 3. the HTTP socket,
4. ready (log and optional callback).

SIGTERM, SIGINT or `POST /shutdown` drain the worker: the socket stays open and new jobs get 503
SHUTTING_DOWN, queued ones end with that error, the running one has `shutdown_timeout` seconds to
finish before it ends with it too, and once every stream has its terminal event the process
exits 0. A second signal ends the running job at once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import uvicorn
from gguf import GGMLQuantizationType, LlamaFileType
from sse_starlette.sse import AppStatus

from worker_orcd import model_store
from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.engine import Engine, Event, Failed, Finished, Job, Started
from worker_orcd.engine.llm import DEFAULT_MAX_CONTEXT, LLM, resolve_device
from worker_orcd.engine.memory import InsufficientVram, resident, vram_bytes_used
from worker_orcd.gguf.reader import GGUFError, GGUFFile
from worker_orcd.models import UnsupportedArchitectureError
from worker_orcd.server.app import Worker, create_app
from worker_orcd.server.connections import GuardedProtocol, HttpLimits
from worker_orcd.server.metrics import Metrics
from worker_orcd.server.narration import Narrator, capture_stderr
from worker_orcd.tokenizer import TokenizerError

SHUTDOWN_TIMEOUT_SECONDS = 4.0  # M0-W-1630: jobs finish within 4 s of a 5 s budget
STREAM_FLUSH_SECONDS = 2.0  # after the drain, for the last events to reach their clients
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
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_queued: int = EngineConfig.max_queued
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_SECONDS
    limits: HttpLimits = field(default_factory=HttpLimits)
    api_key: str | None = None  # every endpoint but /health then asks for it; never logged
    residency_interval: float = 60.0  # seconds between residency checks (M0-W-1012)


def quant_kind(gguf: GGUFFile) -> str:
    """The file's quantization as users name it (Q4_K_M, Q4_1, ...), from general.file_type."""
    file_type = gguf.metadata.get("general.file_type")
    if file_type in LlamaFileType._value2member_map_:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    matrices = [t.qtype for t in gguf.tensors.values() if len(t.shape) == 2]
    return max(set(matrices), key=matrices.count, default=GGMLQuantizationType.F32).name


def job_narration(narrate: Narrator, vram_bytes: Callable[[], int]) -> Callable[[Job, Event], None]:
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
                narrate(  # with spec M0-W-1901's performance fields
                    "execute_end",
                    outcome="completed",
                    tokens_in=len(result.prompt_token_ids),
                    tokens_out=len(result.token_ids),
                    cached_tokens=result.cached_tokens,
                    queue_ms=round(1000 * result.queue_seconds),
                    first_token_ms=round(1000 * (result.queue_seconds + result.prefill_seconds)),
                    decode_time_ms=round(1000 * result.decode_seconds),
                    vram_bytes=vram_bytes(),
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
    """uvicorn, plus the worker's ready step after binding, and its drain in place of uvicorn's
    shutdown on a signal: uvicorn would close the socket at once, refusing connections that
    should get a 503, and cut streams whose jobs are still running."""

    def __init__(self, config: uvicorn.Config, worker: Worker, options: ServeOptions):
        super().__init__(config)
        self.worker = worker
        self.options = options
        self.exit_code = 0
        worker.shutdown = lambda: self.drain("POST /shutdown")

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
        self.drain(signal.Signals(sig).name)

    def drain(self, cause: str) -> None:
        """Stop admitting jobs and let the running ones finish within the deadline, then stop
        serving; called again, end the running ones now."""
        engine = self.worker.engine
        if self.worker.draining:
            threading.Thread(target=engine.shutdown, args=(0,), daemon=True).start()
            return
        self.worker.draining = True
        self.worker.narrate("shutdown", cause=cause, timeout_seconds=self.options.shutdown_timeout)

        def drained() -> None:
            engine.shutdown(self.options.shutdown_timeout)
            self.should_exit = True  # uvicorn's main loop sees it within 0.1 s

        threading.Thread(target=drained, daemon=True).start()

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
            self.drain("the ready callback failed")


def fail(narrate: Narrator, code: str, line: str) -> int:
    """The startup failure as narration, and as the spec's one line for people, on stdout."""
    narrate("error", level="ERROR", code=code, message=line)
    print(line, flush=True)
    return 1


def bind_failed(narrate: Narrator, options: ServeOptions, error: OSError) -> int:
    return fail(narrate, "BIND_FAILED", f"HTTP bind failed: {options.host}:{options.port}: {error}")


def serve(options: ServeOptions) -> int:
    gpu = options.gpu_device if options.device != "cpu" else None
    narrate = Narrator(options.worker_id, options.model, gpu)
    capture_stderr(narrate)
    narrate("startup", host=options.host, port=options.port, device=options.device)
    try:  # an address in use costs a second here, not a model load (it is bound again below)
        socket.create_server((options.host, options.port)).close()
    except OSError as error:
        return bind_failed(narrate, options, error)
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
            max_num_seqs=options.max_num_seqs,
            gpu_memory_utilization=options.gpu_memory_utilization,
        )
    except InsufficientVram as error:
        return fail(narrate, "INSUFFICIENT_VRAM", f"{error} (code: INSUFFICIENT_VRAM)")
    except LOAD_ERRORS as error:
        line = f"Model load failed: {error} (code: MODEL_LOAD_FAILED, model: {options.model})"
        return fail(narrate, "MODEL_LOAD_FAILED", line)
    # The listeners and the metrics read `engine` and `worker` once jobs run, after both exist.
    metrics = Metrics(lambda: engine.stats(), lambda: worker.vram_bytes_used)
    listeners = [job_narration(narrate, lambda: worker.vram_bytes_used), metrics.observe]
    engine = Engine(llm, listeners, options.max_queued)
    worker = Worker(
        engine=engine,
        metrics=metrics,
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
    pool = llm.engine
    narrate(  # what the KV pool holds: how many full-context sequences fit at once
        "kv_cache",
        blocks=pool.num_blocks,
        block_size=llm.config.block_size,
        tokens=pool.max_tokens_in_pool,
        max_full_context_sequences=pool.max_tokens_in_pool // llm.context_length,
        max_num_seqs=llm.config.max_num_seqs,
    )
    try:
        listener = socket.create_server((options.host, options.port))
        # Accepted sockets inherit this. asyncio sets TCP_NODELAY itself only on sockets whose
        # proto is IPPROTO_TCP, and create_server's is 0: without it, Nagle's algorithm and
        # delayed ACKs added ~40 ms to every keep-alive request and to streamed SSE events.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:
        return bind_failed(narrate, options, error)
    limits = options.limits
    config = uvicorn.Config(
        create_app(worker, limits, options.api_key),
        http=GuardedProtocol.factory(limits),
        log_config=None,
        access_log=False,
        timeout_keep_alive=limits.keep_alive_timeout,
        timeout_graceful_shutdown=STREAM_FLUSH_SECONDS,
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
