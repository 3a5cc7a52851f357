"""Scale-out serving as a Ray Serve deployment: each replica owns one BatchSampler, and Ray's own request
batching, HTTP proxy and autoscaling do the rest.

How the pieces map onto Ray Serve:

* **Replica = one device + one sampler.** :class:`SamplerReplica` builds its sampler once, in its constructor.
  On CUDA each replica reserves one GPU (``ray_actor_options={"num_gpus": 1}``), so Ray places one replica per
  GPU and sets ``CUDA_VISIBLE_DEVICES`` for it; on the CPU it reserves one core.
* **Ray batches requests per replica.** Every call goes through a ``@serve.batch`` queue sized by
  ``max_batch_size`` / ``batch_wait_timeout_s``; the batch runs on a worker thread so the replica keeps
  accepting (and queueing) requests while the device is busy. Requests the model cannot serve are refused
  before they join a batch, so they fail alone.
* **Ray's proxy does HTTP.** ``GET /`` is a health check, ``POST /`` with one JSON request returns a PNG (or
  base64 JSON). Python callers use a ``DeploymentHandle`` and ``handle.generate.remote({...})``.
* **Autoscaling by ongoing requests.** By default the deployment scales between 1 replica and one per GPU in
  the cluster, aiming at about one full batch in flight per replica.

Across machines: start a cluster with ``ray start --head`` on one machine and ``ray start --address=HEAD:6379``
on the others, then run ``fastgen serve --model DIR --ray`` on any of them. :func:`run` calls ``ray.init()``,
which joins the cluster this machine belongs to (``address="auto"`` insists on one; with no cluster, a
local Ray instance is started) and Serve spreads the replicas over the cluster's GPUs.

Ray is an optional dependency (``pip install 'fastgen[serve]'``); it is imported only when used.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from typing import Any, Callable, List, Optional, Union

from ..pipelines.request import SampleRequest, SampleResult

DEFAULT_SAMPLER_FACTORY = "fastgen.pipelines:load_sampler"


def _import_serve():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError("serving with Ray needs ray[serve]: pip install 'fastgen[serve]'") from exc
    return ray, serve


def _load_factory(path: str) -> Callable:
    """``"package.module:function"`` -> the function."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"sampler_factory must look like 'package.module:function', got {path!r}")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"sampler_factory {path!r} is not a callable")
    return factory


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SamplerReplica:
    """One Serve replica: one sampler on one device behind a Ray batch queue.

    ``sampler_factory`` is an import path (a string, so the deployment pickles cleanly to any machine) of a
    callable ``factory(model_dir, *, max_batch_size, device) -> sampler``, where ``sampler(requests)`` returns
    one :class:`SampleResult` per request, in order, and ``sampler.check(request)`` raises ``ValueError`` for
    a request the model cannot serve. ``device=None`` picks CUDA when this replica sees a GPU.
    """

    def __init__(self, model_dir: str, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 device: Optional[str] = None, sampler_factory: str = DEFAULT_SAMPLER_FACTORY):
        _, serve = _import_serve()
        self.model_dir = str(model_dir)
        self.device = device or _default_device()
        self._sampler = _load_factory(sampler_factory)(self.model_dir, max_batch_size=max_batch_size,
                                                        device=self.device)
        self.max_batch_size = int(getattr(self._sampler, "max_batch_size", max_batch_size))
        # Batching the bound method here (rather than decorating the class) gives each replica its own queue,
        # sized by the constructor's arguments; Ray calls it as a plain function with the list of requests.
        self._batched = serve.batch(max_batch_size=self.max_batch_size,
                                    batch_wait_timeout_s=batch_wait_timeout_s)(self._run_batch)

    def _validate(self, request: Union[dict, SampleRequest]) -> SampleRequest:
        """The request as a :class:`SampleRequest` the model can serve, or ``ValueError``."""
        if not isinstance(request, SampleRequest):
            try:
                request = SampleRequest.from_dict(request)
            except TypeError as exc:  # wrong field types: the caller's fault, like a bad value
                raise ValueError(str(exc)) from exc
        self._sampler.check(request)
        return request

    async def _run_batch(self, requests: List[SampleRequest]) -> List[Union[SampleResult, Exception]]:
        # The sampler blocks for the whole forward pass; a thread keeps the replica's event loop free to
        # queue the next batch. Ray runs one batch at a time (max_concurrent_batches=1), so the sampler is
        # never called concurrently.
        try:
            return await asyncio.to_thread(self._sampler, requests)
        except Exception as exc:
            if len(requests) == 1:
                return [exc]
        # The batch failed as a whole: run its requests alone so one bad request does not fail the others.
        return await asyncio.to_thread(self._run_one_by_one, requests)

    def _run_one_by_one(self, requests: List[SampleRequest]) -> List[Union[SampleResult, Exception]]:
        results: List[Union[SampleResult, Exception]] = []
        for request in requests:
            try:
                results.append(self._sampler([request])[0])
            except Exception as exc:
                results.append(exc)
        return results

    async def _sample(self, request: SampleRequest) -> SampleResult:
        # Ray hands each caller its item of the returned list as a value, even when that item is an exception
        # (ray/serve/batching.py, _BatchQueue._assign_func_results), so raise it here for this caller alone.
        result = await self._batched(request)
        if isinstance(result, BaseException):
            raise result
        return result

    async def generate(self, request: Union[dict, SampleRequest]) -> SampleResult:
        """One image for one request (a dict as in the HTTP API, or a :class:`SampleRequest`); raises
        ``ValueError`` for a malformed request or one the model cannot serve."""
        return await self._sample(self._validate(request))

    def health(self) -> dict:
        """What ``GET /`` answers; also callable through a handle."""
        return {"status": "ok", "model": self.model_dir, "device": str(self.device),
                "max_batch_size": self.max_batch_size}

    async def __call__(self, http_request):
        """HTTP: ``GET`` -> health JSON; ``POST`` one JSON request object, optionally with
        ``"format": "base64"`` -> ``image/png`` bytes, or JSON ``{"image": <base64 PNG>, ...}``.
        Malformed or unservable requests get 400 ``{"error": ...}``, failures while sampling 500."""
        from starlette.responses import JSONResponse, Response

        from .encoding import png_base64, png_bytes

        if http_request.method == "GET":
            return JSONResponse(self.health())
        if http_request.method != "POST":
            return JSONResponse({"error": f"method {http_request.method} not allowed; use GET or POST"},
                                status_code=405)
        try:
            try:
                body: Any = json.loads(await http_request.body())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"the body is not valid JSON: {exc}") from exc
            fmt = body.pop("format", "png") if isinstance(body, dict) else "png"
            if fmt not in ("png", "base64"):
                raise ValueError(f"format must be 'png' or 'base64', got {fmt!r}")
            request = self._validate(body)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:
            return _server_error(exc)
        try:
            result = await self._sample(request)
            if fmt == "png":
                return Response(png_bytes(result), media_type="image/png")
            return JSONResponse({"image": png_base64(result), "media_type": "image/png",
                                 "request": result.request.to_dict(), "batch_size": result.batch_size})
        except Exception as exc:
            return _server_error(exc)


