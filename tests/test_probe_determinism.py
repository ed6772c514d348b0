"""The same quantization command, run twice in separate processes, writes byte-identical checkpoint files.

``quant_report.json`` is the one file excluded: it records wall-clock times and peak memory by design. Every other
file (safetensors shards — header metadata included —, the index, config.json, quantize_config.json, tokenizer
files) must have the same sha256.
"""
import hashlib
import os
import struct
import subprocess
import sys

import torch

from internvl_kernels.checkpoint.files import save_state_dict
from internvl_kernels.model.testing import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCLUDED = {"quant_report.json"}  # timings and peak memory


def _digests(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n not in EXCLUDED}


def test_two_processes_write_identical_bytes(tmp_path):
    src = write_checkpoint(str(tmp_path / "v1_5"), "v1.5", seed=3)
    digests = []
    for i in range(2):
        out = str(tmp_path / f"q{i}")
        cmd = [sys.executable, "-m", "quantize", "--model", src, "--out", out, "--bits", "4", "--group-size", "32",
               "--act-order", "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-images", "1",
               "--max-calib-images", "1", "--mm-samples", "1", "--max-shard-size", "200KB", "--no-progress",
               "--device", "cpu", "--seed", "0"]
        env = {**os.environ, "PYTHONHASHSEED": str(1000 + i)}  # different hash seeds, like two fresh shells
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        digests.append(_digests(out))
    assert any(n.endswith(".safetensors") for n in digests[0]) and "model.safetensors.index.json" in digests[0]
    assert digests[0].keys() == digests[1].keys()
    differ = [n for n in digests[0] if digests[0][n] != digests[1][n]]
    assert not differ, f"files differ between two identical runs: {differ}"


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return f.read(n)


def test_safetensors_metadata_in_fixed_order(tmp_path):
    """Metadata written in sorted key order whatever order the caller's dict has (the library's own order is
    per-process random)."""
    sd = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.int32)}
    headers = set()
    for i, meta in enumerate([{"quantized_by": "x", "zz": "1", "aa": "2"}, {"aa": "2", "zz": "1", "quantized_by": "x"}]):
        save_state_dict(sd, str(tmp_path / f"s{i}"), metadata=meta)
        headers.add(_header(str(tmp_path / f"s{i}" / "model.safetensors")))
    (h,) = headers
    assert h.startswith(b'{"__metadata__":{"aa":"2","format":"pt","quantized_by":"x","zz":"1"}')
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s0" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"aa": "2", "format": "pt", "quantized_by": "x", "zz": "1"}
        assert torch.equal(f.get_tensor("b"), sd["b"]) and torch.equal(f.get_tensor("a"), sd["a"])
