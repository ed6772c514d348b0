"""The pixel-shuffle reference itself (functional.pixel_shuffle / pixel_shuffle_grid, v1 and v2) against an
index-level definition of the official reshapes. The op (Triton / CUDA) is tests/test_pixel_shuffle.py."""
from __future__ import annotations

import pytest
import torch

from internvl_kernels.model.functional import pixel_shuffle, pixel_shuffle_grid


def _index_definition(x: torch.Tensor, r: int, version: str) -> torch.Tensor:
    """Element by element: merged token (t, u) holds, in channel block p·r + q, input token (r·t + p, r·u + q) of the
    ``[N, W, H, C]`` grid (p offsets the first grid axis, q the second). v2 stores it at output position (t, u); v1
    leaves the merged grid transposed and stores it at (u, t)."""
    n, w, h, c = x.shape
    out = torch.empty(n, h // r, w // r, c * r * r, dtype=x.dtype)
    for t in range(w // r):          # merged-grid index along the input's first grid axis
        for u in range(h // r):      # along the second
            for p in range(r):
                for q in range(r):
                    src = x[:, r * t + p, r * u + q, :]
                    a, b = (t, u) if version == "v2" else (u, t)
                    out[:, a, b, (p * r + q) * c:(p * r + q + 1) * c] = src
    return out


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("side, c", [(4, 3), (8, 5), (32, 2)])
def test_matches_index_definition(version, side, c):
    x = torch.randn(2, side, side, c)
    got = pixel_shuffle_grid(x, 0.5, version)
    assert torch.equal(got, _index_definition(x, 2, version))


def test_v1_is_v2_transposed():
    x = torch.randn(1, 8, 8, 4)
    assert torch.equal(pixel_shuffle_grid(x, 0.5, "v1"), pixel_shuffle_grid(x, 0.5, "v2").transpose(1, 2))
    assert not torch.equal(pixel_shuffle_grid(x, 0.5, "v1"), pixel_shuffle_grid(x, 0.5, "v2"))


def test_token_form_and_shapes():
    x = torch.randn(3, 1024, 7)  # 32×32 grid → 16×16 tokens of 4C
    y = pixel_shuffle(x, 0.5, "v2")
    assert y.shape == (3, 256, 28)
    assert torch.equal(y, pixel_shuffle_grid(x.reshape(3, 32, 32, 7), 0.5, "v2").reshape(3, 256, 28))


def test_errors():
    with pytest.raises(ValueError, match="version"):
        pixel_shuffle(torch.randn(1, 16, 4), 0.5, "v9")
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 17, 4), 0.5, "v2")  # cls token left in
    with pytest.raises(ValueError, match="not divisible"):
        pixel_shuffle(torch.randn(1, 9, 4), 0.5, "v2")
