"""The transfer engine's hold/cancel/finish lifecycle, model-checked with its real threads.

Each save job's run function stops at three gates the state machine opens one at a time: "alloc"
(the Allocate RPC), "copy" (reading the engine's blocks, between start_copy and end_copy) and
"commit". Faults: a job raises at its gate; a request is preempted (cancel) at any point, its copy
running or not. After every step the test waits for the engine to settle (the running job parked
at its next gate, or nothing left in flight: a readiness signal, never a sleep) and checks:

- a request is held (engine.holding) exactly while one of its jobs has not passed its copy, failed
  or been cancelled;
- no job reads sources after cancel() returned for its request, and a cancelled job never commits;
- in-flight bytes are the sum of the accepted jobs not ended, never above the bound;
- finished() reports an expected request done sending once, exactly when it finished and no job
  holds it; loads are reported done receiving once, with their failed blocks in the load errors.
"""

from __future__ import annotations

import threading
import time

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.connectors._transfers import Cancelled, TransferEngine

MAX_BYTES = 100
REQUESTS = ("r1", "r2", "r3")
GATES = ("alloc", "copy", "commit")
SETTLE_S = 30.0  # generous: reached only if the engine never settles (a bug)
CANCEL_PATIENCE_S = 0.3  # how long a cancel() that must wait is watched for returning early (a bug)


class Job:
    def __init__(self, number: int, req: str, nbytes: int):
        self.number, self.req, self.nbytes = number, req, nbytes
        self.gates = {gate: threading.Event() for gate in GATES}
        self.fail_at: str | None = None
        self.started = False      # the engine's thread called its run
        self.reading = False      # between start_copy and end_copy: the engine's blocks are read
        self.released = False     # the model's view: sources no longer held
        self.ended = False        # its bytes are no longer in flight (run returned, or cancelled unrun)
        self.committed = False
        self.cancelled = False


class TransferLifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.engine = TransferEngine(max_inflight_bytes=MAX_BYTES, copy_timeout_s=SETTLE_S,
                                     on_error=lambda kind, error: None)
        self.lock = threading.Condition()
        self.jobs: list[Job] = []
        self.parked: tuple[Job, str] | None = None  # the job waiting at a gate, and which
        self.expected: set[str] = set()
        self.finished: set[str] = set()
        self.reported: set[str] = set()
        self.loads: dict[str, set[int]] = {}       # req -> block ids expected among the load errors
        self.load_errors: set[int] = set()
        self.next_block = 0

    # -- the job the engine runs -------------------------------------------------------------------
    def _run(self, job: Job):
        def run(save_job):
            with self.lock:
                job.started = True
            try:
                self._gate(job, "alloc")
                save_job.start_copy()
                job.reading = True
                self._gate(job, "copy")
                job.reading = False
                save_job.end_copy()
                with self.lock:
                    job.released = True
                self._gate(job, "commit")
                assert not job.cancelled, f"job {job.number} commits after its request was preempted"
                job.committed = True
            except Cancelled:
                assert job.cancelled, f"job {job.number} told Cancelled but never cancelled"
                raise
            finally:
                job.reading = False
                with self.lock:
                    job.released = job.ended = True
                    self.lock.notify_all()
        return run

    def _gate(self, job: Job, gate: str) -> None:
        with self.lock:
            self.parked = (job, gate)
            self.lock.notify_all()
        job.gates[gate].wait()
        with self.lock:
            self.parked = None
            self.lock.notify_all()
        if job.fail_at == gate:
            raise RuntimeError(f"injected at {gate}")

    def _settle(self, moved_from=None) -> None:
        """Until the running job parks at a gate it was not at before (`moved_from`), or every job
        ended; and the load thread is idle."""
        deadline = time.monotonic() + SETTLE_S
        with self.lock:
            while True:
                parked_new = self.parked is not None and self.parked != moved_from
                all_ended = self.parked is None and all(job.ended for job in self.jobs)
                if (parked_new or all_ended) and not self.engine.pending_loads():
                    return
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"engine did not settle: parked={self.parked}, jobs={self._describe()}"
                self.lock.wait(min(remaining, 0.05))

    def _describe(self):
        return [(j.number, j.req, j.started, j.ended, j.cancelled) for j in self.jobs]

    # -- rules -----------------------------------------------------------------------------------------
    @rule(req=st.sampled_from(REQUESTS), nbytes=st.integers(1, 60))
    def submit(self, req, nbytes):
        if req in self.finished:
            return  # a finished request gets no new saves
        self.engine.expect([req])
        self.expected.add(req)
        with self.lock:
            inflight = sum(job.nbytes for job in self.jobs if not job.ended)
        job = Job(len(self.jobs), req, nbytes)
        accepted = self.engine.submit_save(req, nbytes, self._run(job))
        assert accepted == (inflight + nbytes <= MAX_BYTES), (accepted, inflight, nbytes)
        if accepted:
            with self.lock:
                self.jobs.append(job)
            self._settle()

    @precondition(lambda self: self.parked is not None)
    @rule(fail=st.booleans())
    def open_gate(self, fail):
        job, gate = self.parked
        if fail:
            job.fail_at = gate
        job.gates[gate].set()
        self._settle(moved_from=(job, gate))

    @precondition(lambda self: self.parked is not None)
    @rule()
    def preempt_the_running_job(self):
        self.preempt(self.parked[0].req)

    @precondition(lambda self: self.parked is not None and self.parked[1] == "alloc")
    @rule()
    def preempt_during_the_copy(self):
        job, gate = self.parked
        job.gates[gate].set()
        self._settle(moved_from=(job, gate))
        self.preempt(job.req)

    @rule(req=st.sampled_from(REQUESTS))
    def preempt(self, req):
        parked = self.parked
        copying = parked is not None and parked[0].req == req and parked[1] == "copy"
        with self.lock:
            for job in self.jobs:  # what cancel() must do to each of req's jobs still holding
                if job.req != req or job.released or (copying and job is parked[0]):
                    continue
                job.cancelled = True
                job.released = True
                if not job.started:  # still queued: never runs, its bytes are free at once
                    job.ended = True
        event(f"preempt, copy running: {copying}")
        if copying:
            # cancel() must wait for the running copy: it may not return while the job is parked in it.
            canceller = threading.Thread(target=self.engine.cancel, args=([req],))
            canceller.start()
            canceller.join(CANCEL_PATIENCE_S)
            assert canceller.is_alive(), f"cancel({req}) returned while job {parked[0].number} still copies"
            parked[0].gates["copy"].set()
            canceller.join(SETTLE_S)
            assert not canceller.is_alive(), f"cancel({req}) did not return after the copy ended"
        else:
            self.engine.cancel([req])
        for job in self.jobs:
            assert not (job.req == req and job.reading), f"job {job.number} still reads preempted {req}'s blocks"
        self._settle(moved_from=parked if copying else None)

    @rule(req=st.sampled_from(REQUESTS))
    def finish(self, req):
        self.finished.add(req)
        self._check_finished({req})

    @rule()
    def poll(self):
        self._check_finished(set())

    @rule(req=st.sampled_from(("l1", "l2")), count=st.integers(1, 4), failing=st.integers(0, 4),
          crash=st.booleans())
    def load(self, req, count, failing, crash):
        if req in self.loads:
            return
        block_ids = list(range(self.next_block, self.next_block + count))
        self.next_block += count
        failed = set(block_ids[:min(failing, count)])
        self.loads[req] = set(block_ids) if crash else failed

        def run():
            if crash:
                raise RuntimeError("injected load failure")
            return failed
        self.engine.submit_load(req, block_ids, run)
        self._settle()

    def _check_finished(self, finished_now: set[str]) -> None:
        sending, receiving = self.engine.finished(finished_now)
        with self.lock:
            held = {job.req for job in self.jobs if not job.released}
        due = {req for req in self.expected & self.finished if req not in held} - self.reported
        assert sending == due, (sending, due, held)
        self.reported |= sending
        self.load_errors |= self.engine.take_load_errors()
        for req in receiving:
            assert req in self.loads, f"{req} reported loaded but never submitted"
            assert self.loads.pop(req) <= self.load_errors, (req, self.load_errors)

    # -- invariants --------------------------------------------------------------------------------------
    @invariant()
    def holds_match_the_model(self):
        with self.lock:
            for req in REQUESTS:
                held = any(job.req == req and not job.released for job in self.jobs)
                assert self.engine.holding(req) == held, (req, held, self._describe())

    @invariant()
    def cancelled_jobs_never_commit(self):
        assert not any(job.cancelled and job.committed for job in self.jobs), self._describe()

    @invariant()
    def inflight_bytes_are_bounded_and_exact(self):
        with self.lock:
            expected = sum(job.nbytes for job in self.jobs if not job.ended)
        assert self.engine.stats["inflight_save_bytes"] == expected <= MAX_BYTES, \
            (self.engine.stats["inflight_save_bytes"], expected, self._describe())

    def teardown(self):
        for job in self.jobs:
            for gate in job.gates.values():
                gate.set()
        self.engine.close(timeout_s=SETTLE_S)
        for thread in self.engine._threads:
            assert not thread.is_alive(), f"{thread.name} did not stop"
        assert self.engine.idle()


