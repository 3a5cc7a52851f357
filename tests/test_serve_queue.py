"""RequestQueue: batching, backpressure, timeouts, cancellation, failure isolation and shutdown, driven by a
fake sampler whose images are the constant ``seed / 1000``, so each caller can check it got its own result.
Tests that need a deterministic queue state block the worker inside the sampler with an Event."""

import asyncio
import threading
import time

import pytest
import torch

from fastgen.pipelines.request import SampleRequest
from fastgen.serve.queue import QueueClosed, QueueFull, RequestQueue, RequestTimeout, WorkerError
from serve_fake_sampler import FakeSampler  # tests/, on pytest's path

WAIT = 10.0  # upper bound on any single wait; a correct queue answers in milliseconds


def wait_until(predicate, what):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture
def sampler():
    s = FakeSampler()
    yield s
    s.release()


@pytest.fixture
def make_queue(sampler):
    queues = []

    def make(**kwargs):
        kwargs.setdefault("max_wait_ms", 5)
        q = RequestQueue(kwargs.pop("run_batch", sampler), **kwargs)
        queues.append(q)
        return q

    yield make
    sampler.release()
    for q in queues:
        q.close(drain=False, timeout_s=WAIT)


def blocked_on(q, sampler, seed=999):
    """Submit one request and wait until the worker is stuck inside the sampler with it."""
    sampler.block()
    future = q.submit(SampleRequest(seed=seed))
    assert sampler.entered.wait(WAIT)
    return future


def check_result(result, seed):
    assert result.request.seed == seed
    assert torch.allclose(result.image, torch.full_like(result.image, seed / 1000))


def test_concurrent_submitters_get_their_own_results(make_queue, sampler):
    q = make_queue(max_batch_size=8, max_wait_ms=20)
    first = blocked_on(q, sampler, seed=999)
    seeds = list(range(100, 132))
    results, errors = {}, []
    barrier = threading.Barrier(len(seeds))

    def client(seed):
        try:
            barrier.wait(WAIT)
            results[seed] = q.submit(SampleRequest(seed=seed)).result(WAIT)
        except Exception as exc:  # reported below; an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    wait_until(lambda: q.pending == len(seeds) or errors, "all 32 submits")
    sampler.release()
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert sorted(results) == seeds
    for seed, result in results.items():
        check_result(result, seed)
        assert sampler.runs_of(seed) == 1  # none lost, none duplicated
    check_result(first.result(WAIT), 999)
    sizes = sampler.batch_sizes()
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == 33
    assert sizes[1:] == [8, 8, 8, 8]  # the worker was blocked while all 32 queued: full batches
    assert all(r.batch_size == 8 for r in results.values())


def test_batches_respect_max_batch_size_and_batch_key(make_queue, sampler):
    q = make_queue(max_batch_size=4)
    blocked_on(q, sampler, seed=999)
    futures = {}
    for i in range(1, 16):
        height = 8 if i % 3 else 16  # two batch keys, interleaved
        futures[100 + i] = q.submit(SampleRequest(seed=100 + i, height=height))
    sampler.release()
    for seed, f in futures.items():
        check_result(f.result(WAIT), seed)
    # The oldest request's key goes first, batch-mates in arrival order; the other key forms the next batch.
    assert sampler.calls[1:] == [[101, 102, 104, 105], [103, 106, 109, 112], [107, 108, 110, 111],
                                 [113, 114], [115]]
    for seed, f in futures.items():
        assert f.result(0).image.shape[1] == (8 if (seed - 100) % 3 else 16)


def test_max_wait_flushes_a_partial_batch(make_queue, sampler):
    q = make_queue(max_batch_size=8, max_wait_ms=150)
    start = time.monotonic()
    futures = [q.submit(SampleRequest(seed=s)) for s in (1, 2, 3)]
    for s, f in zip((1, 2, 3), futures):
        check_result(f.result(WAIT), s)
    assert time.monotonic() - start >= 0.14  # it did wait for batch-mates
    assert sampler.batch_sizes() == [3]


def test_a_request_that_waited_long_does_not_wait_again(make_queue, sampler):
    q = make_queue(max_batch_size=8, max_wait_ms=400)
    first = blocked_on(q, sampler)
    late = q.submit(SampleRequest(seed=5))
    time.sleep(0.45)  # longer than max_wait_ms: 'late' is due as soon as the worker is free
    sampler.release()
    first.result(WAIT)
    t0 = time.monotonic()
    check_result(late.result(WAIT), 5)
    assert time.monotonic() - t0 < 0.3


def test_max_batch_size_one_runs_one_by_one(make_queue, sampler):
    q = make_queue(max_batch_size=1)
    futures = {s: q.submit(SampleRequest(seed=s)) for s in range(1, 9)}
    for s, f in futures.items():
        result = f.result(WAIT)
        check_result(result, s)
        assert result.batch_size == 1
    assert sampler.batch_sizes() == [1] * 8


