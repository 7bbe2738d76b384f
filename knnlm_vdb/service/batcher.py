"""Group concurrent requests into one LM forward and one search batch.

Request threads put jobs on a queue and wait; one worker thread takes the first job, keeps
collecting for up to ``max_wait_s`` or until ``max_batch`` jobs, then runs them together.
The worker is also the only thread that touches the encoder for scoring (its key hook
keeps per-call state), and it holds ``lock`` while it works so that appends, which need
the same encoder and stores, take turns with it. A job whose deadline has passed, or
whose caller gave up, is dropped before it is computed.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from knnlm_vdb.errors import BackendUnavailable
from knnlm_vdb.service.scoring import Job, Scorer
from knnlm_vdb.service.status import DeadlineExceeded

log = logging.getLogger(__name__)

__all__ = ["Batcher", "DeadlineExceeded", "ShuttingDown", "Ticket"]


class ShuttingDown(BackendUnavailable):
    """The batcher stopped before the request ran (UNAVAILABLE: another replica can answer)."""


@dataclass
class Ticket:
    """A caller's handle on a queued job."""

    job: Job
    deadline: float | None  # time.monotonic() value, or None for no deadline
    queued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class Batcher:
    """A queue and a worker thread in front of a ``Scorer``."""

    def __init__(self, scorer: Scorer, max_batch: int = 32, max_wait_s: float = 0.005,
                 lock: threading.RLock | None = None, metrics=None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.scorer, self.max_batch, self.max_wait_s = scorer, max_batch, max(0.0, max_wait_s)
        self.lock = lock or threading.RLock()
        self.metrics = metrics  # service.metrics.Metrics, or None
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._closed = False
        self._running: list[Ticket] = []  # the batch being computed, for an abandoning close()
        self._running_lock = threading.Lock()
        self.batches = 0  # batches run
        self.jobs = 0  # jobs computed
        self.expired = 0  # jobs dropped uncomputed: deadline passed or caller gone
        self._thread = threading.Thread(target=self._work, name="knnlm-batcher", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, job: Job, timeout: float | None = None) -> Job:
        """Queue ``job`` and wait for it; ``timeout`` is the caller's remaining deadline in seconds."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        ticket = Ticket(job, None if timeout is None else time.monotonic() + timeout)
        self._queue.put(ticket)
        if not ticket.done.wait(timeout):
            ticket.cancelled = True  # the worker skips it if it has not started it yet
            raise DeadlineExceeded(f"no result within the deadline ({timeout:.3f}s)")
        if ticket.error is not None:
            raise ticket.error
        return job

    def close(self, timeout: float | None = None) -> bool:
        """Refuse the queued jobs, give the running batch up to ``timeout`` seconds, stop the worker.

        -> whether the worker stopped in time. A batch still running after ``timeout`` (an LM
        forward cannot be interrupted) is abandoned: the worker is a daemon thread, and its
        callers are answered ShuttingDown now, so shutdown never waits on it past the grace.
        """
        self._closed = True
        self._refuse_queued()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("a batch was still running at the end of the grace period; abandoning it")
            with self._running_lock:
                for t in self._running:
                    t.error = ShuttingDown("the server shut down while the request was computed")
                    t.done.set()
            return False
        return True

    def _refuse_queued(self) -> None:
        while True:
            try:
                t = self._queue.get_nowait()
            except queue.Empty:
                return
            if t is not None:
                t.error = ShuttingDown("the server is shutting down")
                t.done.set()

    def _collect(self, first: Ticket) -> tuple[list[Ticket], bool]:
        batch, stop = [first], False
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                t = self._queue.get(timeout=max(0.0, until - time.monotonic())) if self.max_wait_s else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if t is None:
                stop = True
                break
            batch.append(t)
        return batch, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            now = time.monotonic()
            live = []
            for t in batch:
                if t.cancelled or t.expired(now):
                    self.expired += 1
                    if self.metrics is not None:
                        self.metrics.expired.inc()
                    t.error = DeadlineExceeded("the deadline passed before the request was computed")
                    t.done.set()
                else:
                    live.append(t)
            if not live:
                continue
            with self._running_lock:
                self._running = live
            if self.metrics is not None:
                self.metrics.batch_jobs.observe(len(live))
                for t in live:
                    self.metrics.batch_wait.observe(now - t.queued)
            try:
                with self.lock:
                    errors = self.scorer.run([t.job for t in live])
            except BaseException as exc:  # a bug or OOM: fail this batch, keep serving the next
                log.exception("a batch of %d requests failed", len(live))
                errors = {i: exc for i in range(len(live))}
            self.batches += 1
            self.jobs += len(live)
            with self._running_lock:
                self._running = []
                for i, t in enumerate(live):
                    if not t.done.is_set():  # not answered already by an abandoning close()
                        t.error = errors.get(i)
                        t.done.set()
        self._refuse_queued()  # anything queued after the stop marker: refuse rather than leave callers waiting