def _server_error(exc: Exception):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)


def _cluster_gpus(ray) -> int:
    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def build_app(model_dir, *, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
              num_replicas: Optional[int] = None, autoscaling: Optional[dict] = None,
              device: Optional[str] = None, sampler_factory: str = DEFAULT_SAMPLER_FACTORY):
    """A bound Serve application of :class:`SamplerReplica`, ready for ``serve.run``.

    ``num_replicas`` fixes the replica count; otherwise ``autoscaling`` (Ray's ``autoscaling_config``) is
    used, by default ``{"min_replicas": 1, "max_replicas": <GPUs in the cluster, or 1>,
    "target_ongoing_requests": max_batch_size}``. ``device=None`` means CUDA when the Ray cluster (or, before
    Ray is started, this machine) has GPUs; each CUDA replica then reserves one GPU, a CPU replica one core.
    """
    ray, serve = _import_serve()
    if num_replicas is not None and autoscaling is not None:
        raise ValueError("give num_replicas or autoscaling, not both")
    gpus = _cluster_gpus(ray)
    if device is None:
        device = "cuda" if gpus > 0 else "cpu"
    on_cuda = str(device).startswith("cuda")
    options: dict = {
        "ray_actor_options": {"num_gpus": 1} if on_cuda else {"num_cpus": 1},
        # Room for a full batch running plus a full one queued behind it; a smaller limit would keep Ray's
        # batch queue from ever filling (Ray warns about exactly that).
        "max_ongoing_requests": 2 * max_batch_size,
    }
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    else:
        options["autoscaling_config"] = autoscaling if autoscaling is not None else {
            "min_replicas": 1, "max_replicas": max(1, gpus) if on_cuda else 1,
            "target_ongoing_requests": max_batch_size}
    deployment = serve.deployment(SamplerReplica, name="fastgen-sampler").options(**options)
    return deployment.bind(str(model_dir), max_batch_size=max_batch_size,
                           batch_wait_timeout_s=batch_wait_timeout_s, device=device,
                           sampler_factory=sampler_factory)


def run(model_dir, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
        address: Optional[str] = None, **kwargs):
    """Serve ``model_dir`` over HTTP at ``http://host:port/`` through Ray Serve and return the
    ``DeploymentHandle``; ``kwargs`` go to :func:`build_app`. ``address`` goes to ``ray.init`` (``None`` joins
    the cluster this machine belongs to, else starts a local one; ``"auto"`` requires a running cluster).
    With ``blocking``, waits until Ctrl-C and then shuts Serve down."""
    ray, serve = _import_serve()
    if not ray.is_initialized():
        ray.init(address=address)
    app = build_app(model_dir, **kwargs)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app, route_prefix="/")
    if blocking:
        try:
            while True:
                time.sleep(10)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