def test_validate_error_is_raised_in_the_caller(make_queue, sampler):
    q = make_queue(validate=sampler.check)
    with pytest.raises(ValueError, match="unknown class"):
        q.submit(SampleRequest(class_label="unknown"))
    assert q.pending == 0
    assert q.stats()["rejected"] == 1 and q.stats()["submitted"] == 0
    check_result(q.submit(SampleRequest(seed=3)).result(WAIT), 3)
    assert sampler.calls == [[3]]


def test_queue_full(make_queue, sampler):
    q = make_queue(max_pending=3)
    first = blocked_on(q, sampler)
    futures = [q.submit(SampleRequest(seed=s)) for s in (1, 2, 3)]
    with pytest.raises(QueueFull, match=r"3 requests pending.*max_pending=3"):
        q.submit(SampleRequest(seed=4))
    assert isinstance(QueueFull("x"), RuntimeError)
    sampler.release()
    first.result(WAIT)
    for s, f in zip((1, 2, 3), futures):
        check_result(f.result(WAIT), s)
    assert sampler.runs_of(4) == 0
    assert q.stats()["rejected"] == 1


def test_timeout_fails_the_request_without_running_it(make_queue, sampler):
    q = make_queue(default_timeout_s=WAIT)
    first = blocked_on(q, sampler)
    doomed = q.submit(SampleRequest(seed=7), timeout_s=0.05)
    patient = q.submit(SampleRequest(seed=8))  # default_timeout_s: plenty
    time.sleep(0.1)
    sampler.release()
    with pytest.raises(RequestTimeout, match=r"waited \d+\.\d+ s .* timeout of 0.05 s"):
        doomed.result(WAIT)
    assert isinstance(doomed.exception(), TimeoutError)
    check_result(patient.result(WAIT), 8)
    first.result(WAIT)
    assert sampler.runs_of(7) == 0
    assert q.stats()["timed_out"] == 1


def test_an_idle_worker_runs_a_request_at_its_deadline_instead_of_expiring_it(make_queue, sampler):
    # Waiting for batch-mates is the queue's choice: it must not time the request out.
    q = make_queue(max_wait_ms=60_000)
    start = time.monotonic()
    check_result(q.submit(SampleRequest(seed=9), timeout_s=0.05).result(WAIT), 9)
    assert time.monotonic() - start < 5  # woke for the deadline, not for max_wait_ms


def test_cancel_a_pending_request(make_queue, sampler):
    q = make_queue()
    first = blocked_on(q, sampler)
    victim = q.submit(SampleRequest(seed=21))
    other = q.submit(SampleRequest(seed=22))
    assert victim.cancel()
    assert q.pending == 1
    sampler.release()
    first.result(WAIT)
    check_result(other.result(WAIT), 22)
    assert victim.cancelled()
    assert sampler.runs_of(21) == 0
    assert q.stats()["cancelled"] == 1
    assert not first.cancel()  # already ran


def test_a_failing_request_does_not_fail_its_batch_mates(make_queue, sampler):
    q = make_queue(max_batch_size=8)
    first = blocked_on(q, sampler)
    futures = {s: q.submit(SampleRequest(seed=s)) for s in (11, 12, 13, 14)}
    sampler.release()
    first.result(WAIT)
    with pytest.raises(ValueError, match="unlucky"):
        futures[13].result(WAIT)
    for s in (11, 12, 14):
        result = futures[s].result(WAIT)
        check_result(result, s)
        assert result.batch_size == 1  # re-run alone
    assert sampler.calls[1:] == [[11, 12, 13, 14], [11], [12], [13], [14]]
    stats = q.stats()
    assert stats["failed"] == 1 and stats["rerun"] == 4 and stats["batches"] == 2


def test_wrong_length_results(make_queue, sampler):
    def drops_one_in_batches(requests):
        results = sampler(requests)
        return results[:-1] if len(results) > 1 else results

    q = make_queue(run_batch=drops_one_in_batches)
    first = blocked_on(q, sampler)
    futures = {s: q.submit(SampleRequest(seed=s)) for s in (1, 2, 3)}
    sampler.release()
    first.result(WAIT)
    for s, f in futures.items():
        check_result(f.result(WAIT), s)

    always_empty = make_queue(run_batch=lambda requests: [])
    with pytest.raises(RuntimeError, match="returned 0 results for 1 requests"):
        always_empty.submit(SampleRequest(seed=1)).result(WAIT)


def test_close_drain_completes_everything(make_queue, sampler):
    q = make_queue(max_batch_size=4, max_wait_ms=1000)
    futures = {s: q.submit(SampleRequest(seed=s)) for s in range(1, 11)}
    start = time.monotonic()
    q.close(drain=True, timeout_s=WAIT)
    assert time.monotonic() - start < 0.9  # draining does not wait for batch-mates
    for s, f in futures.items():
        check_result(f.result(0), s)
    with pytest.raises(QueueClosed):
        q.submit(SampleRequest(seed=99))
    q.close()  # idempotent
    assert q.closed


