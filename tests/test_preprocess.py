"""Dynamic high-resolution tiling: the official grid rule on a table of image sizes, tiles, thumbnail, normalization."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_kernels.model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
    choose_grid,
    dynamic_preprocess,
    load_image,
    target_ratios,
)

# (width, height, max_num) -> (columns, rows); derived by hand from the rule in docs/design.md §1:
# closest aspect ratio; on a tie the larger grid wins iff image area > 0.5 · 448² · tiles.
TABLE = [
    (448, 448, 12, (1, 1)),      # ties (2,2),(3,3): area 200704 ≤ 0.5·448²·4 → stays (1,1)
    (896, 896, 12, (2, 2)),      # area 802816 > 0.5·448²·4 = 401408 → (2,2); ≤ 0.5·448²·9 → not (3,3)
    (1344, 1344, 12, (3, 3)),    # beats 0.5·448²·4 and ·9 → (3,3)
    (800, 600, 12, (4, 3)),      # exact 4:3
    (1920, 1080, 12, (4, 2)),    # 1.778: (2,1)=(4,2)=2.0 closest; tie → area 2073600 > 0.5·448²·8 → (4,2)
    (1000, 100, 12, (10, 1)),    # extreme wide
    (100, 5000, 12, (1, 12)),    # extreme tall: 0.02 → 1/12 closest
    (5000, 100, 6, (6, 1)),      # capped by max_num
    (640, 480, 1, (1, 1)),       # max_num 1 → single tile
    (448, 896, 12, (1, 2)),
]


@pytest.mark.parametrize("w, h, max_num, grid", TABLE)
def test_tile_choice_table(w, h, max_num, grid):
    assert choose_grid(w, h, max_num=max_num) == grid


def test_candidate_grids():
    r = target_ratios(1, 6)
    assert len(r) == len(set(r))
    assert all(1 <= i * j <= 6 for i, j in r)
    assert [i * j for i, j in r] == sorted(i * j for i, j in r)
    assert (2, 3) in r and (3, 2) in r and (1, 6) in r and (2, 4) not in r
    with pytest.raises(ValueError):
        target_ratios(0, 4)


def test_tiles_reassemble_the_resized_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))  # 500×300
    cols, rows = choose_grid(500, 300, max_num=6, image_size=56)
    tiles = dynamic_preprocess(img, max_num=6, image_size=56, use_thumbnail=True)
    assert len(tiles) == cols * rows + 1 and all(t.size == (56, 56) for t in tiles)
    resized = np.asarray(img.resize((56 * cols, 56 * rows)))
    for i, t in enumerate(tiles[:-1]):  # row-major
        r, c = divmod(i, cols)
        assert np.array_equal(np.asarray(t), resized[56 * r:56 * (r + 1), 56 * c:56 * (c + 1)])
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((56, 56))))
    assert len(dynamic_preprocess(img, max_num=1, image_size=56, use_thumbnail=True)) == 1  # no thumbnail for 1 tile


def test_normalization():
    img = Image.fromarray(np.full((20, 30, 3), [255, 128, 0], dtype=np.uint8))
    t = build_transform(14)(img)
    assert t.shape == (3, 14, 14)
    expect = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    for ch in range(3):
        assert torch.allclose(t[ch], torch.full((14, 14), expect[ch]), atol=1e-6)


def test_load_image_real_photo():
    skdata = pytest.importorskip("skimage.data")
    pv = load_image(skdata.chelsea(), input_size=448, max_num=12)  # 451×300 cat photo
    cols, rows = choose_grid(451, 300)
    assert pv.shape == (cols * rows + (1 if cols * rows > 1 else 0), 3, 448, 448)
    assert torch.isfinite(pv).all() and pv.std() > 0.3


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError):
        load_image(123)
