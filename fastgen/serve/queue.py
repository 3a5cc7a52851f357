"""A request-batching queue in front of one worker (one device).

Callers :meth:`RequestQueue.submit` single requests from any thread (or ``await``
:meth:`RequestQueue.submit_async`) and get a :class:`concurrent.futures.Future`; one daemon worker thread
groups compatible requests into batches and calls ``run_batch(requests) -> results`` (any callable, e.g. a
``fastgen.pipelines.BatchSampler``), so the device sees few large batches instead of many single images.

Semantics, and why:

* **Batch forming.** The worker takes the oldest pending request, then collects later requests with the same
  ``batch_key(request)`` (default: ``request.batch_key()`` when the request has one, else a single key), in
  arrival order, until ``max_batch_size`` or until ``max_wait_ms`` has passed since that oldest request was
  *submitted*. Counting from submission bounds the extra latency batching adds: a request that already
  waited behind a running batch does not wait again. Incompatible requests stay queued in arrival order and
  form the next batch, so no key can starve another. ``max_batch_size=1`` serves one by one.
* **Validation in the caller.** ``validate(request)`` and ``batch_key(request)`` run in :meth:`submit`, in the
  caller's thread: a bad request raises its own clear error there and is never queued, so it cannot fail a
  batch of good ones.
* **Backpressure.** With ``pending >= max_pending`` :meth:`submit` raises :class:`QueueFull` at once: a
  bounded queue turns overload into a fast, retryable refusal instead of unbounded latency and memory.
  After :meth:`close`, :meth:`submit` raises :class:`QueueClosed`.
* **Timeouts.** ``timeout_s`` (or ``default_timeout_s``) is the longest a request may wait *before its batch
  starts*; an expired request is completed with :class:`RequestTimeout` and never run (its caller has likely
  given up, so running it would only delay the others). Expiry is checked whenever the worker is free; a
  request that expires while a batch runs is failed when that batch ends. While the worker is idle, waiting
  for batch-mates, a request's deadline starts its batch instead: the queue's own waiting never times a
  request out. A request whose batch started always finishes normally.
* **Cancellation.** ``future.cancel()`` succeeds while the request is pending; it leaves the queue at once
  and is never run. The worker claims each request with ``set_running_or_notify_cancel()`` when it takes it
  into a batch, after which it can no longer be cancelled.
* **Failure isolation.** When ``run_batch`` raises, or returns a list of the wrong length, for a batch of
  several requests, each of them is re-run alone: only the failing request(s) get the exception, their
  batch-mates get their results. A single request's failure is set on its future.
* **Nothing is lost.** Every accepted future is completed exactly once: with its result, its exception, a
  cancellation, :class:`RequestTimeout`, :class:`QueueClosed` (``close(drain=False)``, or a drain that ran
  past its ``timeout_s``) or :class:`WorkerError`. The latter is set on every pending and running request
  when the worker thread itself fails or ``run_batch`` raises a ``BaseException`` (``KeyboardInterrupt``,
  ``SystemExit``); the worker then stops and the queue is closed, so no caller waits forever.

The queue is thread-safe and holds no global state. Futures are completed outside the queue's lock, so done
callbacks may call back into the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

logger = logging.getLogger(__name__)

_NO_DEADLINE = math.inf


class QueueFull(RuntimeError):
    """The queue holds ``max_pending`` requests already; retry later."""


class QueueClosed(RuntimeError):
    """The queue is closed: it accepts no more requests, or it closed before this request ran."""


class RequestTimeout(TimeoutError):
    """The request waited in the queue longer than its timeout and was not run."""


class WorkerError(RuntimeError):
    """The queue's worker thread stopped on an unexpected error; the cause is in ``__cause__``."""


def _default_batch_key(request: Any) -> Hashable:
    method = getattr(request, "batch_key", None)
    return method() if callable(method) else None


@dataclass(eq=False)
class _Item:
    seq: int
    request: Any
    key: Hashable
    future: concurrent.futures.Future
    submitted: float
    timeout_s: Optional[float]
    deadline: float = field(default=_NO_DEADLINE)


