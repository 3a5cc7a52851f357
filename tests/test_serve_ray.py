"""The Ray Serve deployment end to end on a local, loopback-only Ray instance with a fake sampler
(tests/serve_fake_sampler.py): HTTP through Ray's proxy, Python calls through a DeploymentHandle, Ray's
batching, and per-request errors inside a batch."""

import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

# Ray turns a loopback _node_ip_address into the machine's routable address (ray/_private/services.py,
# resolve_ip_for_localhost) unless clusters are disabled, which makes get_node_ip_address() answer the
# loopback IP. It is read when ray is imported, so set it first; the raylet and workers inherit it.
_SET_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'fastgen[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'fastgen[serve]')")
Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install 'fastgen[serve]')")

from fastgen.pipelines.request import SampleRequest  # noqa: E402
from fastgen.serve.ray_app import _load_factory, build_app, run  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 60


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """(DeploymentHandle, base URL) of one CPU replica serving the fake sampler."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    # Replicas inherit the environment of the raylet started here: that is how they import the fake.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report over the network
    try:
        # address="local": never join a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=100 * 2**20, log_to_driver=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        port = _free_port()
        # A long batch window so that concurrent calls from this test reliably share a batch.
        handle = run("fake-model", host="127.0.0.1", port=port, blocking=False, max_batch_size=8,
                     batch_wait_timeout_s=0.2, sampler_factory="serve_fake_sampler:make")
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # the proxy may start listening a moment after the app is up
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield handle, url
    finally:
        serve.shutdown()
        ray.shutdown()


def teardown_module():
    if _SET_LOOPBACK:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        return resp.status, resp.headers.get("Content-Type"), resp.read()


def _pixels(png):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(png)))


def test_health(served):
    _, url = served
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"status": "ok", "model": "fake-model", "device": "cpu",
                                           "max_batch_size": 8}


def test_http_png(served):
    _, url = served
    status, media_type, body = _post(url, {"seed": 1200})
    assert status == 200 and media_type == "image/png"
    pixels = _pixels(body)
    assert pixels.shape == (8, 8) and (pixels == 51).all()  # (1200 % 1000) / 1000 * 255


def test_http_base64(served):
    _, url = served
    status, media_type, body = _post(url, {"seed": 600, "format": "base64"})
    assert status == 200 and media_type == "application/json"
    data = json.loads(body)
    assert data["media_type"] == "image/png" and data["request"] == {"seed": 600}
    assert (_pixels(base64.b64decode(data["image"])) == 153).all()


@pytest.mark.parametrize("body, message", [
    ({"seed": 1, "colour": "red"}, "unknown request field"),
    ({"seed": "one"}, "seed"),
    ({"class_label": "bad"}, "unknown class 'bad'"),
    ({"seed": 1, "format": "jpeg"}, "format"),
    (None, "JSON"),
])
def test_http_bad_request(served, body, message):
    _, url = served
    data = b"{not json" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=TIMEOUT_S)
    assert info.value.code == 400
    assert message in json.loads(info.value.read())["error"]


def test_bad_request_among_concurrent_good_ones(served):
    handle, _ = served
    seeds = list(range(8))
    calls = [handle.generate.remote({"seed": s, "class_label": "bad" if s == 3 else 1}) for s in seeds]
    results = {}
    for s, call in zip(seeds, calls):
        if s == 3:
            with pytest.raises(ValueError, match="unknown class 'bad'"):
                call.result(timeout_s=TIMEOUT_S)
        else:
            results[s] = call.result(timeout_s=TIMEOUT_S)
    for s, result in results.items():
        assert result.request == SampleRequest(seed=s, class_label=1)
        assert float(result.image.mean()) == pytest.approx(s / 1000)
    assert max(r.batch_size for r in results.values()) > 1, "Ray never batched concurrent calls"


def test_batch_failure_reruns_batch_mates_alone(served):
    handle, _ = served
    calls = [handle.generate.remote(SampleRequest(seed=s, class_label="boom" if s == 2 else None))
             for s in range(4)]
    for s, call in enumerate(calls):
        if s == 2:
            with pytest.raises(RuntimeError, match="boom"):
                call.result(timeout_s=TIMEOUT_S)
        else:
            assert call.result(timeout_s=TIMEOUT_S).request.seed == s


def test_sixteen_concurrent_calls_get_their_own_results(served):
    handle, _ = served
    calls = [handle.generate.remote({"seed": 100 + i}) for i in range(16)]
    results = [call.result(timeout_s=TIMEOUT_S) for call in calls]
    assert [r.request.seed for r in results] == [100 + i for i in range(16)]
    assert [round(float(r.image.mean()) * 1000) for r in results] == [100 + i for i in range(16)]
    assert all(1 <= r.batch_size <= 8 for r in results)


def test_options_are_checked_without_a_cluster():
    with pytest.raises(ValueError, match="not both"):
        build_app("m", num_replicas=1, autoscaling={"min_replicas": 1})
    with pytest.raises(ValueError, match="package.module:function"):
        _load_factory("fastgen.pipelines.load_sampler")


def test_a_real_model_served_by_a_replica(served, tmp_path):
    """A replica loading a saved fastgen pipeline folder with the default factory (load_sampler) answers over
    HTTP with the image the same sampler gives in this process."""
    import numpy as np

    from fastgen.bench.offline import tiny_latent_pipeline
    from fastgen.pipelines import load_sampler

    folder = tmp_path / "model"
    tiny_latent_pipeline("class", seed=0).save_pretrained(folder)
    _, url = served
    serve.run(build_app(str(folder), max_batch_size=4, num_replicas=1, device="cpu"), name="real",
              route_prefix="/real")
    try:
        status, media_type, body = _post(url + "real", {"class_label": 3, "seed": 5, "steps": 2})
        assert status == 200 and media_type == "image/png"
        expected = load_sampler(folder, device="cpu")([SampleRequest(class_label=3, seed=5, steps=2)])[0]
        got = _pixels(body).astype(np.int16)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - expected.to_uint8().astype(np.int16)).max() <= 1
    finally:
        serve.delete("real")
