"""Serving: a request-batching queue, an HTTP front end, and a Ray Serve deployment for scale-out.

* :class:`RequestQueue`: single requests from threads or asyncio, grouped into batches for one worker
  (a :class:`fastgen.pipelines.BatchSampler`, or any ``run_batch(requests) -> results``).
* :class:`SampleServer`: the queue over HTTP on localhost (``POST /generate``, ``GET /health``);
  ``fastgen serve --model DIR`` runs one.
* :mod:`fastgen.serve.ray_app`: ``build_app`` / ``run`` deploy one sampler per GPU on Ray Serve
  (``pip install 'fastgen[serve]'``; imported only when used).
"""

from .http import SampleServer
from .queue import QueueClosed, QueueFull, RequestQueue, RequestTimeout, WorkerError

__all__ = ["QueueClosed", "QueueFull", "RequestQueue", "RequestTimeout", "SampleServer", "WorkerError"]
