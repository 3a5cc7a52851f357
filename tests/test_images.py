import os

import numpy as np
import pytest
import torch

from fastgen.images import make_grid, save_image_grid, save_image_rows

PIL = pytest.importorskip("PIL.Image")


def test_make_grid_gray_layout_and_values():
    x = torch.full((5, 1, 4, 3), -1.0)
    x[1] = 1.0
    g = make_grid(x, nrow=2, padding=1)
    # 3 rows x 2 cols of 4x3 cells, 1-px borders: H = 3*(4+1)+1, W = 2*(3+1)+1; gray stays 2-D.
    assert g.shape == (16, 9) and g.dtype == np.uint8
    assert g[0].tolist() == [255] * 9  # pad_value=1.0 -> white border
    assert (g[1:5, 1:4] == 0).all() and (g[1:5, 5:8] == 255).all()
    assert (g[11:15, 5:8] == 255).all()  # the empty 6th cell keeps the pad colour


def test_make_grid_rgb_range_and_clipping():
    x = torch.tensor([0.0, 0.5, 2.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    g = make_grid(x, nrow=8, padding=0, value_range=(0, 1))
    assert g.shape == (2, 4, 3)
    assert g[0, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("bad, err", [(torch.zeros(2, 2, 4, 4), ValueError), (torch.zeros(4, 4), ValueError),
                                      (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), TypeError),
                                      (np.zeros((2, 1, 4, 4)), TypeError)])
def test_make_grid_rejects_bad_input(bad, err):
    with pytest.raises(err, match="images"):
        make_grid(bad)


def test_save_image_grid_scale_and_folders(tmp_path):
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    path = save_image_grid(x, tmp_path / "a" / "b" / "grid.png", nrow=3, padding=2, scale=3)
    im = PIL.open(path)
    assert im.mode == "L" and im.size == ((3 * 18 + 2) * 3, (2 * 18 + 2) * 3)
    arr = np.asarray(im)
    np.testing.assert_array_equal(arr[::3, ::3], make_grid(x, nrow=3))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind


def test_save_image_grid_is_atomic_on_failure(tmp_path, monkeypatch):
    path = save_image_grid(torch.zeros(1, 3, 4, 4), tmp_path / "g.png")
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_image_grid(torch.ones(1, 3, 4, 4), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["g.png"]


def test_save_image_grid_bad_scale(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(torch.zeros(1, 1, 4, 4), tmp_path / "g.png", scale=0)


def test_save_image_rows(tmp_path):
    rows = [torch.rand(4, 1, 8, 8) * 2 - 1 for _ in range(3)]
    plain = PIL.open(save_image_rows(rows, tmp_path / "plain.png"))
    assert plain.size == (4 * 10 + 2, 3 * 10 + 2)
    labelled = PIL.open(save_image_rows(rows, tmp_path / "lab.png", labels=["input", "output", "target"], scale=2))
    assert labelled.size[1] == (3 * 10 + 2) * 2 and labelled.size[0] > (4 * 10 + 2) * 2
    with pytest.raises(ValueError, match="output"):
        save_image_rows([rows[0], rows[1][:2]], tmp_path / "x.png", labels=["input", "output"])
    with pytest.raises(ValueError, match="labels"):
        save_image_rows(rows, tmp_path / "x.png", labels=["a"])
    with pytest.raises(TypeError, match="list"):
        save_image_rows(rows[0], tmp_path / "x.png")
