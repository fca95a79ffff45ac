"""The worker's async front over the step loop: accepted jobs join the batch at the next step,
the engine thread steps while any sequence is unfinished, and every accepted job ends with
exactly one terminal event.

The HTTP layer sees only `submit`, `cancel` and each job's async event stream; the model, the
GPU and the blocking step loop stay on the engine thread, which alone touches `LLMEngine`.
Cancels and new jobs reach it through a lock-guarded inbox, read between two steps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from worker_orcd.engine.llm import LLM
from worker_orcd.engine.llm_engine import StepOutput
from worker_orcd.engine.output import GenerationResult
from worker_orcd.engine.sequence import Sequence
from worker_orcd.sampling_params import SamplingParams


@dataclass(frozen=True)
class Started:
    seed: int  # the request's seed, or the one generated for it
    prompt_tokens: int


@dataclass(frozen=True)
class Token:
    index: int  # the n-th text event of its job, as its receiver counts (`Job.events` joins)
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


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the batch
    waiting: int  # queued or preempted
    kv_cache_usage: float  # share of the pool's blocks held
    preemptions: int
    hits: int  # prompt tokens the prefix cache supplied


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
        self.started = False
        self.accepted_at = time.perf_counter()
        self.seq: Sequence | None = None  # once the engine thread has taken the job
        self.ending: Failed | None = None  # a cancel's terminal event, once asked for
        self._tokens = 0
        self._loop = loop
        self._pending: deque[Event] = deque()  # delivered, not yet read: the loop's alone
        self._ready = asyncio.Event()

    async def events(self) -> AsyncIterator[Event]:
        """The job's events in order, ending with its one terminal event. Tokens that queued
        up while the reader was busy (a slow client) come as one `Token` of their joined text,
        so that a stream that falls behind catches up in one write."""
        index = 0
        while True:
            while not self._pending:
                self._ready.clear()
                await self._ready.wait()
            event = self._pending.popleft()
            if isinstance(event, Token):
                text = [event.text]
                while self._pending and isinstance(self._pending[0], Token):
                    text.append(self._pending.popleft().text)
                event = Token(index, "".join(text))
                index += 1
            yield event
            if isinstance(event, Finished | Failed):
                return

    def _push(self, event: Event) -> None:
        """On the job's loop: take a delivered event."""
        self._pending.append(event)
        self._ready.set()


def _push_all(deliveries: list[tuple[Job, Event]]) -> None:
    for job, event in deliveries:
        job._push(event)


Listener = Callable[[Job, Event], None]


