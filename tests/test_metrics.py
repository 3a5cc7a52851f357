import importlib.util
import time

import pytest
import torch

pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn")

from fastgen import metrics as M  # noqa: E402


def _digits(split, size=16):
    try:
        from fastgen.data import load_digits
    except ImportError:  # checkouts without fastgen.data build the same tensors from sklearn
        return M._digits(size=size, split=split)
    ds = load_digits(size=size, split=split)
    return ds.images, ds.labels


@pytest.fixture(scope="module")
def data():
    return _digits("train"), _digits("test")


@pytest.fixture(scope="module")
def clf(data):
    (x, y), _ = data
    t = time.perf_counter()
    c = M.train_digits_classifier(x, y, steps=150, seed=0, progress=False)  # reduced: the default is 400
    print(f"\ntrained digits classifier (150 steps) in {time.perf_counter() - t:.1f}s")
    return c


def test_classifier_accuracy_on_held_out(clf, data):
    _, (xt, yt) = data
    assert xt.shape == (300, 1, 16, 16)
    acc = M.classifier_accuracy(clf, xt, yt)
    per = M.per_class_accuracy(clf, xt, yt)
    print(f"held-out accuracy {acc:.4f}")
    assert acc >= 0.9
    assert len(per) == 10 and all(0 <= p <= 1 for p in per)
    assert abs(sum(per) / 10 - acc) < 1e-6  # the held-out split is balanced: 30 per class
    # One classifier reads 32-px images too (resized to its own 16 px).
    x32, y32 = _digits("test", size=32)
    assert M.classifier_accuracy(clf, x32, y32) >= 0.85


def test_training_is_deterministic(data):
    (x, y), _ = data
    a = M.train_digits_classifier(x[:64], y[:64], steps=3, batch_size=16, seed=3, progress=False)
    b = M.train_digits_classifier(x[:64], y[:64], steps=3, batch_size=16, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_fid_orders_sets(clf, data):
    (x, _), (xt, _) = data
    self_fid = M.fid(xt, xt, feature=clf)
    real_fid = M.fid(x, xt, feature=clf)
    noise = torch.randn(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise_fid = M.fid(xt, noise, feature=clf)
    print(f"FID self {self_fid:.2e}, train-vs-held-out {real_fid:.3f}, noise {noise_fid:.1f}")
    assert abs(self_fid) < 1e-3 * real_fid
    assert noise_fid > 10 * real_fid


def test_evaluate_samples(clf, data):
    _, (xt, yt) = data
    out = M.evaluate_samples(xt, yt, classifier=clf)
    assert out["n_fake"] == out["n_real"] == 300
    assert abs(out["fid"]) < 1e-3 and out["accuracy"] >= 0.9 and len(out["per_class_accuracy"]) == 10
    out = M.evaluate_samples(xt[:50], classifier=clf)
    assert out["accuracy"] is None and out["per_class_accuracy"] is None and out["fid"] > 0


def test_save_load_round_trip(clf, data, tmp_path):
    _, (xt, _) = data
    path = M.save_classifier(clf, tmp_path / "sub" / "clf.safetensors")
    back = M.load_classifier(path)
    assert back.config == clf.config
    with torch.no_grad():
        assert torch.equal(back(xt[:32]), clf(xt[:32]))
    with pytest.raises(FileNotFoundError, match="nope"):
        M.load_classifier(tmp_path / "nope.safetensors")


def test_digits_classifier_cache(clf, tmp_path, monkeypatch):
    calls = []

    def fake_train(x, y, **kw):
        calls.append(x.shape)
        return clf

    monkeypatch.setattr(M, "train_digits_classifier", fake_train)
    monkeypatch.setattr(M, "_MEMO", {})
    first = M.digits_classifier(16, cache_dir=tmp_path)
    assert first is clf and len(calls) == 1 and calls[0][1:] == (1, 16, 16)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"digits_classifier_16px_{M.CLASSIFIER_VERSION}.safetensors"]
    monkeypatch.setattr(M, "_MEMO", {})  # a new process: must load from disk, not train
    second = M.digits_classifier(16, cache_dir=tmp_path)
    assert len(calls) == 1 and second is not clf
    assert all(torch.equal(p, q) for p, q in zip(second.state_dict().values(), clf.state_dict().values()))
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path))
    assert M.digits_classifier(16) is second  # the env var points at the same file, memoised


def test_inception_feature_never_downloads(data, tmp_path):
    _, (xt, _) = data
    with pytest.raises(FileNotFoundError, match="missing_inception.pth"):
        M.fid(xt, xt, feature=str(tmp_path / "missing_inception.pth"))
    with pytest.raises(ValueError, match="download"):
        M.fid(xt, xt, feature=2048)
    if importlib.util.find_spec("torch_fidelity") is None:
        weights = tmp_path / "inception.pth"
        weights.write_bytes(b"")
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            M.fid(xt, xt, feature=weights)


def test_bad_inputs(clf, data):
    _, (xt, yt) = data
    with pytest.raises(ValueError, match="rank 4"):
        M.fid(xt[0], xt, feature=clf)
    with pytest.raises(ValueError, match="at least 2"):
        M.fid(xt[:1], xt, feature=clf)
    with pytest.raises(ValueError, match="channel"):
        M.fid(xt.expand(-1, 3, -1, -1), xt, feature=clf)
    with pytest.raises(TypeError, match="float"):
        M.classifier_accuracy(clf, (xt > 0).to(torch.uint8), yt)
    with pytest.raises(ValueError, match=r"shape \(300,\)"):
        M.classifier_accuracy(clf, xt, yt[:10])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        M.per_class_accuracy(clf, xt, yt + 5)
    with pytest.raises(TypeError, match="feature"):
        M.fid(xt, xt, feature=3.5)
    with pytest.raises(ValueError, match="channels"):
        clf(torch.zeros(2, 2, 16, 16))
