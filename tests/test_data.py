"""fastgen.data: the digits split and scaling, image folders (layouts, resize, crop, flip, every error naming its
file or folder), pix2pix pairs and on-the-fly conditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.data import (CONDITIONS, ConditionedDataset, ImageFolder, PairedImageFolder, condition_fn,
                          load_dataset, load_digits)


def _write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format=fmt)
    return path


def _grey(h=8, w=8, value=None, seed=0):
    if value is not None:
        return np.full((h, w), value)
    return np.random.RandomState(seed).randint(0, 256, (h, w))


def _rgb(h=8, w=8, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3))


def _ramp(h=8, w=8):
    """A left-to-right ramp, so that a flip is visible."""
    return np.tile(np.linspace(0, 255, w).round(), (h, 1))


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def sklearn_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits()


def test_digits_shapes_range_labels(sklearn_digits):
    d = load_digits(16, "train")
    assert d.images.shape == (1497, 1, 16, 16) and d.images.dtype == torch.float32
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.images.min() == -1 and d.images.max() > 0.9
    assert d.labels.dtype == torch.int64 and set(d.labels.tolist()) == set(range(10))
    image, label = d[5]
    assert image.shape == (1, 16, 16) and label.dtype == torch.int64 and label.dim() == 0
    assert d.prompts[5] == d.class_names[int(label)] and d.class_names[0] == "zero" and d.num_classes == 10
    assert (d.image_size, d.channels) == (16, 1)
    rgb = load_digits(32, "test", channels=3)
    assert rgb.images.shape == (300, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_digits_split_fixed_and_stratified(sklearn_digits):
    train, test, every = (load_digits(8, s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (1497, 300, 1797)
    assert torch.bincount(test.labels, minlength=10).tolist() == [30] * 10
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in rows for x in test.images)
    again = load_digits(8, "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    # the cache hands out copies
    again.images.zero_()
    assert torch.equal(load_digits(8, "test").images, test.images)


def test_digits_size_8_is_sklearn_scaled(sklearn_digits):
    d = load_digits(8, "all")
    want = torch.from_numpy(sklearn_digits.images).float() / 16 * 2 - 1
    assert torch.allclose(d.images[:, 0], want, atol=1e-6)
    assert torch.equal(d.labels, torch.from_numpy(sklearn_digits.target).long())


def test_digits_errors(sklearn_digits):
    with pytest.raises(ValueError, match="8, 16, 32"):
        load_digits(12)
    with pytest.raises(ValueError, match="split"):
        load_digits(16, "val")
    with pytest.raises(ValueError, match="channels"):
        load_digits(16, channels=2)


def test_load_dataset(sklearn_digits, tmp_path):
    d = load_dataset("digits", split="test")
    assert d.images.shape == (300, 1, 16, 16)
    _write(tmp_path / "imgs" / "a.png", _grey())
    f = load_dataset(str(tmp_path / "imgs"), size=4)
    assert isinstance(f, ImageFolder) and f[0][0].shape == (1, 4, 4)
    with pytest.raises(FileNotFoundError, match="nowhere.*neither 'digits'"):
        load_dataset(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- image folders


def test_flat_folder(tmp_path):
    _write(tmp_path / "b.png", _grey(value=255))
    _write(tmp_path / "a.png", _grey(value=0))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert len(ds) == 2 and ds.class_names == () and ds.num_classes == 0
    image, label = ds[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert torch.all(image == -1) and torch.all(ds[1][0] == 1)  # sorted by name: a (black) then b (white)
    assert int(label) == -1


def test_class_folders(tmp_path):
    _write(tmp_path / "dog" / "1.png", _rgb(seed=1))
    _write(tmp_path / "cat" / "1.jpg", _rgb(seed=2), "JPEG")
    _write(tmp_path / "cat" / "2.PNG", _rgb(seed=3))
    ds = ImageFolder(tmp_path)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert [int(ds[i][1]) for i in range(len(ds))] == [0, 0, 1]
    assert ds[0][0].shape == (3, 8, 8)
    assert ImageFolder(tmp_path, channels=1)[0][0].shape == (1, 8, 8)


def test_resize_and_crop(tmp_path):
    _write(tmp_path / "wide.png", np.tile(np.repeat([0, 255], 8), (8, 1)))  # 8 x 16: black | white
    center = ImageFolder(tmp_path, size=4)[0][0]
    assert center.shape == (1, 4, 4)
    assert center[..., 0].mean() < 0 < center[..., -1].mean()  # the centre crop straddles the boundary
    assert ImageFolder(tmp_path, size=4, crop=None)[0][0].shape == (1, 4, 4)
    crops = {tuple(ImageFolder(tmp_path, size=4, crop="random", seed=s)[0][0].flatten().tolist())
             for s in range(8)}
    assert len(crops) > 1
    a, b = (ImageFolder(tmp_path, size=4, crop="random", seed=3)[0][0] for _ in range(2))
    assert torch.equal(a, b)


def test_flip_is_seeded_and_random(tmp_path):
    for i in range(16):
        _write(tmp_path / f"{i:02d}.png", _ramp())
    plain = ImageFolder(tmp_path)[0][0]
    ds = ImageFolder(tmp_path, flip=True, seed=1)
    flipped = [bool(torch.equal(ds[i][0], plain.flip(-1))) for i in range(16)]
    kept = [bool(torch.equal(ds[i][0], plain)) for i in range(16)]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 16
    assert [bool(torch.equal(ImageFolder(tmp_path, flip=True, seed=1)[i][0], plain.flip(-1)))
            for i in range(16)] == flipped
    ds.set_epoch(1)
    assert [bool(torch.equal(ds[i][0], plain.flip(-1))) for i in range(16)] != flipped


def test_missing_and_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")
    f = _write(tmp_path / "file.png", _grey())
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolder(f)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*\.png, \.jpg"):
        ImageFolder(tmp_path / "empty")


def test_empty_class_folder(tmp_path):
    _write(tmp_path / "cat" / "1.png", _grey())
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match="class folder.*dog"):
        ImageFolder(tmp_path)


def test_images_and_class_folders_together(tmp_path):
    _write(tmp_path / "loose.png", _grey())
    _write(tmp_path / "cat" / "1.png", _grey())
    with pytest.raises(ValueError, match="both images.*loose.png.*cat"):
        ImageFolder(tmp_path)


def test_unreadable_image(tmp_path):
    _write(tmp_path / "good.png", _grey())
    (tmp_path / "x.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match="x.png"):
        ImageFolder(tmp_path)
    ds = ImageFolder(tmp_path, verify=False)
    assert ds[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="x.png") as info:
        ds[1]
    assert info.value.__cause__ is not None  # PIL's error is chained


def test_wrong_channel_count(tmp_path):
    _write(tmp_path / "a.png", _grey())
    _write(tmp_path / "b.png", _grey(seed=1))
    _write(tmp_path / "c.png", _rgb())
    with pytest.raises(ValueError, match=r"c\.png.* 3 channel.*a\.png.* 1"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match=r"c\.png"):
        ImageFolder(tmp_path, verify=False)[2]
    assert ImageFolder(tmp_path, channels=3)[0][0].shape == (3, 8, 8)


def test_alpha_image_needs_channels(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match="alpha.png.*RGB with alpha.*channels=3"):
        ImageFolder(tmp_path)
    assert ImageFolder(tmp_path, channels=3)[0][0].shape == (3, 4, 4)


def test_sizes_must_agree_without_size(tmp_path):
    _write(tmp_path / "a.png", _grey(8, 8))
    _write(tmp_path / "b.png", _grey(6, 8))
    with pytest.raises(ValueError, match=r"b\.png.*8x6.*size="):
        ImageFolder(tmp_path)
    assert ImageFolder(tmp_path, size=4)[1][0].shape == (1, 4, 4)


def test_bad_arguments(tmp_path):
    _write(tmp_path / "a.png", _grey())
    for kwargs, match in (({"size": 0}, "size"), ({"channels": 2}, "channels"), ({"crop": "left"}, "crop")):
        with pytest.raises(ValueError, match=match):
            ImageFolder(tmp_path, **kwargs)
    with pytest.raises(IndexError, match="out of range"):
        ImageFolder(tmp_path)[1]


# ---------------------------------------------------------------- pix2pix pairs


def _pairs(root, names_a=("p", "q"), names_b=("p", "q")):
    for n in names_a:
        _write(root / "A" / f"{n}.png", _grey(value=0))
    for n in names_b:
        _write(root / "B" / f"{n}.jpg", _rgb(seed=len(n)), "JPEG")


def test_paired_folders(tmp_path):
    _pairs(tmp_path)
    ds = PairedImageFolder(tmp_path, size=4)
    assert len(ds) == 2
    cond, target = ds[1]
    assert cond.shape == (1, 4, 4) and target.shape == (3, 4, 4) and torch.all(cond == -1)


def test_paired_mismatch(tmp_path):
    _pairs(tmp_path, names_a=("p", "q", "only_a"), names_b=("p", "q", "only_b"))
    with pytest.raises(ValueError, match=r"A'.*B'.*only in .*A' \(only_a\).*only in .*B' \(only_b\)"):
        PairedImageFolder(tmp_path)


def test_paired_missing_folder(tmp_path):
    _write(tmp_path / "A" / "p.png", _grey())
    with pytest.raises(FileNotFoundError, match="B.*side_by_side"):
        PairedImageFolder(tmp_path)


def test_paired_size_mismatch(tmp_path):
    _write(tmp_path / "A" / "p.png", _grey(8, 8))
    _write(tmp_path / "B" / "p.png", _grey(8, 6))
    with pytest.raises(ValueError, match=r"A/p\.png.*B/p\.png.*differ in size"):
        PairedImageFolder(tmp_path)


def test_paired_flip_applies_to_both(tmp_path):
    for i in range(12):
        _write(tmp_path / "A" / f"{i}.png", _ramp())
        _write(tmp_path / "B" / f"{i}.png", 255 - _ramp())
    ds = PairedImageFolder(tmp_path, flip=True, seed=2)
    plain = torch.from_numpy(_ramp()).float().div(127.5).sub(1)[None]
    flips = []
    for i in range(len(ds)):
        cond, target = ds[i]
        cond_flipped = torch.equal(cond, plain.flip(-1))
        assert cond_flipped or torch.equal(cond, plain)
        assert torch.allclose(target, -cond, atol=1e-6)  # the target flipped with its condition
        flips.append(cond_flipped)
    assert 0 < sum(flips) < len(flips)


def test_side_by_side(tmp_path):
    ab = np.concatenate([_grey(8, 8, value=0), _grey(8, 8, value=255)], axis=1)
    _write(tmp_path / "ab.png", ab)
    cond, target = PairedImageFolder(tmp_path, side_by_side=True)[0]
    assert cond.shape == target.shape == (1, 8, 8)
    assert torch.all(cond == -1) and torch.all(target == 1)
    assert PairedImageFolder(tmp_path, size=4, side_by_side=True)[0][1].shape == (1, 4, 4)


def test_side_by_side_odd_width(tmp_path):
    _write(tmp_path / "odd.png", _grey(8, 15))
    with pytest.raises(ValueError, match=r"odd\.png.*15 pixels wide"):
        PairedImageFolder(tmp_path, side_by_side=True)


def test_paired_errors_shared_with_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        PairedImageFolder(tmp_path / "nothing")
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    with pytest.raises(ValueError, match=r"A'.*no images"):
        PairedImageFolder(tmp_path)
    _write(tmp_path / "A" / "p.png", _grey())
    (tmp_path / "B" / "p.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"B/p\.png"):
        PairedImageFolder(tmp_path)


# ---------------------------------------------------------------- conditions


class _Images(torch.utils.data.Dataset):
    def __init__(self, channels):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(3, channels, 16, 16, generator=g) * 2 - 1
        self.images[:, :, 4:12, 4:12] = 1  # a square, so there are edges
        self.class_names = ("a",)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], torch.tensor(0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", CONDITIONS)
def test_conditioned_dataset(name, channels):
    ds = ConditionedDataset(_Images(channels), name)
    cond, image, label = ds[1]
    assert cond.shape == image.shape == (channels, 16, 16)
    assert cond.min() >= -1 and cond.max() <= 1
    identity = name in ("grey", "gray") and channels == 1  # a grey image is its own grey
    assert torch.equal(cond, image) == identity and int(label) == 0
    assert ds.class_names == ("a",) and len(ds) == 3
    batch = condition_fn(name)(ds.dataset.images)
    assert torch.allclose(batch[1], cond, atol=1e-6)  # the batched function gives the per-item condition


def test_condition_options():
    images = _Images(3).images
    low = condition_fn("lowres", factor=8)(images)
    # a factor-8 image of 16 pixels has 2x2 blocks of detail: far from the input, further than factor 2
    assert (low - images).abs().mean() > (condition_fn("lowres", factor=2)(images) - images).abs().mean()
    soft, hard = condition_fn("edges")(images), condition_fn("edges", threshold=0.3)(images)
    assert set(hard.unique().tolist()) <= {-1.0, 1.0} and len(soft.unique()) > 2


def test_condition_errors():
    with pytest.raises(ValueError, match="'sketch'.*'edges'.*'lowres'"):
        ConditionedDataset(_Images(1), "sketch")
    with pytest.raises(TypeError, match="sigmaa"):
        condition_fn("canny", sigmaa=1.0)
    with pytest.raises(ValueError, match="keep_channels"):
        condition_fn("edges", keep_channels=False)
