"""fastgen bench serve: the load test's rows, its comparison and its chart, on a short bounded run."""

import json

import numpy as np
import pytest

from fastgen.bench import serve as bench_serve


def test_arrivals_are_poisson_and_reproducible():
    a = bench_serve.arrival_times(2000, rate=4.0)
    assert a[0] == 0 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, bench_serve.arrival_times(2000, rate=4.0))
    assert abs(np.diff(a).mean() - 0.25) < 0.02  # mean gap 1 / rate


def test_short_run_answers_every_request(one_thread, tmp_path):
    import torch

    rows = bench_serve.queue_rows(torch.device("cpu"), True, requests=6, rates=(1.0,), steps=2, max_batch_size=4,
                                  progress=False)
    assert [r["mode"] for r in rows] == ["one-by-one", "batched"]
    for r in rows:
        assert r["answered"] == 6 and r["errors"] == 0, r["error_sample"]
        assert r["throughput_rps"] > 0 and 0 < r["p50_s"] <= r["p95_s"] <= r["max_s"]
    assert rows[0]["mean_batch"] == 1.0 and rows[0]["batches"] == 6
    summary = bench_serve.compare(rows)
    assert len(summary) == 1 and summary[0]["summary"] == "rate 1x"
    assert summary[0]["throughput_ratio"] == pytest.approx(rows[1]["throughput_rps"] / rows[0]["throughput_rps"])
    json.dumps(rows + summary)  # the results file takes them as they are
    pytest.importorskip("matplotlib")
    chart = bench_serve.save_chart(rows, tmp_path / "serve.png", device="cpu")
    assert chart.is_file() and chart.stat().st_size > 1000


def test_graph_rows_need_cuda_and_the_loop_runs_eagerly(one_thread):
    import torch

    from fastgen.bench.offline import tiny_latent_pipeline
    from fastgen.pipelines import BatchSampler, SampleRequest

    assert bench_serve.graph_rows(torch.device("cpu"), True)[0]["skipped"] == "needs a CUDA device"
    sampler = BatchSampler(tiny_latent_pipeline("class", seed=0))
    request = SampleRequest(class_label=1, seed=3, steps=2)
    latents = bench_serve.loop_only(sampler, request)()
    assert latents.shape == (1, 3, 16, 16)
    expected = sampler.pipe(class_labels=1, seeds=[3], num_inference_steps=2, output_type="latent").images
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
