"""``g_idx`` values outside ``[0, groups)`` are refused by every quant_matmul path (public function, the custom op
called directly, the Triton and CUDA implementations) as by the eager reference — never read out of bounds — and the
quantized loader names the layer whose ``g_idx`` is bad."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import internvl_kernels
import quantize
from internvl_kernels.model import CheckpointError, InternVLChatModel
from internvl_kernels.model.testing import write_checkpoint
from internvl_kernels.ops import _cuda
from internvl_kernels.ops.quant_matmul import quant_matmul, quant_matmul_triton
from quantize.cli import main

K, N, GS = 64, 32, 32


@pytest.fixture(scope="module")
def packed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    r = quantize.quantize_linear(w, None, "rtn", bits=4, group_size=GS)
    t = r.pack("gptq")
    x = torch.randn(3, K, generator=g)
    return x, t


def _bad(t, value):
    g = t["g_idx"].clone()
    g[5] = value
    return g


def _args(x, t, g):
    return x, t["qweight"], t["scales"], t["qzeros"], g


@pytest.mark.parametrize("value", [99, 2, -1])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_public_and_custom_op_refuse_out_of_range_g_idx(packed, backend, value):
    x, t = packed
    g = _bad(t, value)
    with internvl_kernels.backend(backend):
        with pytest.raises(ValueError, match=r"g_idx.*\[0, 2\)"):
            quant_matmul(*_args(x, t, g), bits=4, group_size=GS, layout="gptq")
        with pytest.raises(ValueError, match=r"g_idx.*\[0, 2\)"):
            torch.ops.internvl_kernels.quant_matmul(*_args(x, t, g), None, 4, GS, "gptq")
        # a valid act-order style g_idx still runs and matches eager
        ok = t["g_idx"].flip(0).contiguous()
        y = quant_matmul(*_args(x, t, ok), bits=4, group_size=GS, layout="gptq")
    with internvl_kernels.backend("eager"):
        ref = quant_matmul(*_args(x, t, ok), bits=4, group_size=GS, layout="gptq")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [99, -1])
def test_triton_impl_and_cuda_wrapper_check_range(packed, value):
    x, t = packed
    g = _bad(t, value)
    with pytest.raises(ValueError, match=r"g_idx.*\[0, 2\)"):
        quant_matmul_triton(*_args(x, t, g), None, 4, GS, "gptq")
    with pytest.raises(ValueError, match=r"g_idx.*\[0, 2\)"):
        _cuda.quant_matmul(*_args(x, t, g), None, 4, GS, "gptq")
    # a tensor that was valid when first checked and then edited in place is checked again
    g2 = t["g_idx"].clone()
    quant_matmul_triton(*_args(x, t, g2), None, 4, GS, "gptq")
    g2[0] = 7
    with pytest.raises(ValueError, match=r"g_idx"):
        quant_matmul_triton(*_args(x, t, g2), None, 4, GS, "gptq")


def test_loader_names_the_layer_with_bad_g_idx(tmp_path, capsys):
    src = write_checkpoint(str(tmp_path / "v1_2"), "v1.2", seed=2)
    q = str(tmp_path / "q")
    assert main(["--model", src, "--out", q, "--method", "rtn", "--parts", "llm", "--group-size", "32",
                 "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-images", "1",
                 "--max-calib-images", "1", "--mm-samples", "0", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    key = "language_model.model.layers.1.mlp.down_proj.g_idx"
    for name in sorted(os.listdir(q)):
        if name.endswith(".safetensors"):
            sd = load_file(os.path.join(q, name))
            if key in sd:
                sd[key][3] = 99
                save_file(sd, os.path.join(q, name), metadata={"format": "pt"})
                break
    else:
        raise AssertionError(f"{key} not written")
    with pytest.raises(CheckpointError, match=r"language_model\.model\.layers\.1\.mlp\.down_proj.*g_idx.*99"):
        InternVLChatModel.from_pretrained(q)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("value", [99, -1])
def test_gpu_paths_refuse_out_of_range_g_idx(packed, backend, value):
    """On a GPU: the Triton kernel and the CUDA extension (where built; else its fallback) never see a bad g_idx."""
    x, t = packed
    x = x.cuda().half()
    t = {k: v.cuda() for k, v in t.items()}
    g = _bad(t, value)
    with internvl_kernels.backend(backend):
        with pytest.raises(ValueError, match=r"g_idx.*\[0, 2\)"):
            torch.ops.internvl_kernels.quant_matmul(*_args(x, t, g), None, 4, GS, "gptq")
        ok = t["g_idx"].flip(0).contiguous()
        y = torch.ops.internvl_kernels.quant_matmul(*_args(x, t, ok), None, 4, GS, "gptq")
    with internvl_kernels.backend("eager"):
        ref = quant_matmul(*_args(x.cpu().float(), {k: v.cpu() for k, v in t.items()}, ok.cpu()), bits=4,
                           group_size=GS, layout="gptq")
    torch.testing.assert_close(y.float().cpu(), ref, rtol=2e-2, atol=2e-2)