class Engine:
    """`max_queued` caps the jobs accepted but not yet started; past it, `submit` refuses with
    QUEUE_FULL (a 503 to retry later). Listeners see every event of every job, in order."""

    def __init__(self, llm: LLM, listeners: Iterable[Listener] = (), max_queued: int = 1024):
        self.llm = llm
        self.max_queued = max_queued
        self._core = llm.engine
        self._listeners = tuple(listeners)
        self._jobs: dict[str, Job] = {}  # accepted and not yet ended, by id
        self._by_seq: dict[int, Job] = {}  # the engine thread's: sequence id to job
        self._inbox: list[Job] = []  # accepted, not yet taken by the engine thread
        self._cancels: list[Job] = []  # taken jobs whose cancel the engine thread must apply
        self._outbox: list[tuple[Job, Event]] = []  # the engine thread's, until `_flush`
        self._lock = threading.Condition()
        self._accepting = True
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stats(self) -> EngineStats:
        """The engine's state, read from any thread (the figures may be a step old)."""
        scheduler = self._core.scheduler
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(self._inbox),
            kv_cache_usage=scheduler.block_manager.usage,
            preemptions=scheduler.num_preemptions,
            hits=scheduler.num_cached_tokens,
        )

    def submit(
        self,
        job_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        context: Mapping[str, Any] | None = None,
    ) -> Job:
        """Queue a job; call from the event loop that will read its events."""
        try:
            self._core.check(prompt_ids, params)
        except ValueError as error:
            raise JobRejected("INVALID_REQUEST", str(error)) from None
        job = Job(job_id, prompt_ids, params, context or {}, asyncio.get_running_loop())
        with self._lock:
            if not self._accepting:
                raise JobRejected("SHUTTING_DOWN", "the worker is shutting down")
            if job_id in self._jobs:
                raise JobRejected(
                    "DUPLICATE_JOB_ID", f"job {job_id!r} is already queued or running"
                )
            if sum(not j.started for j in self._jobs.values()) >= self.max_queued:
                raise JobRejected(
                    "QUEUE_FULL", f"{self.max_queued} jobs are already queued: retry later"
                )
            self._jobs[job_id] = job
            self._inbox.append(job)
            self._lock.notify()
        return job

    def cancel(self, job_id: str) -> bool:
        """End a job within a step (one not yet taken, at once); False when none is active."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return False
        self.abort(job, CANCELLED)
        return True

    def abort(self, job: Job, ending: Failed = CLIENT_LEFT) -> None:
        """Like `cancel`, for a caller that holds the job itself (its id may be reused later)."""
        with self._lock:
            if job.done or job.ending is not None:
                return
            job.ending = ending
            if job in self._inbox:  # never reached the engine: it ends here and now
                self._inbox.remove(job)
            else:
                self._cancels.append(job)
                self._lock.notify()
                return
        self._notify(job, ending)
        job._loop.call_soon_threadsafe(job._push, ending)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new jobs and end those not yet started now; give the running ones `timeout`
        seconds (None: as long as they take) to finish, then end them within a step; stop the
        thread. A second call with a shorter timeout (a second signal, say) cuts the wait."""
        with self._lock:
            self._accepting = False
            self._draining = True
            queued = list(self._inbox)
            self._lock.notify()
        for job in queued:
            self.abort(job, SHUTTING_DOWN)
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                running = list(self._jobs.values())
            for job in running:
                self.abort(job, SHUTDOWN_DEADLINE)
            self._thread.join()

    def _run(self) -> None:
        core = self._core
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or self._draining or core.has_unfinished()):
                    self._lock.wait()
                taken, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                draining = self._draining
            for job in taken:
                job.seq = core.add(job.prompt_ids, job.params)
                self._by_seq[job.seq.seq_id] = job
            for job in cancels:
                self._end(job, job.ending)
            if draining:  # jobs that have not started end now, retriable elsewhere
                for seq in list(core.scheduler.waiting):
                    if seq.scheduled_at is None:
                        self._end(self._by_seq[seq.seq_id], SHUTTING_DOWN)
            if core.has_unfinished():
                self._step()
            self._flush()
            if draining and not core.has_unfinished():
                return

    def _step(self) -> None:
        try:
            outputs = self._core.step()
        except Exception as error:  # the step's sequences fail; the worker stays up
            self._fail_running(error)
            return
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: StepOutput) -> None:
        job = self._by_seq[output.seq.seq_id]
        if output.started:
            job.started = True
            self._send(job, Started(output.seq.seed, len(job.prompt_ids)))
        if output.text:
            self._send(job, Token(job._tokens, output.text))
            job._tokens += 1
        if output.finished:
            del self._by_seq[output.seq.seq_id]
            self._send(job, Finished(GenerationResult.of(output.seq)))

    def _fail_running(self, error: Exception) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give back what the failed step allocated
            failed = Failed("VRAM_OOM", f"out of GPU memory: {error}", retriable=True)
        else:
            failed = Failed("INTERNAL", f"{type(error).__name__}: {error}", retriable=True)
        for seq in list(self._core.scheduler.running):
            self._end(self._by_seq[seq.seq_id], failed)

    def _end(self, job: Job, ending: Failed) -> None:
        """End a taken job before its sequence finished: free the sequence, send `ending`."""
        seq = job.seq
        if seq is None or job.done:
            return
        self._core.abort(seq)
        del self._by_seq[seq.seq_id]
        self._send(job, ending)

    def _release(self, job: Job) -> None:
        """Free the job's id, unless a later job already took it."""
        with self._lock:
            if self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]

    def _send(self, job: Job, event: Event) -> None:
        """On the engine thread: the event goes out with the rest of its step's (`_flush`)."""
        self._notify(job, event)
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Deliver the step's events: one wake-up of each event loop per step, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job._loop, []).append((job, event))
        self._outbox = []
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_push_all, deliveries)

    def _notify(self, job: Job, event: Event) -> None:
        if isinstance(event, Finished | Failed):
            # Free the id before the client can see the end: an immediate resubmission of the
            # same job_id must not race the engine thread into a 409.
            job.done = True
            self._release(job)
        for listener in self._listeners:
            listener(job, event)
