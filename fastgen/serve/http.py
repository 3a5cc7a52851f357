"""A small HTTP front end for a :class:`~fastgen.serve.queue.RequestQueue`, on the standard library only.

``ThreadingHTTPServer`` gives one thread per connection; each handler thread submits its request(s) to the
queue and blocks on the future, so concurrent clients are batched together by the queue's single worker,
and PNG encoding happens in the handler threads, off the device worker.

Endpoints:

* ``GET /health`` -> 200 ``{"status": "ok", "pending": n, "stats": {...}, **info}`` (503 with
  ``"status": "closed"`` once the queue is closed, so a load balancer stops routing here).
* ``POST /generate`` with one JSON request object (:meth:`SampleRequest.from_dict`) -> the PNG
  (``image/png``, headers ``X-Seed`` and ``X-Batch-Size``); with ``"format": "base64"`` in the body or
  ``?format=base64`` -> ``{"image": "<base64 png>", "seed": s, "batch_size": b}``.
  ``{"requests": [obj, ...]}`` -> ``{"images": [...], "seeds": [...], "batch_sizes": [...]}`` (base64; each
  request is submitted separately so it batches with other clients'). All of them are validated before any
  is submitted; a bad one fails the whole call with 400 naming its index.

Errors are ``{"error": "message"}``: 400 malformed JSON, bad fields, or a ``ValueError`` / ``TypeError``
from validation or from the run; 404 unknown path; 405 wrong method; 411 no ``Content-Length``; 413 body
over ``max_body_bytes``; 503 queue full or closed (with ``Retry-After: 1``); 504 request timed out in the
queue; 500 anything else. Tracebacks go to the log, never to the client.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from ..pipelines.request import SampleRequest, SampleResult
from .encoding import png_base64, png_bytes
from .queue import QueueClosed, QueueFull, RequestQueue, RequestTimeout

logger = logging.getLogger(__name__)

_FORMATS = ("png", "base64")
# An over-long body is read and discarded up to this many times the limit before answering 413: closing a
# socket with unread input makes the kernel reset the connection, and the client would miss the 413.
_DRAIN_FACTOR = 16


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _error_for(exc: BaseException) -> _HTTPError:
    """The HTTP status for an exception raised by submitting or running a request."""
    if isinstance(exc, (QueueFull, QueueClosed)):
        return _HTTPError(503, str(exc), {"Retry-After": "1"})
    if isinstance(exc, RequestTimeout):
        return _HTTPError(504, str(exc))
    if isinstance(exc, (ValueError, TypeError)):
        return _HTTPError(400, str(exc))
    if isinstance(exc, concurrent.futures.CancelledError):
        return _HTTPError(503, "the request was cancelled", {"Retry-After": "1"})
    return _HTTPError(500, f"{type(exc).__name__}: {exc}")


class _Handler(BaseHTTPRequestHandler):
    server_version = "fastgen"
    timeout = 60  # seconds a client may stall mid-request before its thread gives up on it
    sample_server: "SampleServer"  # set on the per-server subclass

    # -------------------------------------------------------------- routing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    _ROUTES = {"/health": ("GET", "_health"), "/generate": ("POST", "_generate")}

    def _dispatch(self, method: str) -> None:
        self._body_handled = False
        try:
            split = urlsplit(self.path)
            route = self._ROUTES.get(split.path.rstrip("/") or "/")
            if route is None:
                raise _HTTPError(404, f"unknown path {split.path!r}; try GET /health or POST /generate")
            allowed, handler = route
            if method != allowed:
                raise _HTTPError(405, f"{split.path} takes {allowed}, not {method}", {"Allow": allowed})
            getattr(self, handler)(parse_qs(split.query))
        except _HTTPError as exc:
            self._skip_unread_body()
            self._send_error_json(exc.status, str(exc), exc.headers)
        except (ConnectionError, TimeoutError) as exc:  # broken pipe, reset, socket timeout: nobody to answer
            logger.debug("client went away: %s", exc)
        except Exception as exc:
            logger.exception("error serving %s %s", method, self.path)
            self._skip_unread_body()
            self._send_error_json(500, f"{type(exc).__name__}: {exc}")

    # -------------------------------------------------------------- endpoints

    def _health(self, query: Dict[str, List[str]]) -> None:
        server = self.sample_server
        closed = server.queue.closed
        body = {"status": "closed" if closed else "ok", "pending": server.queue.pending,
                "stats": server.queue.stats(), **server.info}
        self._send_json(503 if closed else 200, body)

    def _generate(self, query: Dict[str, List[str]]) -> None:
        data = self._read_json()
        if not isinstance(data, dict):
            raise _HTTPError(400, f"the body must be a JSON object, got {type(data).__name__}")
        fmt = data.pop("format", None)
        if fmt is None and query.get("format"):
            fmt = query["format"][-1]
        if fmt is not None and fmt not in _FORMATS:
            raise _HTTPError(400, f"format must be one of {', '.join(_FORMATS)}, got {fmt!r}")

        if "requests" in data:
            self._generate_many(data, fmt)
            return
        try:
            request = SampleRequest.from_dict(data)
            self.sample_server.queue.check(request)
        except (ValueError, TypeError) as exc:
            raise _HTTPError(400, str(exc))
        result = self._wait(self._submit(request))
        if fmt == "base64":
            self._send_json(200, {"image": png_base64(result), "seed": result.request.seed,
                                  "batch_size": result.batch_size})
        else:
            self._send(200, png_bytes(result), "image/png",
                       {"X-Seed": str(result.request.seed), "X-Batch-Size": str(result.batch_size)})

    def _generate_many(self, data: Dict[str, Any], fmt: Optional[str]) -> None:
        extra = sorted(set(data) - {"requests"})
        if extra:
            raise _HTTPError(400, f"unknown field(s) {', '.join(map(repr, extra))} beside 'requests'")
        if fmt == "png":
            raise _HTTPError(400, "a body with 'requests' returns JSON: use format 'base64'")
        items = data["requests"]
        if not isinstance(items, list) or not items:
            raise _HTTPError(400, "'requests' must be a non-empty list of request objects")
        limit = self.sample_server.queue.max_pending
        if len(items) > limit:
            raise _HTTPError(400, f"{len(items)} requests in one call, over the queue's max_pending={limit}")
        requests = []
        for i, obj in enumerate(items):
            try:
                request = SampleRequest.from_dict(obj)
                self.sample_server.queue.check(request)
            except (ValueError, TypeError) as exc:
                raise _HTTPError(400, f"requests[{i}]: {exc}")
            requests.append(request)
        futures: List[concurrent.futures.Future] = []
        try:
            for request in requests:
                futures.append(self._submit(request))
            results = [self._wait(future) for future in futures]
        except _HTTPError:
            for future in futures:  # the call failed as a whole: free the queue of the rest
                future.cancel()
            raise
        self._send_json(200, {"images": [png_base64(r) for r in results],
                              "seeds": [r.request.seed for r in results],
                              "batch_sizes": [r.batch_size for r in results]})

    def _submit(self, request: SampleRequest) -> concurrent.futures.Future:
        try:
            return self.sample_server.queue.submit(request, timeout_s=self.sample_server.request_timeout_s)
        except Exception as exc:
            raise _error_for(exc) from exc

    @staticmethod
    def _wait(future: concurrent.futures.Future) -> SampleResult:
        try:
            # The queue completes every accepted future (result, error, timeout or close), so no timeout here.
            return future.result()
        except Exception as exc:
            raise _error_for(exc) from exc

    # -------------------------------------------------------------- I/O

    def _read_json(self) -> Any:
        self._body_handled = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HTTPError(411, "chunked bodies are not supported: send a Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            raise _HTTPError(411, "POST needs a Content-Length header")
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _HTTPError(400, f"bad Content-Length {raw_length!r}")
        limit = self.sample_server.max_body_bytes
        if length > limit:
            self.close_connection = True
            if length <= limit * _DRAIN_FACTOR:
                self._discard(length)
            raise _HTTPError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise _HTTPError(400, f"request body ended after {len(body)} of {length} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HTTPError(400, f"malformed JSON body: {exc}")

    def _skip_unread_body(self) -> None:
        """Read away a body no handler read (a 404 or 405 to a POST) before answering, so the answer is not
        lost to a connection reset."""
        if self._body_handled:
            return
        self._body_handled = True
        self.close_connection = True
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < length <= self.sample_server.max_body_bytes * _DRAIN_FACTOR:
            self._discard(length)

    def _discard(self, length: int) -> None:
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError as exc:  # a stalled or vanished client: the error answer is best effort anyway
            logger.debug("could not read away the body: %s", exc)

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj, default=str).encode("utf-8"), "application/json", headers)

    def _send_error_json(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        try:
            self._send_json(status, {"error": message}, headers)
        except OSError as exc:
            logger.debug("client went away before the %d answer: %s", status, exc)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        # The base class answers malformed requests and unknown methods in HTML; keep every error JSON.
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._send_error_json(code, text)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


class SampleServer:
    """Serves a :class:`RequestQueue` of :class:`SampleRequest` over HTTP (see the module docstring).

    The socket is bound on construction (``port=0`` picks a free port, see :attr:`url`). ``info`` is merged
    into the ``/health`` answer; ``request_timeout_s`` is each request's queue-wait limit (``None``: the
    queue's default). :meth:`shutdown` stops the server but leaves the queue open: the caller owns it."""

    def __init__(self, queue: RequestQueue, *, host: str = "127.0.0.1", port: int = 0,
                 info: Optional[Dict[str, Any]] = None, request_timeout_s: Optional[float] = None,
                 max_body_bytes: int = 64 * 1024):
        self.queue = queue
        self.info = dict(info or {})
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        handler = type("SampleHandler", (_Handler,), {"sample_server": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None
        self._serving = False
        self._lock = threading.Lock()

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> "SampleServer":
        """Serve in a daemon thread; returns self."""
        with self._lock:
            if self._thread is None:
                self._serving = True
                self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                                name="fastgen-http", daemon=True)
                self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`shutdown` (from another thread) or KeyboardInterrupt."""
        with self._lock:
            self._serving = True
        try:
            self._httpd.serve_forever(poll_interval=0.1)
        finally:
            self._httpd.server_close()

    def shutdown(self) -> None:
        """Stop serving and close the socket; idempotent. Requests in flight finish on their threads."""
        with self._lock:
            serving, self._serving = self._serving, False
            thread, self._thread = self._thread, None
        if serving:
            self._httpd.shutdown()  # blocks until serve_forever returns; only safe when it was started
        if thread is not None:
            thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "SampleServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
