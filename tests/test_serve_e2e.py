"""The whole serving stack on a real (tiny, random-weight) fastgen model: BatchSampler behind the RequestQueue
behind the HTTP server, and ``fastgen serve`` as a process, answered on 127.0.0.1."""

import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from fastgen.bench.offline import tiny_latent_pipeline
from fastgen.pipelines import SampleRequest, load_sampler
from fastgen.serve import RequestQueue, SampleServer

Image = pytest.importorskip("PIL.Image")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "model"
    tiny_latent_pipeline("class", seed=0).save_pretrained(folder)
    return folder


def _post(url, body):
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_http_answers_each_caller_its_own_image(model_dir, one_thread):
    sampler = load_sampler(model_dir, max_batch_size=8, device="cpu")
    requests = [dict(class_label=i % 10, seed=100 + i, steps=3) for i in range(12)]
    alone = {r["seed"]: sampler([SampleRequest(**r)])[0].to_uint8().astype(np.int16) for r in requests[:3]}
    queue = RequestQueue(sampler, max_batch_size=8, max_wait_ms=200, validate=sampler.check)
    with queue, SampleServer(queue, info={"model": str(model_dir)}) as server:
        with urllib.request.urlopen(server.url + "/health", timeout=TIMEOUT_S) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["model"] == str(model_dir)
        bad = dict(class_label="eleven", seed=1, steps=3)
        with concurrent.futures.ThreadPoolExecutor(len(requests) + 1) as pool:
            futures = [pool.submit(_post, server.url, r) for r in requests]
            bad_future = pool.submit(_post, server.url, bad)
            answers = [f.result(timeout=TIMEOUT_S) for f in futures]
            with pytest.raises(urllib.error.HTTPError) as info:
                bad_future.result(timeout=TIMEOUT_S)
        assert info.value.code == 400 and "unknown class 'eleven'" in json.loads(info.value.read())["error"]
        stats = queue.stats()
    assert stats["completed"] == len(requests) and stats["failed"] == 0
    assert max(int(k) for k in stats["batch_sizes"]) > 1, "concurrent requests were never batched"
    images = {}
    for r, (status, headers, body) in zip(requests, answers):
        assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Seed"] == str(r["seed"])
        images[r["seed"]] = _pixels(body)
        assert images[r["seed"]].shape == (32, 32, 3)
    # the image a request gets in a batch of strangers is the image it gets alone (to PNG rounding)
    for seed, expected in alone.items():
        assert np.abs(images[seed] - expected).max() <= 1
    assert len({img.tobytes() for img in images.values()}) == len(requests)  # none duplicated


def test_fastgen_serve_process(model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastgen", "serve", "--model", str(model_dir), "--port", "0",
                             "--max-batch-size", "4", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fastgen serve: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        with urllib.request.urlopen(url + "/health", timeout=TIMEOUT_S) as resp:
            health = json.loads(resp.read())
        assert health["conditioning"] == "class" and health["class_names"][3] == "3"
        status, headers, body = _post(url, {"class_label": 3, "seed": 5, "steps": 2})
        assert status == 200 and _pixels(body).shape == (32, 32, 3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped after 1 images in 1 batches" in out


def test_fastgen_serve_refuses_a_bad_folder(tmp_path, capsys):
    from fastgen.cli import main

    assert main(["serve", "--model", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert "nothing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--model", str(tmp_path / "empty"), "--port", "0"]) == 2
    assert "model_index.json" in capsys.readouterr().err