class RequestQueue:
    """Batches requests for ``run_batch`` on one daemon worker thread; see the module docstring.

    ``run_batch(list_of_requests) -> list_of_results`` (same length, same order). ``batch_key(request)``
    groups requests that may share a batch. ``validate(request)`` runs in :meth:`submit` and may raise.
    ``default_timeout_s`` is the queue-wait limit of requests submitted without ``timeout_s``.
    """

    def __init__(self, run_batch: Callable[[List[Any]], Sequence[Any]], *, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, max_pending: int = 256,
                 batch_key: Optional[Callable[[Any], Hashable]] = None,
                 validate: Optional[Callable[[Any], Any]] = None,
                 default_timeout_s: Optional[float] = None, name: str = "fastgen"):
        if not callable(run_batch):
            raise TypeError("run_batch must be callable")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self.default_timeout_s = self._check_timeout(default_timeout_s, "default_timeout_s")
        self.name = name
        self._batch_key = batch_key or _default_batch_key
        self._validate = validate

        self._cond = threading.Condition()
        # Insertion-ordered, so iteration is arrival order, and a cancelled request leaves it in O(1).
        self._pending: Dict[int, _Item] = {}
        self._running: Dict[int, _Item] = {}
        self._next_seq = 0
        self._closed = False
        self._counts = Counter()
        self._batch_sizes: Counter = Counter()

        self._thread = threading.Thread(target=self._worker, name=f"{name}-queue-worker", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API

    @property
    def pending(self) -> int:
        """Requests accepted and not yet taken into a batch."""
        with self._cond:
            return len(self._pending)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def check(self, request: Any) -> None:
        """Raise what :meth:`submit` would raise for this request's own faults (``validate``,
        ``batch_key``), without queueing it: lets a caller validate several requests before submitting any."""
        if self._validate is not None:
            self._validate(request)
        self._batch_key(request)

    def submit(self, request: Any, *, timeout_s: Optional[float] = None) -> concurrent.futures.Future:
        """Queue one request; the future completes with its result or exception (see the module docstring).

        Raises (and does not queue) what ``validate`` or ``batch_key`` raise, :class:`QueueFull` or
        :class:`QueueClosed`."""
        timeout_s = self._check_timeout(timeout_s, "timeout_s")
        if timeout_s is None:
            timeout_s = self.default_timeout_s
        try:
            if self._validate is not None:
                self._validate(request)
            key = self._batch_key(request)
        except BaseException:
            with self._cond:
                self._counts["rejected"] += 1
            raise
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                self._counts["rejected"] += 1
                raise QueueClosed(f"the {self.name} request queue is closed")
            if len(self._pending) >= self.max_pending:
                self._counts["rejected"] += 1
                raise QueueFull(f"the {self.name} request queue is full: {len(self._pending)} requests pending, "
                                f"limit max_pending={self.max_pending}; retry later")
            now = time.monotonic()
            item = _Item(self._next_seq, request, key, future, now, timeout_s,
                         _NO_DEADLINE if timeout_s is None else now + timeout_s)
            self._next_seq += 1
            self._pending[item.seq] = item
            self._counts["submitted"] += 1
            self._cond.notify_all()
        future.add_done_callback(lambda f, seq=item.seq: self._on_done(f, seq))
        return future

    async def submit_async(self, request: Any, *, timeout_s: Optional[float] = None) -> Any:
        """:meth:`submit`, awaited: returns the result or raises. Cancelling the awaiting task cancels the
        request if its batch has not started."""
        return await asyncio.wrap_future(self.submit(request, timeout_s=timeout_s))

    def close(self, *, drain: bool = True, timeout_s: Optional[float] = None) -> None:
        """Stop accepting requests. ``drain=True`` finishes everything pending (without waiting for more
        batch-mates); ``drain=False`` fails the pending requests with :class:`QueueClosed` (the running batch
        still finishes). Then joins the worker for up to ``timeout_s``; requests still pending after that get
        :class:`QueueClosed`. Idempotent."""
        with self._cond:
            self._closed = True
            dropped = [] if drain else self._take_pending_locked("failed")
            self._cond.notify_all()
        for item in dropped:
            item.future.set_exception(QueueClosed(f"the {self.name} request queue closed before this request ran"))
        if threading.current_thread() is self._thread:
            return  # called from a done callback on the worker: it exits on its own once the queue is empty
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._cond:
                late = self._take_pending_locked("failed")
            for item in late:
                item.future.set_exception(QueueClosed(
                    f"the {self.name} request queue did not drain within {timeout_s:g} s of close()"))

    def stats(self) -> dict:
        """Counters since creation. ``submitted`` = accepted requests = ``completed + failed + timed_out +
        cancelled + pending + running``; ``rejected`` = refused by :meth:`submit` (invalid, full or closed);
        ``batches`` / ``batch_sizes`` (size -> count) count the batches formed, not the re-runs of a failed
        batch's requests (``rerun``)."""
        with self._cond:
            batches = sum(self._batch_sizes.values())
            total = sum(size * n for size, n in self._batch_sizes.items())
            return {
                **{k: self._counts[k] for k in ("submitted", "completed", "failed", "timed_out", "cancelled",
                                                "rejected", "rerun")},
                "pending": len(self._pending),
                "running": len(self._running),
                "batches": batches,
                "mean_batch_size": total / batches if batches else 0.0,
                "batch_sizes": dict(sorted(self._batch_sizes.items())),
            }

    def __enter__(self) -> "RequestQueue":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        return (f"RequestQueue(name={self.name!r}, max_batch_size={self.max_batch_size}, "
                f"pending={self.pending}, closed={self.closed})")

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _check_timeout(value: Optional[float], what: str) -> Optional[float]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
            raise ValueError(f"{what} must be a number > 0 or None, got {value!r}")
        return float(value)

    def _on_done(self, future: concurrent.futures.Future, seq: int) -> None:
        # Only a cancel() from a caller can complete a request that is still in _pending.
        if not future.cancelled():
            return
        with self._cond:
            if self._pending.pop(seq, None) is not None:
                self._counts["cancelled"] += 1
                self._cond.notify_all()

    def _claim_locked(self, item: _Item) -> bool:
        """Take a pending request out of the queue; False if it was cancelled (it is dropped)."""
        del self._pending[item.seq]
        if item.future.set_running_or_notify_cancel():
            return True
        self._counts["cancelled"] += 1
        return False

    def _take_pending_locked(self, outcome: str) -> List[_Item]:
        """Claim every pending request, counting it as ``outcome``; the caller completes them."""
        taken = [item for item in list(self._pending.values()) if self._claim_locked(item)]
        self._counts[outcome] += len(taken)
        return taken

    def _candidates_locked(self) -> List[_Item]:
        """The batch the oldest pending request would start now, in arrival order."""
        head = next(iter(self._pending.values()))
        batch = []
        for item in self._pending.values():
            if item.key == head.key:
                batch.append(item)
                if len(batch) == self.max_batch_size:
                    break
        return batch

    def _expire_locked(self, now: float, keep: Sequence[_Item] = ()) -> List[_Item]:
        keep_ids = {item.seq for item in keep}
        expired = [item for item in self._pending.values()
                   if item.deadline <= now and item.seq not in keep_ids]
        claimed = [item for item in expired if self._claim_locked(item)]
        self._counts["timed_out"] += len(claimed)
        return claimed

    def _fail_expired(self, expired: List[_Item], now: float) -> None:
        for item in expired:
            item.future.set_exception(RequestTimeout(
                f"request waited {now - item.submitted:.3f} s in the {self.name} queue, over its timeout of "
                f"{item.timeout_s:g} s; it was not run"))

    def _next_batch(self) -> Optional[List[_Item]]:
        """Block until a batch is due and claim it; None once the queue is closed and empty."""
        worker_was_busy = True  # requests whose deadline passed while the last batch ran expire first
        with self._cond:
            while True:
                now = time.monotonic()
                expired = self._expire_locked(now) if worker_was_busy else []
                worker_was_busy = False
                if expired:
                    self._cond.release()  # complete futures without our lock (their callbacks may submit)
                    try:
                        self._fail_expired(expired, now)
                    finally:
                        self._cond.acquire()
                    continue
                if not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                batch = self._candidates_locked()
                # An idle worker starts a batch at its first deadline rather than let the request expire.
                flush_at = min(batch[0].submitted + self.max_wait_s, min(item.deadline for item in batch))
                due = self._closed or len(batch) == self.max_batch_size or now >= flush_at
                # Requests behind an incompatible batch expire as usual.
                expired = self._expire_locked(now, keep=batch)
                if expired:
                    self._cond.release()
                    try:
                        self._fail_expired(expired, now)
                    finally:
                        self._cond.acquire()
                    continue
                if due:
                    claimed = [item for item in batch if self._claim_locked(item)]
                    if not claimed:
                        continue
                    for item in claimed:
                        self._running[item.seq] = item
                    self._batch_sizes[len(claimed)] += 1
                    return claimed
                others = [item.deadline for item in self._pending.values() if item.deadline < flush_at]
                self._cond.wait(max(0.0, min([flush_at, *others]) - now))

    def _finish(self, item: _Item, result: Any = None, error: Optional[BaseException] = None) -> None:
        # Count before completing, so a caller that sees its result also sees consistent stats.
        with self._cond:
            if self._running.pop(item.seq, None) is None:
                return
            self._counts["failed" if error is not None else "completed"] += 1
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)

    def _run(self, items: List[_Item]) -> None:
        """Run one batch; on failure re-run its requests alone, so only the failing ones get the error."""
        try:
            results = list(self._run_batch([item.request for item in items]))
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} requests")
        except Exception as exc:
            if len(items) == 1:
                self._finish(items[0], error=exc)
                return
            logger.debug("%s queue: batch of %d failed (%s: %s); re-running each request alone",
                         self.name, len(items), type(exc).__name__, exc)
            with self._cond:
                self._counts["rerun"] += len(items)
            for item in items:
                self._run([item])
            return
        for item, result in zip(items, results):
            self._finish(item, result)

    def _worker(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as exc:  # noqa: B902 - any escape would leave callers waiting forever
            logger.error("%s queue worker stopped on %s: %s", self.name, type(exc).__name__, exc, exc_info=True)
            with self._cond:
                self._closed = True
                victims = list(self._running.values()) + self._take_pending_locked("failed")
                self._counts["failed"] += len(self._running)
                self._running.clear()
                self._cond.notify_all()
            for item in victims:
                error = WorkerError(f"the {self.name} queue worker stopped on {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                if not item.future.done():
                    item.future.set_exception(error)
