"""``fastgen serve``: a diffusion model folder behind HTTP on this machine, or scaled out on Ray Serve."""

from __future__ import annotations

import signal
import sys
import threading


def _fail(exc: BaseException) -> int:
    print(f"fastgen serve: {exc}", file=sys.stderr)
    return 2


def _cmd_serve(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda asked for, but torch sees no CUDA device")
    if args.max_batch_size < 1 or args.max_pending < 1 or args.max_wait_ms < 0:
        return _fail("--max-batch-size and --max-pending must be >= 1 and --max-wait-ms >= 0")
    if args.ray:
        return _serve_ray(args)
    from .io import CheckpointError
    from .pipelines import load_sampler
    from .serve import RequestQueue, SampleServer

    try:
        sampler = load_sampler(args.model, max_batch_size=args.max_batch_size, device=args.device,
                               cuda_graphs=False if args.no_cuda_graphs else None)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as exc:
        return _fail(exc)
    queue = RequestQueue(sampler, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         max_pending=args.max_pending, validate=sampler.check, batch_key=sampler.batch_key,
                         default_timeout_s=args.timeout_s)
    info = {"model": str(args.model), "device": str(sampler.pipe.device), "max_batch_size": args.max_batch_size,
            "conditioning": sampler.pipe.conditioning, "class_names": list(sampler.pipe.class_names),
            "cuda_graphs": sampler.cuda_graphs}
    try:
        server = SampleServer(queue, host=args.host, port=args.port, info=info)
    except OSError as exc:
        queue.close(drain=False)
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc}")
    stop = threading.Event()
    # SIGTERM (a supervisor stopping the server) ends it like Ctrl-C: stop accepting, finish what was accepted
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    print(f"fastgen serve: {server.url} (model {args.model}, {info['device']}, max batch {args.max_batch_size}); "
          "POST /generate, GET /health", flush=True)
    try:
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.shutdown()
        queue.close(drain=True, timeout_s=args.drain_timeout_s)
    stats = queue.stats()
    print(f"fastgen serve: stopped after {stats['completed']} images in {stats['batches']} batches", flush=True)
    return 0


def _serve_ray(args) -> int:
    try:
        from .serve.ray_app import run
    except ImportError as exc:
        return _fail(exc)
    try:
        run(args.model, host=args.host, port=args.port or 8000, blocking=True, address=args.ray_address,
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.max_wait_ms / 1000,
            num_replicas=args.replicas, device=args.device)
    except ImportError as exc:
        return _fail(exc)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a diffusion model over HTTP (request batching; --ray: scale out on Ray Serve)",
        description="Load a pipeline folder (fastgen train diffusion / quickstart's run/diffusion/model, or a "
                    "diffusers StableDiffusionPipeline folder) and answer POST /generate with a JSON request "
                    "({\"prompt\": ..., or \"class_label\": ..., \"seed\": 0, \"steps\": 20, \"guidance_scale\": 3}; "
                    "add \"format\": \"base64\" for JSON instead of PNG bytes) and GET /health. Single requests "
                    "are grouped into batches of up to --max-batch-size within --max-wait-ms.")
    p.add_argument("--model", required=True, help="the pipeline folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for batch-mates")
    p.add_argument("--max-pending", type=int, default=256, help="queued requests beyond this get HTTP 503")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="a request still queued after this long gets HTTP 504 (default: no limit)")
    p.add_argument("--drain-timeout-s", type=float, default=60.0,
                   help="on Ctrl-C / SIGTERM, how long to finish accepted requests")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the denoising loop eagerly on a GPU")
    ray = p.add_argument_group("Ray Serve (pip install 'fastgen[serve]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve: one replica per GPU, Ray's batching, proxy and autoscaling")
    ray.add_argument("--replicas", type=int, default=None, help="fixed replica count (default: autoscale)")
    ray.add_argument("--ray-address", default=None,
                     help="Ray cluster to join (default: this machine's cluster from `ray start`, or a local one)")
    p.set_defaults(func=_cmd_serve)
