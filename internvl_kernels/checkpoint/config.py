"""Reading a checkpoint folder's ``config.json`` (and ``quantize_config.json``): the one config reader.

Every loader (InternVL-Chat, standalone InternViT, plain LLM folders, the quantizer) reads configs through
:func:`read_config`, so a missing or broken file always gives the same error naming the path.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .files import CheckpointError

__all__ = ["UnsupportedConfigError", "read_config", "read_quant_config", "config_dtype", "CONFIG_NAME",
           "QUANTIZE_CONFIG_NAME"]

CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"


class UnsupportedConfigError(ValueError):
    """A config value this implementation does not support (named in the message)."""


def read_config(path: str, name: str = CONFIG_NAME) -> dict[str, Any]:
    """``config.json`` of a folder (or the JSON file ``path`` itself) as a dict.

    Raises ``FileNotFoundError`` naming the folder when it does not exist, and :class:`CheckpointError` (a
    ``ValueError``) naming the file when it is missing from an existing folder, unreadable, not valid (UTF-8) JSON or
    not a JSON object."""
    file = os.path.join(path, name) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model folder not found: {path}")
        raise CheckpointError(f"config file not found: {file}")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_quant_config(path: str, raw: dict | None = None) -> dict | None:
    """``quantization_config`` of config.json, else AutoGPTQ's ``quantize_config.json`` beside it, else None."""
    raw = read_config(path) if raw is None else raw
    q = raw.get("quantization_config")
    if q:
        return q
    if os.path.isfile(os.path.join(path, QUANTIZE_CONFIG_NAME)):
        q = read_config(path, QUANTIZE_CONFIG_NAME)
        q.setdefault("quant_method", "gptq")
        return q
    return None


def config_dtype(raw: dict) -> torch.dtype | None:
    """The dtype a config names (``torch_dtype`` / ``dtype``, else the LLM config's), or None."""
    name = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("llm_config") or {}).get("torch_dtype")
    found = getattr(torch, name, None) if isinstance(name, str) else None
    return found if isinstance(found, torch.dtype) else None
