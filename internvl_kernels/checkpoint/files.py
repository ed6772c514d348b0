"""Reading and writing checkpoint folders laid out like the official HF hub folders.

* ``model.safetensors`` or sharded ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
* legacy ``pytorch_model.bin`` / sharded ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing files, corrupt, or does not match the model (named in the message)."""


def _read_index(index_path: str) -> dict:
    """``weight_map`` of an index file, validated: a JSON object ``{tensor name: shard file name}``."""
    try:
        with open(index_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {index_path}: {e.strerror or e}") from e
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path} is not a valid index file ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path} is not a valid index file (expected a non-empty 'weight_map' object "
                              "of tensor name -> shard file name)")
    for name in set(weight_map.values()):
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name inside the folder")
    return weight_map


def _checkpoint_plan(folder: str) -> tuple[list[str], dict | None]:
    """The weight files of ``folder`` in index order, and the index's ``weight_map`` (``None`` without index)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = _read_index(index_path)
            files = list(OrderedDict.fromkeys(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise CheckpointError(f"{folder}: shard(s) listed in {index_name} are missing: {missing}")
            return [os.path.join(folder, f) for f in files], weight_map
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)], None
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def checkpoint_files(folder: str) -> list[str]:
    """The weight files of ``folder`` in index order."""
    return _checkpoint_plan(folder)[0]


def _check_shard_keys(path: str, keys, weight_map: dict | None) -> None:
    """With an index, a shard holds exactly the tensors the index assigns to it (a corrupt header or index that
    renames, drops or adds a tensor is an error, not a silently different state dict)."""
    if weight_map is None:
        return
    name = os.path.basename(path)
    want = {k for k, v in weight_map.items() if v == name}
    got = set(keys)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise CheckpointError(f"{path} does not match the index: "
                              + "; ".join(p for p in (f"missing {_abbrev(missing)}" if missing else "",
                                                      f"not in the index {_abbrev(extra)}" if extra else "") if p))


def iter_tensors(folder: str, dtype: torch.dtype | None = None, device=None):
    """Yield ``(key, tensor)`` for every tensor of the checkpoint (floating tensors cast to ``dtype`` if given).

    With ``device``, each tensor is moved there as it is read, so a large model never sits whole in host memory.
    Every problem with the files (truncated / corrupt shard or index, tensors that do not match the index,
    non-finite values) is a :class:`CheckpointError` naming the file.
    """
    files, weight_map = _checkpoint_plan(folder)
    for path in files:
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
                    _check_shard_keys(path, keys, weight_map)
                    for key in keys:
                        yield key, _cast(check_finite(f.get_tensor(key), key, path), dtype, device)
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"cannot read {path}: {e}") from e
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {e}") from e
            if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                   for k, t in sd.items()):
                raise CheckpointError(f"cannot read {path}: not a state dict of named tensors")
            _check_shard_keys(path, sd.keys(), weight_map)
            for key, t in sd.items():
                yield key, _cast(check_finite(t, key, path), dtype, device)


def check_finite(t: torch.Tensor, key: str, path: str) -> torch.Tensor:
    """``t`` if it holds no NaN / Inf, else :class:`CheckpointError` naming the tensor and its file.

    Every floating tensor is checked as it is read: a non-finite weight or scale would otherwise load silently and
    only show as NaN logits / empty generations much later.
    """
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
        if t.element_size() == 1:  # fp8 codes (W8A8): isnan / isinf are not implemented for them
            t_chk = t.to(torch.float32)
        else:
            t_chk = t
        finite = torch.isfinite(t_chk)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            kinds = "/".join(k for k, m in (("NaN", torch.isnan(t_chk)), ("Inf", torch.isinf(t_chk))) if bool(m.any()))
            raise CheckpointError(f"{path}: tensor {key} has {bad} non-finite value(s) ({kinds}) in "
                                  f"{tuple(t.shape)}; the checkpoint is corrupt or was saved from a diverged model")
    return t


def _cast(t: torch.Tensor, dtype, device=None):
    if device is not None:
        t = t.to(device)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def load_state_dict(folder: str, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder as one dict (keys exactly as stored), optionally placed on ``device``."""
    return dict(iter_tensors(folder, dtype, device))


def _save_file_reproducible(tensors: dict, path: str, metadata: dict) -> None:
    """``safetensors.torch.save_file`` with the header metadata in sorted key order.

    The library serializes the metadata from a hash map whose order changes from process to process, so the same
    tensors would give different bytes. The header is rewritten in place with the same content, metadata keys
    sorted, padded with spaces to the same length (tensor entries and data untouched).
    """
    import struct

    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n).decode("utf-8"))
        meta = header.pop("__metadata__", None)
        fixed = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
        raw = json.dumps(fixed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > n:  # cannot happen for the same content; never write a header that overruns the data
            raise RuntimeError(f"{path}: re-serialized safetensors header is longer than the original")
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    folder: str,
    max_shard_size: int = 5 * 1024**3,
    metadata: dict | None = None,
) -> list[str]:
    """Write ``state_dict`` as sharded safetensors + index exactly like ``save_pretrained`` does.

    One shard → ``model.safetensors``; more → ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``.
    Returns the written file names. The same tensors and metadata always give the same bytes.
    """
    os.makedirs(folder, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().contiguous().cpu()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        _save_file_reproducible(shards[0], os.path.join(folder, SAFE_SINGLE), meta)
        return [SAFE_SINGLE]
    n = len(shards)
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        _save_file_reproducible(shard, os.path.join(folder, name), meta)
        names.append(name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [SAFE_INDEX]


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Keys starting with ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_into_module(module: torch.nn.Module, state_dict: dict, what: str, ignore_unexpected=()) -> None:
    """Strict load with errors that name the problem: missing keys, unexpected keys, shape mismatches.

    Parameters are assigned (``assign=True``) so a module built on the meta device gets the checkpoint's tensors
    without a second copy.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not any(k.startswith(p) for p in ignore_unexpected)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
    shape_bad = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if shape_bad:
        problems.append(f"shape mismatch ({len(shape_bad)}): {_abbrev(shape_bad)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    sd = {k: state_dict[k] for k in expected}
    for k, v in sd.items():
        ref = expected[k]
        if v.is_floating_point() and ref.is_floating_point() and v.dtype != ref.dtype:
            sd[k] = v.to(ref.dtype)
    module.load_state_dict(sd, strict=True, assign=True)


def _abbrev(items, n=6):
    items = list(items)
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
