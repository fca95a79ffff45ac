"""The worker's job queue: accepted jobs wait their turn in order, one generation runs at a time
on a dedicated thread, and every accepted job ends with exactly one terminal event.

The HTTP layer sees only `submit`, `cancel` and each job's async event stream; the model, the
GPU and the blocking generation loop stay on the engine thread. Batching replaces the one-at-a-
time loop later without changing that surface.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from worker_orcd.engine.llm import LLM, Generation, GenerationResult
from worker_orcd.sampling_params import SamplingParams, new_seed


@dataclass(frozen=True)
class Started:
    seed: int  # the request's seed, or the one generated for it
    prompt_tokens: int


@dataclass(frozen=True)
class Token:
    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    code: str  # a stable code of spec M0-W-1500: CANCELLED, VRAM_OOM, INTERNAL, ...
    message: str
    retriable: bool


Event = Started | Token | Finished | Failed

# How a job that did not run to its end finishes: by whom, and whether a retry can succeed.
CANCELLED = Failed("CANCELLED", "cancelled by request", retriable=False)
CLIENT_LEFT = Failed("CANCELLED", "the client went away", retriable=False)
SHUTTING_DOWN = Failed("SHUTTING_DOWN", "the worker is shutting down", retriable=True)
SHUTDOWN_DEADLINE = Failed(
    "SHUTTING_DOWN", "the worker shut down before the job finished", retriable=True
)


class JobRejected(Exception):
    """A job the engine will not accept; nothing was queued."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class Job:
    def __init__(
        self,
        job_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        context: Mapping[str, Any],
        loop: asyncio.AbstractEventLoop,
    ):
        self.job_id = job_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.context = context  # the caller's, for listeners (say, a correlation id for logs)
        self.done = False
        self._taken = False  # set, under the engine's lock, once the job leaves the queue
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._generation: Generation | None = None
        self._ending = CANCELLED  # the terminal event of a cancelled generation

    def cancel(self, ending: Failed = CANCELLED) -> None:
        self._ending = ending
        self._cancelled.set()
        if self._generation is not None:
            self._generation.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The job's events in order, ending with its one terminal event."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return

    def _emit(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)


Listener = Callable[[Job, Event], None]


class Engine:
    def __init__(self, llm: LLM, listener: Listener | None = None):
        self.llm = llm
        self._listener = listener or (lambda job, event: None)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(
        self,
        job_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        context: Mapping[str, Any] | None = None,
    ) -> Job:
        """Queue a job; call from the event loop that will read its events."""
        if not 0 < len(prompt_ids) < self.llm.context_length:
            raise JobRejected(
                "INVALID_REQUEST",
                f"the prompt has {len(prompt_ids)} tokens: expected 1 to "
                f"{self.llm.context_length - 1} (the model's context length)",
            )
        if params.seed is None:  # fixed now, so that `started` can report it
            params = dataclasses.replace(params, seed=new_seed())
        job = Job(job_id, prompt_ids, params, context or {}, asyncio.get_running_loop())
        with self._lock:
            if not self._accepting:
                raise JobRejected("SHUTTING_DOWN", "the worker is shutting down")
            if job_id in self._jobs:
                raise JobRejected(
                    "DUPLICATE_JOB_ID", f"job {job_id!r} is already queued or running"
                )
            self._jobs[job_id] = job
        self._queue.put(job)
        return job

    def cancel(self, job_id: str) -> bool:
        """End a queued job now, a running one within a model step; False when none is active."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return False
        self.abort(job, CANCELLED)
        return True

    def abort(self, job: Job, ending: Failed = CLIENT_LEFT) -> None:
        """Like `cancel`, for a caller that holds the job itself (its id may be reused later)."""
        if not self._end_if_queued(job, ending):
            job.cancel(ending)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new jobs and end the queued ones now; give the running job `timeout` seconds
        (None: as long as it takes) to finish, then end it within a model step; stop the thread.

        A second call with a shorter timeout (a second signal, say) cuts the first one's wait."""
        with self._lock:
            self._accepting = False
            jobs = list(self._jobs.values())
        for job in jobs:
            self._end_if_queued(job, SHUTTING_DOWN)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                running = list(self._jobs.values())
            for job in running:
                job.cancel(SHUTDOWN_DEADLINE)
            self._thread.join()

    def _end_if_queued(self, job: Job, ending: Failed) -> bool:
        """End a job that has not started yet now, with `ending` alone (it never started),
        rather than when the jobs ahead of it are done; the engine thread then skips it."""
        with self._lock:
            if job._taken:
                return False
            job._taken = True
        job.done = True
        self._send(job, ending)
        return True

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job._taken:  # cancelled while queued: its stream has already ended
                    continue
                job._taken = True
            try:
                self._execute(job)
            finally:
                self._release(job)
                job.done = True

    def _execute(self, job: Job) -> None:
        self._send(job, Started(job.params.seed, len(job.prompt_ids)))
        try:
            generation = self.llm.generate(job.prompt_ids, job.params)
            job._generation = generation
            if job._cancelled.is_set():
                generation.cancel()
            for chunk in generation:
                self._send(job, Token(chunk.index, chunk.text))
        except torch.OutOfMemoryError as error:
            job._generation = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give back what the failed step allocated
            self._send(job, Failed("VRAM_OOM", f"out of GPU memory: {error}", retriable=True))
            return
        except Exception as error:  # the job fails; the worker stays up
            self._send(job, Failed("INTERNAL", f"{type(error).__name__}: {error}", retriable=True))
            return
        result = generation.result
        assert result is not None
        if result.stop_reason == "cancelled":
            self._send(job, job._ending)
        else:
            self._send(job, Finished(result))

    def _release(self, job: Job) -> None:
        """Free the job's id, unless a later job already took it."""
        with self._lock:
            if self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]

    def _send(self, job: Job, event: Event) -> None:
        if isinstance(event, Finished | Failed):
            # Free the id before the client can see the end: an immediate resubmission of the
            # same job_id must not race the engine thread into a 409.
            self._release(job)
        self._listener(job, event)
        job._emit(event)
