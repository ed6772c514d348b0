"""Fuzz test of the checkpoint reader: seeded random truncations and byte flips of a small sharded safetensors
checkpoint (a shard's header / data and the index JSON). Every case must end in ``CheckpointError`` or load tensors
identical to the original — never another exception, never a hang (each case runs in a worker process with a
timeout).

Byte flips are aimed at the shard header (length prefix + JSON) and the index; flips inside a shard's tensor data
are only exercised through truncation: safetensors stores no checksum, so a flipped data byte that yields a finite
value is indistinguishable from a real weight (one that yields NaN / Inf is refused, see test_probe_weights.py).
"""
import multiprocessing as mp
import os
import random
import shutil
import struct
import tempfile

import pytest
import torch

from internvl_kernels.checkpoint.files import CheckpointError, SAFE_INDEX, load_state_dict, save_state_dict

N_CASES = 240
CASE_TIMEOUT_S = 10


def _original():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(97, 24, generator=g),
        "model.layers.0.w.weight": torch.randn(33, 17, generator=g).to(torch.float16),
        "model.layers.0.w.bias": torch.randn(33, generator=g).to(torch.bfloat16),
        "model.layers.0.q.qweight": torch.randint(-2**31, 2**31 - 1, (4, 40), generator=g, dtype=torch.int32),
        "model.layers.0.q.g_idx": torch.arange(40, dtype=torch.int32) // 8,
        "model.layers.1.norm.weight": torch.ones(3200),
        "model.scalar": torch.tensor(1.5),
        "lm_head.weight": torch.randn(5, 24, generator=g),
    }


def _mutate(folder, rng):
    """One random corruption of ``folder``; returns a description."""
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    kind = rng.choice(["truncate_shard", "flip_header", "flip_header", "flip_index", "flip_index",
                       "truncate_index"])
    if kind in ("flip_index", "truncate_index"):
        path = os.path.join(folder, SAFE_INDEX)
    else:
        path = os.path.join(folder, rng.choice(shards))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if kind.startswith("truncate"):
        cut = rng.randrange(0, len(data))
        data = data[:cut]
        what = f"{kind} {os.path.basename(path)} at {cut}/{len(data)}"
    else:
        if kind == "flip_header":
            n = struct.unpack("<Q", bytes(data[:8]))[0]
            pos = rng.randrange(0, 8 + n)
        else:
            pos = rng.randrange(0, len(data))
        old = data[pos]
        data[pos] = rng.choice([b for b in range(256) if b != old]) if rng.random() < 0.7 else old ^ (1 << rng.randrange(8))
        what = f"{kind} {os.path.basename(path)} byte {pos}: {old:#04x} -> {data[pos]:#04x}"
    with open(path, "wb") as f:
        f.write(bytes(data))
    return what


def _case(args):
    """Worker: copy the pristine folder, corrupt it, read it. Returns (description, outcome)."""
    src, seed = args
    torch.set_num_threads(1)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="fuzz-")
    try:
        folder = os.path.join(tmp, "ck")
        shutil.copytree(src, folder)
        what = _mutate(folder, rng)
        try:
            sd = load_state_dict(folder)
        except CheckpointError:
            return what, "error"
        except Exception as e:  # noqa: BLE001 - exactly what the test forbids
            return what, f"UNEXPECTED {type(e).__name__}: {e}"
        ref = _original()
        if sd.keys() != ref.keys():
            return what, f"DIFFERENT KEYS {sorted(set(sd) ^ set(ref))}"
        for k, t in ref.items():
            if sd[k].dtype != t.dtype or sd[k].shape != t.shape or not torch.equal(sd[k], t):
                return what, f"DIFFERENT TENSOR {k}"
        return what, "identical"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz") / "ck")
    files = save_state_dict(_original(), folder, max_shard_size=6 * 1024, metadata={"quantized_by": "test"})
    assert SAFE_INDEX in files and len(files) >= 4  # several shards + the index
    sd = load_state_dict(folder)
    assert all(torch.equal(sd[k], t) for k, t in _original().items())
    return folder


def test_corrupted_checkpoints_raise_checkpoint_error_or_load_identically(pristine):
    ctx = mp.get_context("fork")
    outcomes, bad = {"error": 0, "identical": 0}, []
    pool = ctx.Pool(1)
    try:
        for seed in range(N_CASES):
            res = pool.apply_async(_case, ((pristine, seed),))
            try:
                what, outcome = res.get(timeout=CASE_TIMEOUT_S)
            except mp.TimeoutError:
                pool.terminate()
                pytest.fail(f"case seed={seed} did not finish within {CASE_TIMEOUT_S} s (reader hangs)")
            if outcome in outcomes:
                outcomes[outcome] += 1
            else:
                bad.append(f"seed={seed} {what}: {outcome}")
    finally:
        pool.terminate()
        pool.join()
    assert not bad, "\n".join(bad)
    # the corpus exercised both outcomes (a fuzz run where nothing was detected would prove nothing)
    assert outcomes["error"] > N_CASES // 2 and outcomes["identical"] > 0, outcomes
