"""SampleServer over real sockets: a RequestQueue with a fake sampler behind it, whose images are the constant
``seed / 1000``, so each client can check it got its own picture."""

import base64
import http.client
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastgen.pipelines.request import SampleRequest
from fastgen.serve.http import SampleServer
from fastgen.serve.queue import RequestQueue
from serve_fake_sampler import FakeSampler  # tests/, on pytest's path

Image = pytest.importorskip("PIL.Image")

WAIT = 10.0  # every socket and wait is bounded by this


@pytest.fixture
def make_server():
    made = []

    def make(queue_kwargs=None, **server_kwargs):
        sampler = FakeSampler(max_batch_size=4)
        kwargs = {"max_batch_size": 4, "max_wait_ms": 5, "validate": sampler.check, **(queue_kwargs or {})}
        queue = RequestQueue(sampler, **kwargs)
        server = SampleServer(queue, info={"model": "fake", "max_batch_size": 4}, **server_kwargs).start()
        made.append((sampler, queue, server))
        return sampler, queue, server

    yield make
    for sampler, queue, server in made:
        sampler.release()
        server.shutdown()
        queue.close(drain=False, timeout_s=WAIT)


@pytest.fixture
def served(make_server):
    return make_server()


def call(server, method, path, body=None, headers=None):
    """-> (status, headers, body bytes)."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def error_of(status, headers, body):
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)["error"]


def check_png(data, seed, size=(8, 8)):
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == size
    lo, hi = image.convert("L").getextrema()
    assert lo == hi and abs(lo - seed / 1000 * 255) <= 1, (lo, hi, seed)


def test_health(served):
    _, queue, server = served
    assert server.url.startswith("http://127.0.0.1:")
    status, headers, body = call(server, "GET", "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["status"] == "ok" and data["pending"] == 0 and data["model"] == "fake"
    assert data["stats"]["submitted"] == 0


def test_generate_png(served):
    sampler, _, server = served
    status, headers, body = call(server, "POST", "/generate", {"seed": 200, "height": 16, "width": 24})
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert headers["X-Seed"] == "200" and headers["X-Batch-Size"] == "1"
    check_png(body, 200, size=(24, 16))
    assert sampler.calls == [[200]]


def test_generate_base64(served):
    _, _, server = served
    status, _, body = call(server, "POST", "/generate", {"seed": 400, "format": "base64"})
    assert status == 200
    data = json.loads(body)
    assert data["seed"] == 400 and data["batch_size"] == 1
    check_png(base64.b64decode(data["image"]), 400)

    status, _, body = call(server, "POST", "/generate?format=base64", {"seed": 600})
    assert status == 200
    check_png(base64.b64decode(json.loads(body)["image"]), 600)


def test_generate_many(served):
    sampler, _, server = served
    seeds = [100, 300, 500]
    status, _, body = call(server, "POST", "/generate",
                           {"requests": [{"seed": s} for s in seeds], "format": "base64"})
    assert status == 200
    data = json.loads(body)
    assert data["seeds"] == seeds and len(data["images"]) == 3
    for seed, image in zip(seeds, data["images"]):
        check_png(base64.b64decode(image), seed)


def test_generate_many_rejects_before_submitting_any(served):
    sampler, queue, server = served
    status, headers, body = call(server, "POST", "/generate",
                                 {"requests": [{"seed": 1}, {"seed": 2, "bogus": 3}], "format": "base64"})
    assert status == 400
    message = error_of(status, headers, body)
    assert "requests[1]" in message and "'bogus'" in message
    status, headers, body = call(server, "POST", "/generate",
                                 {"requests": [{"seed": 1}, {"class_label": "unknown"}]})
    assert status == 400 and "requests[1]" in error_of(status, headers, body)
    assert sampler.calls == [] and queue.stats()["submitted"] == 0


def test_concurrent_clients_get_their_own_images(served):
    sampler, _, server = served
    seeds = [100 + 50 * i for i in range(8)]
    barrier = threading.Barrier(len(seeds))

    def client(seed):
        barrier.wait(WAIT)
        return call(server, "POST", "/generate", {"seed": seed})

    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = list(pool.map(client, seeds, timeout=WAIT))
    for seed, (status, headers, body) in zip(seeds, answers):
        assert status == 200 and headers["X-Seed"] == str(seed)
        check_png(body, seed)
    assert sorted(s for c in sampler.calls for s in c) == seeds


def test_bad_json(served):
    _, _, server = served
    status, headers, body = call(server, "POST", "/generate", b"{not json")
    assert status == 400 and "malformed JSON" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/generate", [1, 2])
    assert status == 400 and "JSON object" in error_of(status, headers, body)


def test_bad_fields(served):
    _, _, server = served
    status, headers, body = call(server, "POST", "/generate", {"seed": 1, "colour": "red"})
    assert status == 400 and "'colour'" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/generate", {"seed": -1})
    assert status == 400 and "seed" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/generate", {"prompt": 5})  # TypeError in the request
    assert status == 400 and "prompt" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/generate", {"seed": 1, "format": "gif"})
    assert status == 400 and "format" in error_of(status, headers, body)


def test_validate_failure(served):
    sampler, _, server = served
    status, headers, body = call(server, "POST", "/generate", {"class_label": "unknown"})
    assert status == 400 and "unknown class" in error_of(status, headers, body)
    assert sampler.calls == []


def test_errors_from_the_run(served):
    _, _, server = served
    status, headers, body = call(server, "POST", "/generate", {"seed": 13})
    assert status == 400 and "unlucky" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/generate", {"seed": 666})
    message = error_of(status, headers, body)
    assert status == 500 and "RuntimeError: the device caught fire" in message
    assert "Traceback" not in message
    assert call(server, "GET", "/health")[0] == 200  # still serving


def background_call(server, body):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("answer", call(server, "POST", "/generate", body)))
    thread.start()
    return thread, result


def wait_until(predicate, what):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_full_queue_is_503(make_server):
    sampler, queue, server = make_server({"max_pending": 1})
    sampler.block()
    running, running_answer = background_call(server, {"seed": 100})
    assert sampler.entered.wait(WAIT)
    waiting, waiting_answer = background_call(server, {"seed": 200})
    wait_until(lambda: queue.pending == 1, "the second request to queue")
    status, headers, body = call(server, "POST", "/generate", {"seed": 300})
    assert status == 503 and headers["Retry-After"] == "1"
    assert "full" in error_of(status, headers, body)
    sampler.release()
    for thread in (running, waiting):
        thread.join(WAIT)
    assert running_answer["answer"][0] == 200 and waiting_answer["answer"][0] == 200


def test_closed_queue_is_503(served):
    _, queue, server = served
    queue.close()
    status, headers, body = call(server, "POST", "/generate", {"seed": 1})
    assert status == 503 and headers["Retry-After"] == "1" and "closed" in error_of(status, headers, body)
    assert call(server, "GET", "/health")[0] == 503


def test_timeout_is_504(make_server):
    sampler, queue, server = make_server(request_timeout_s=0.05)
    sampler.block()
    running, running_answer = background_call(server, {"seed": 100})
    assert sampler.entered.wait(WAIT)
    timer = threading.Timer(0.2, sampler.release)
    timer.start()
    try:
        status, headers, body = call(server, "POST", "/generate", {"seed": 200})
    finally:
        timer.cancel()
        sampler.release()
    assert status == 504 and "timeout of 0.05 s" in error_of(status, headers, body)
    running.join(WAIT)
    assert running_answer["answer"][0] == 200
    assert all(200 not in c for c in sampler.calls)


def test_unknown_path_and_wrong_method(served):
    _, _, server = served
    status, headers, body = call(server, "GET", "/nope")
    assert status == 404 and "/nope" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/nope", {"seed": 1})
    assert status == 404
    status, headers, body = call(server, "GET", "/generate")
    assert status == 405 and headers["Allow"] == "POST" and "POST" in error_of(status, headers, body)
    status, headers, body = call(server, "POST", "/health", {})
    assert status == 405 and headers["Allow"] == "GET"
    status, headers, body = call(server, "DELETE", "/generate")
    assert status == 405


def test_oversize_body_is_413(make_server):
    sampler, _, server = make_server(max_body_bytes=1024)
    big = json.dumps({"prompt": "x" * 5000}).encode()
    status, headers, body = call(server, "POST", "/generate", big)
    assert status == 413 and "over the limit of 1024 bytes" in error_of(status, headers, body)
    assert sampler.calls == []


def test_missing_content_length_is_411(served):
    _, _, server = served
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    try:
        conn.putrequest("POST", "/generate")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_shutdown_leaves_the_queue_open(make_server):
    sampler, queue, server = make_server()
    server.shutdown()
    server.shutdown()  # idempotent
    assert not queue.closed
    assert queue.submit(SampleRequest(seed=5)).result(WAIT).request.seed == 5
    with pytest.raises(OSError):
        call(server, "GET", "/health")
