"""Dynamic high-resolution preprocessing (InternVL-Chat V1.5), identical to the official tile choice.

``dynamic_preprocess`` picks a grid (i columns × j rows) with ``min_num ≤ i·j ≤ max_num`` whose aspect ratio is
closest to the image's; on a tie the larger grid wins only if the image area exceeds half of that grid's pixel area.
The image is resized to ``(i·size, j·size)``, cut into tiles row-major, and a ``size × size`` thumbnail of the whole
image is appended when there is more than one tile (``use_thumbnail``).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def target_ratios(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """Candidate grids ordered as the official code orders them (by tile count, then set order)."""
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio: float, ratios, width: int, height: int, image_size: int):
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def choose_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448):
    """The (columns, rows) grid ``dynamic_preprocess`` uses for a ``width × height`` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    """Tiles (PIL images of ``image_size``²) of ``image``, row-major, plus the thumbnail when asked for."""
    cols, rows = choose_grid(*image.size, min_num=min_num, max_num=max_num, image_size=image_size)
    tw, th = image_size * cols, image_size * rows
    resized = image.resize((tw, th))
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def build_transform(input_size: int = 448):
    """PIL image → normalized float tensor ``[3, input_size, input_size]`` (RGB, bicubic, ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((input_size, input_size), Image.BICUBIC)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (t - mean) / std

    return transform


def load_image(image, input_size: int = 448, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True,
               dynamic: bool = True) -> torch.Tensor:
    """A path, PIL image or HWC uint8 array → ``pixel_values [tiles, 3, input_size, input_size]`` (fp32)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image}")
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a path, PIL image or numpy array, got {type(image).__name__}")
    image = image.convert("RGB")
    tiles = (
        dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=input_size, use_thumbnail=use_thumbnail)
        if dynamic
        else [image]
    )
    transform = build_transform(input_size)
    return torch.stack([transform(t) for t in tiles])