def test_close_without_drain_fails_the_pending(make_queue, sampler):
    q = make_queue()
    first = blocked_on(q, sampler)
    pending = [q.submit(SampleRequest(seed=s)) for s in (31, 32)]
    timer = threading.Timer(0.1, sampler.release)
    timer.start()
    try:
        q.close(drain=False, timeout_s=WAIT)
    finally:
        timer.cancel()
    check_result(first.result(0), 999)  # the running batch finished normally
    for f in pending:
        with pytest.raises(QueueClosed, match="closed before this request ran"):
            f.result(0)
    assert sampler.runs_of(31) == 0 and sampler.runs_of(32) == 0
    with pytest.raises(QueueClosed):
        q.submit(SampleRequest(seed=1))


def test_context_manager_drains(sampler):
    with RequestQueue(sampler, max_wait_ms=1) as q:
        futures = [q.submit(SampleRequest(seed=s)) for s in range(5)]
    assert q.closed
    assert [f.result(0).request.seed for f in futures] == list(range(5))


def test_base_exception_stops_the_worker_and_fails_everything(make_queue, sampler):
    def interrupted(requests):
        sampler(requests)
        raise KeyboardInterrupt

    q = make_queue(run_batch=interrupted, max_batch_size=1)
    first = blocked_on(q, sampler)
    queued = [q.submit(SampleRequest(seed=s)) for s in (1, 2)]
    sampler.release()
    for f in [first, *queued]:
        with pytest.raises(WorkerError, match="KeyboardInterrupt"):
            f.result(WAIT)
    with pytest.raises(QueueClosed):
        q.submit(SampleRequest(seed=3))
    assert sampler.runs_of(1) == 0


def test_submit_async_gathers(make_queue, sampler):
    q = make_queue(max_batch_size=8, max_wait_ms=200)  # full batches go at once; the wait only absorbs jitter
    seeds = range(100, 116)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(q.submit_async(SampleRequest(seed=s)) for s in seeds)),
                                      WAIT)

    results = asyncio.run(main())
    for s, result in zip(seeds, results):
        check_result(result, s)
    assert sum(sampler.batch_sizes()) == 16 and max(sampler.batch_sizes()) > 1


def test_cancelling_an_awaiting_task_cancels_the_request(make_queue, sampler):
    q = make_queue()
    first = blocked_on(q, sampler)

    async def main():
        task = asyncio.ensure_future(q.submit_async(SampleRequest(seed=41)))
        await asyncio.sleep(0.01)  # let it submit
        assert q.pending == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the cancel reaches the queue through loop callbacks
            if q.pending == 0:
                break
            await asyncio.sleep(0.001)

    asyncio.run(main())
    assert q.pending == 0
    sampler.release()
    first.result(WAIT)
    q.close(timeout_s=WAIT)
    assert sampler.runs_of(41) == 0
    assert q.stats()["cancelled"] == 1


def test_stats_add_up(make_queue, sampler):
    q = make_queue(max_batch_size=4, max_pending=6, validate=sampler.check)
    first = blocked_on(q, sampler)
    ok = [q.submit(SampleRequest(seed=s)) for s in (1, 2, 3)]
    bad = q.submit(SampleRequest(seed=13))
    late = q.submit(SampleRequest(seed=5), timeout_s=0.01)
    gone = q.submit(SampleRequest(seed=6))
    gone.cancel()
    with pytest.raises(ValueError):
        q.submit(SampleRequest(class_label="unknown"))
    time.sleep(0.05)
    sampler.release()
    for f in [first, *ok]:
        f.result(WAIT)
    with pytest.raises(ValueError):
        bad.result(WAIT)
    with pytest.raises(RequestTimeout):
        late.result(WAIT)
    q.close(timeout_s=WAIT)
    with pytest.raises(QueueClosed):
        q.submit(SampleRequest(seed=7))
    stats = q.stats()
    assert stats["submitted"] == 7
    assert (stats["completed"], stats["failed"], stats["timed_out"], stats["cancelled"]) == (4, 1, 1, 1)
    assert stats["submitted"] == (stats["completed"] + stats["failed"] + stats["timed_out"] + stats["cancelled"]
                                  + stats["pending"] + stats["running"])
    assert stats["rejected"] == 2
    # Batches formed: [999], then [1, 2, 3, 13] (re-run alone after 13 failed).
    assert stats["batch_sizes"] == {1: 1, 4: 1} and stats["batches"] == 2
    assert stats["mean_batch_size"] == 2.5
    assert stats["rerun"] == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_batch_size"):
        RequestQueue(lambda r: r, max_batch_size=0)
    with RequestQueue(lambda r: r) as q:
        with pytest.raises(ValueError, match="timeout_s"):
            q.submit(SampleRequest(), timeout_s=-1)
