"""Background saves and loads for an engine worker: the engine's step never waits for the daemon.

``TransferEngine`` runs save jobs on one thread ("kvtier-save") and load jobs on another
("kvtier-load"), so a slow save never delays a load. What a job does (the daemon calls and the
copies) is the caller's ``run`` function (``_pipeline.save_blocks``/``load_blocks`` around the
engine's copies); this module owns only *when* engine memory may be reused, which is the one fact
that must not drift:

A save job **holds its sources** (the engine's KV blocks it copies from) from ``submit_save`` until
its copy into the arena is over, or until it is cancelled or fails. A request's blocks may be freed
only when no job holds them: ``finished()`` reports a finished request as done sending only then.

Save job states, kept under the engine's lock::

    QUEUED ──> ALLOCATING ──start_copy()──> COPYING ──end_copy()──> COMMITTING ──> DONE
       │            │                          │
       └─cancel─────┴──> CANCELLED            cancel waits for the copy (at most copy_timeout_s;
         (sources released at once; a         past it the job is CANCELLED, its sources released,
         later start_copy raises Cancelled)   and end_copy raises Cancelled: it never commits)

``cancel(req_ids)`` is for preempted requests, whose blocks the engine reuses in its next step
(vLLM's ``handle_preemptions``): it returns once none of their blocks is read by a copy. A copy is
the engine's own memcpy (or a CUDA stream synchronisation), never a daemon call, so the wait is short.

Bounds: in-flight save bytes (``max_inflight_bytes``; past it ``submit_save`` drops the job and
returns False: counted, never waited for) and queued load jobs (``max_queued_loads``; past it a load
fails at once, its blocks reported as load errors and recomputed by the engine).

Loads: ``submit_load(req_id, block_ids, run)``; ``run()`` returns the block ids it failed to load
(raising fails them all). ``finished()`` reports the request as done receiving once all its load
jobs ended; their failed block ids are in ``take_load_errors()`` no later than that.

Thread-safety: every method may be called from any thread. A job's ``run`` is called on the engine's
thread for its kind, one job at a time. An exception escaping a job is counted and logged; a worker
thread that dies anyway is logged at ERROR and the engine refuses new jobs (saves dropped, loads
failed) instead of queuing work nobody runs.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30
DEFAULT_MAX_QUEUED_LOADS = 4096
DEFAULT_COPY_TIMEOUT_S = 30.0
STATS = ("saves_submitted", "saves_dropped", "saves_cancelled", "save_jobs_failed", "inflight_save_bytes",
         "loads_submitted", "loads_refused", "load_jobs_failed")


class Cancelled(Exception):
    """The job was cancelled (its request was preempted): it must not copy or commit."""


class State(enum.Enum):
    QUEUED = "queued"
    ALLOCATING = "allocating"
    COPYING = "copying"
    COMMITTING = "committing"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class SaveJob:
    req_id: str
    nbytes: int
    run: Callable[["SaveJob"], None]
    engine: "TransferEngine"
    state: State = State.QUEUED
    holding: bool = True
    counted: bool = True  # its bytes are in the in-flight total

    def start_copy(self) -> None:
        """Called by `run` right before it reads the sources; raises Cancelled if it must not."""
        self.engine._start_copy(self)

    def end_copy(self) -> None:
        """Called by `run` once the sources are no longer read; raises Cancelled when the job was
        cancelled meanwhile (its sources may have been reused: what it copied must not be committed)."""
        self.engine._end_copy(self)


@dataclass(eq=False)
class LoadJob:
    req_id: str
    block_ids: list[int]
    run: Callable[[], Iterable[int]]


@dataclass
class _Requests:
    """Per-request facts; every field only under TransferEngine._lock."""
    holds: dict[str, set[SaveJob]] = field(default_factory=dict)   # req -> jobs holding its blocks
    expected: set[str] = field(default_factory=set)    # reqs the scheduler holds until reported
    finishing: set[str] = field(default_factory=set)   # finished, waiting for their holds to end
    loading: dict[str, int] = field(default_factory=dict)  # req -> load jobs not ended
    received: set[str] = field(default_factory=set)    # all load jobs ended, not yet reported
    load_errors: set[int] = field(default_factory=set)


class TransferEngine:
    def __init__(self, *, max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
                 max_queued_loads: int = DEFAULT_MAX_QUEUED_LOADS, copy_timeout_s: float = DEFAULT_COPY_TIMEOUT_S,
                 stats: dict | None = None, logger: logging.Logger | None = None,
                 on_error: Callable[[str, BaseException], None] | None = None):
        if max_inflight_bytes <= 0 or max_queued_loads <= 0 or copy_timeout_s <= 0:
            raise ValueError("kvtier: max_inflight_bytes, max_queued_loads and copy_timeout_s must be > 0")
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.max_queued_loads = int(max_queued_loads)
        self.copy_timeout_s = float(copy_timeout_s)
        self.stats = stats if stats is not None else {}
        for name in STATS:
            self.stats.setdefault(name, 0)
        self._logger = logger or logging.getLogger(__name__)
        self._on_error = on_error or (lambda kind, error: self._logger.warning("kvtier: %s job failed: %r", kind, error))
        self._lock = threading.Condition()
        self._requests = _Requests()
        self._inflight = 0
        self._queued_loads = 0
        self._broken = ""
        self._closed = False
        self._saves: queue.SimpleQueue = queue.SimpleQueue()
        self._loads: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._worker, args=(self._saves, self._run_save), daemon=True,
                                          name="kvtier-save"),
                         threading.Thread(target=self._worker, args=(self._loads, self._run_load), daemon=True,
                                          name="kvtier-load")]
        for thread in self._threads:
            thread.start()

    # -- saves -----------------------------------------------------------------------------------------
    def expect(self, req_ids: Iterable[str]) -> None:
        """Requests the scheduler was told have saves (vLLM: request_finished answers True for them):
        each is reported by finished() once it finished and no job holds its blocks."""
        with self._lock:
            self._requests.expected.update(req_ids)

    def submit_save(self, req_id: str, nbytes: int, run: Callable[[SaveJob], None]) -> bool:
        """Queues a save; False (dropped, counted) past the in-flight bound or when the engine broke."""
        with self._lock:
            if self._broken or self._closed or self._inflight + nbytes > self.max_inflight_bytes:
                self.stats["saves_dropped"] += 1
                return False
            job = SaveJob(req_id, nbytes, run, self)
            self._hold(job)
            self._inflight += nbytes
            self.stats["inflight_save_bytes"] = self._inflight
            self.stats["saves_submitted"] += 1
        self._saves.put(job)
        return True

    def run_save_now(self, req_id: str, nbytes: int, run: Callable[[SaveJob], None]) -> None:
        """The same job on the calling thread (the synchronous path, kept for comparison)."""
        job = SaveJob(req_id, nbytes, run, self)
        with self._lock:
            self._hold(job)
            self._inflight += nbytes
            self.stats["saves_submitted"] += 1
        self._run_save(job)

    def cancel(self, req_ids: Iterable[str]) -> None:
        """Preempted requests: returns once no copy reads their blocks (queued and allocating jobs are
        cancelled; a running copy is waited for, at most copy_timeout_s)."""
        wanted = set(req_ids)
        deadline = time.monotonic() + self.copy_timeout_s
        with self._lock:
            while True:
                jobs = [job for req in wanted for job in self._requests.holds.get(req, ())]
                for job in jobs:
                    if job.state in (State.QUEUED, State.ALLOCATING):
                        self._cancel(job)
                copying = [job for job in jobs if job.state is State.COPYING and job.holding]
                if not copying:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for job in copying:
                        self._logger.error("kvtier: a save copy of request %s ran past %.0f s; its blocks are "
                                           "released to the engine and the save will not be committed",
                                           job.req_id, self.copy_timeout_s)
                        self._cancel(job)
                    return
                self._lock.wait(remaining)

    def _cancel(self, job: SaveJob) -> None:
        if job.state is State.QUEUED:  # it will never run: its bytes are free now
            self._uncount(job)
        job.state = State.CANCELLED
        self._release(job)
        self.stats["saves_cancelled"] += 1

    def _uncount(self, job: SaveJob) -> None:
        if job.counted:
            job.counted = False
            self._inflight -= job.nbytes
            assert self._inflight >= 0, self._inflight
            self.stats["inflight_save_bytes"] = self._inflight

    def _hold(self, job: SaveJob) -> None:
        self._requests.holds.setdefault(job.req_id, set()).add(job)

    def _release(self, job: SaveJob) -> None:
        if not job.holding:
            return
        job.holding = False
        jobs = self._requests.holds.get(job.req_id)
        jobs.discard(job)
        if not jobs:
            del self._requests.holds[job.req_id]
        self._lock.notify_all()

    def _start_copy(self, job: SaveJob) -> None:
        with self._lock:
            if job.state is State.CANCELLED:
                raise Cancelled(job.req_id)
            assert job.state is State.ALLOCATING and job.holding, job.state
            job.state = State.COPYING

    def _end_copy(self, job: SaveJob) -> None:
        with self._lock:
            if job.state is State.CANCELLED:
                raise Cancelled(job.req_id)
            assert job.state is State.COPYING, job.state
            job.state = State.COMMITTING
            self._release(job)

    def _run_save(self, job: SaveJob) -> None:
        with self._lock:
            if job.state is State.CANCELLED:
                self._finish_save(job)
                return
            job.state = State.ALLOCATING
        try:
            job.run(job)
        except Cancelled:
            pass  # counted when cancelled
        except Exception as error:  # noqa: BLE001 - a failed save is a future miss; the run function logs why
            with self._lock:
                self.stats["save_jobs_failed"] += 1
            self._on_error("save", error)
        finally:
            with self._lock:
                self._finish_save(job)

    def _finish_save(self, job: SaveJob) -> None:
        self._release(job)
        if job.state is not State.CANCELLED:
            job.state = State.DONE
        self._uncount(job)

    # -- loads -----------------------------------------------------------------------------------------
    def submit_load(self, req_id: str, block_ids: list[int], run: Callable[[], Iterable[int]]) -> None:
        """Queues a load; finished() reports req_id done receiving once all its loads ended."""
        with self._lock:
            self._requests.loading[req_id] = self._requests.loading.get(req_id, 0) + 1
            refuse = bool(self._broken or self._closed or self._queued_loads >= self.max_queued_loads)
            if refuse:
                self.stats["loads_refused"] += 1
                self._end_load(LoadJob(req_id, block_ids, run), block_ids)
                return
            self._queued_loads += 1
            self.stats["loads_submitted"] += 1
        self._loads.put(LoadJob(req_id, block_ids, run))

    def _run_load(self, job: LoadJob) -> None:
        failed: Iterable[int] = job.block_ids
        try:
            failed = job.run()
        except Exception as error:  # noqa: BLE001 - a failed load is recomputed by the engine
            with self._lock:
                self.stats["load_jobs_failed"] += 1
            self._on_error("load", error)
        finally:
            with self._lock:
                self._queued_loads -= 1
                self._end_load(job, failed)

    def _end_load(self, job: LoadJob, failed: Iterable[int]) -> None:
        self._requests.load_errors.update(failed)
        left = self._requests.loading[job.req_id] - 1
        if left:
            self._requests.loading[job.req_id] = left
        else:
            del self._requests.loading[job.req_id]
            self._requests.received.add(job.req_id)

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._requests.load_errors = self._requests.load_errors, set()
            return errors

    def add_load_errors(self, block_ids: Iterable[int]) -> None:
        with self._lock:
            self._requests.load_errors.update(block_ids)

    # -- completion ------------------------------------------------------------------------------------
    def finished(self, finished_req_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """(done sending, done receiving): expected requests among `finished_req_ids` (this call's or an
        earlier one's) whose blocks no job holds any more, and requests whose loads all ended."""
        with self._lock:
            requests = self._requests
            for req in finished_req_ids:
                if req in requests.expected:
                    requests.expected.discard(req)
                    requests.finishing.add(req)
            sending = {req for req in requests.finishing if req not in requests.holds}
            requests.finishing -= sending
            receiving, requests.received = requests.received, set()
            return sending, receiving

    def wait_progress(self, timeout_s: float) -> None:
        """Waits at most timeout_s for something the engine waits for: a request whose loads ended, or a
        finished request no job holds any more; returns at once when it waits for nothing. For an engine
        with nothing else to run: its loop would otherwise spin, and a spinning Python thread starves the
        transfer threads of the interpreter lock (a load measured 50 times slower)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            requests = self._requests
            while not requests.received and not any(req not in requests.holds for req in requests.finishing):
                if not requests.loading and not requests.finishing:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._lock.wait(remaining)

    def pending_loads(self) -> int:
        """Load jobs queued or running."""
        with self._lock:
            return self._queued_loads

    def holding(self, req_id: str) -> bool:
        with self._lock:
            return req_id in self._requests.holds

    def idle(self) -> bool:
        """No save or load job queued or running."""
        with self._lock:
            return self._inflight == 0 and self._queued_loads == 0

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._inflight or self._queued_loads:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    # -- threads ---------------------------------------------------------------------------------------
    def _worker(self, jobs: queue.SimpleQueue, run: Callable) -> None:
        try:
            while True:
                job = jobs.get()
                if job is None:
                    return
                run(job)
                with self._lock:
                    self._lock.notify_all()
        except BaseException as error:  # a bug in this module: say so, and stop taking work
            with self._lock:
                self._broken = f"{threading.current_thread().name} died: {error!r}"
            self._logger.exception("kvtier: %s; saves are dropped and loads fail from now on", self._broken)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops taking jobs, lets queued ones run (at most timeout_s), stops the threads."""
        with self._lock:
            self._closed = True
        self._saves.put(None)
        self._loads.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