TestTransferLifecycle = TransferLifecycle.TestCase
TestTransferLifecycle.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_copy_past_its_timeout_is_released_to_the_engine_and_never_committed():
    """cancel() gives up on a copy that runs past copy_timeout_s: the blocks go back to the engine, so
    what the copy read may be garbage, and end_copy refuses to let the job commit it."""
    engine = TransferEngine(max_inflight_bytes=MAX_BYTES, copy_timeout_s=0.2, on_error=lambda kind, error: None)
    in_copy, leave_copy, outcome = threading.Event(), threading.Event(), []

    def run(job):
        job.start_copy()
        in_copy.set()
        leave_copy.wait()
        try:
            job.end_copy()
            outcome.append("committed")
        except Cancelled:
            outcome.append("cancelled")
            raise
    try:
        engine.expect(["r"])
        assert engine.submit_save("r", 10, run)
        assert in_copy.wait(SETTLE_S)
        assert engine.holding("r")
        engine.cancel(["r"])                      # returns after copy_timeout_s, the copy still running
        assert not engine.holding("r") and engine.stats["saves_cancelled"] == 1
        assert engine.finished({"r"}) == ({"r"}, set())
        leave_copy.set()
        assert engine.wait_idle(SETTLE_S)
        assert outcome == ["cancelled"]
    finally:
        leave_copy.set()
        engine.close()


def test_an_idle_engine_waits_for_progress_instead_of_spinning():
    """wait_progress returns at once when nothing is awaited, returns when a load ends (not at its
    timeout), and gives up at its timeout when the load does not end."""
    engine = TransferEngine(on_error=lambda kind, error: None)
    gate = threading.Event()
    try:
        started = time.monotonic()
        engine.wait_progress(SETTLE_S)                     # nothing pending: no wait at all
        assert time.monotonic() - started < SETTLE_S / 2
        engine.submit_load("l", [7], lambda: (gate.wait(), set())[1])
        engine.wait_progress(0.05)                         # the load is parked: the timeout ends the wait
        assert engine.pending_loads() == 1
        threading.Thread(target=gate.set).start()
        engine.wait_progress(SETTLE_S)                     # returns when the load ended
        assert engine.finished(set()) == (set(), {"l"})
    finally:
        gate.set()
        engine.close()
