"""A stand-in BatchSampler for the serving tests (queue, HTTP, Ray Serve; the Ray replicas import it through
``PYTHONPATH``).

Each image is the constant ``(seed % 1000) / 1000``, so a caller can tell its own result from its
batch-mates'. ``check`` refuses ``class_label`` "bad" / "unknown". In a batch, seed 13 raises ValueError,
seed 666 RuntimeError and ``class_label="boom"`` RuntimeError, as a sampler failing mid-batch would. Every
call's seeds are recorded; after ``block()`` the next call waits for ``release()``, so a test can hold the
worker and fill the queue deterministically."""

import threading
import time

import torch

from fastgen.pipelines.request import SampleResult

WAIT = 10.0  # the longest a blocked call waits for release()


class FakeSampler:
    def __init__(self, max_batch_size=8, *, delay_s=0.002, channels=3):
        self.max_batch_size = max_batch_size
        self.delay_s = delay_s
        self.channels = channels
        self.calls = []
        self.lock = threading.Lock()
        self.entered = threading.Event()
        self._gate = None

    def block(self):
        self._gate = threading.Event()
        self.entered.clear()

    def release(self):
        if self._gate is not None:
            self._gate.set()

    def check(self, request):
        if request.class_label in ("bad", "unknown"):
            raise ValueError(f"unknown class {request.class_label!r}")

    def __call__(self, requests):
        with self.lock:
            self.calls.append([r.seed for r in requests])
        self.entered.set()
        if self._gate is not None:
            assert self._gate.wait(WAIT), "test never released the sampler"
        time.sleep(self.delay_s)
        for r in requests:
            if r.seed == 13:
                raise ValueError("seed 13 is unlucky")
            if r.seed == 666:
                raise RuntimeError("the device caught fire")
            if r.class_label == "boom":
                raise RuntimeError("boom")
        return [SampleResult(torch.full((self.channels, r.height or 8, r.width or 8), (r.seed % 1000) / 1000), r,
                             len(requests)) for r in requests]

    def runs_of(self, seed):
        with self.lock:
            return sum(call.count(seed) for call in self.calls)

    def batch_sizes(self):
        with self.lock:
            return [len(call) for call in self.calls]


def make(model_dir, *, max_batch_size=8, device=None):
    """The factory the Ray replicas call (``sampler_factory="serve_fake_sampler:make"``)."""
    return FakeSampler(max_batch_size, channels=1)
