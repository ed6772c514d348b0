"""quant_matmul (W4/W8 A16, group 128) vs bf16 ``torch.matmul`` (cuBLAS), and decode tokens/s of a quantized
LLaMA2-13B-shaped model vs bf16.

GEMM rows: M ∈ {1, 4, 16, 64, 128, 1024} × the LLaMA2-13B Linear shapes (in×out: 5120×13824 gate/up, 13824×5120
down, 5120×5120 q/k/v/o) and the InternViT-6B ones (3200×9600 qkv, 3200×12800 fc1, 12800×3200 fc2), 4 and 8 bits,
GPTQ layout (4-bit also AWQ). ``bytes_moved`` = packed weight + scales + zeros + activations in + out, so
``frac_copy_bw`` is the fraction of the copy bandwidth measured in the same run. Each quantized row also times the bf16
cuBLAS GEMM rows (``test_bf16_matmul_gpu``, the same shapes, timed the same way — CUDA events, L2 flushed before each
call — in the same run) are the baseline: the results files store ``speedup_vs_best_baseline`` per quantized row
(targets on an H100: ≥ 3.0× at M ≤ 16, ≥ 0.9× at M = 128; ``meets_target``). Weights are random bit patterns
(every int32 is a valid packed tensor): timing does not depend on values.

Decode rows: a LLaMA2-13B-shaped ``LlamaForCausalLM`` (hidden 5120, MLP 13824, 40 heads, vocab 32000) with random
weights and **4 decoder layers instead of 40** (tokens/s scale ~1/layers; the ratio quantized/bf16 is what matters),
greedy ``generate`` of 32 tokens after an 8-token prompt, batch 1.

On a CPU (no GPU): the full-shape rows skip with a reason; tiny rows run (Triton in the interpreter, the eager
dequantize path) so the file cannot rot — their numbers mean nothing for speed.
"""
from __future__ import annotations


import pytest
import torch

import internvl_kernels
from internvl_kernels import _backend
from internvl_kernels.ops.quant_matmul import packed_shapes, quant_matmul

LLAMA13B = {"gate_up_5120x13824": (5120, 13824), "down_13824x5120": (13824, 5120), "qkvo_5120x5120": (5120, 5120)}
VIT6B = {"qkv_3200x9600": (3200, 9600), "fc1_3200x12800": (3200, 12800), "fc2_12800x3200": (12800, 3200)}
SHAPES = {**LLAMA13B, **VIT6B}
MS = (1, 4, 16, 64, 128, 1024)
FORMATS = [("gptq", 4), ("awq", 4), ("gptq", 8)]


def random_packed(K: int, N: int, bits: int, group_size: int, layout: str, device) -> dict:
    """Random packed tensors of the right shapes (any int32 bit pattern is a valid code word)."""
    shp = packed_shapes(K, N, bits, group_size, layout)
    g = torch.Generator(device=device).manual_seed(0)

    def rand_i32(shape):
        return torch.randint(-2**31, 2**31 - 1, shape, generator=g, device=device, dtype=torch.int64).to(torch.int32)

    scales = (torch.rand(shp["scales"], generator=g, device=device) * 2e-3 + 1e-3).to(torch.float16)
    return {"qweight": rand_i32(shp["qweight"]), "qzeros": rand_i32(shp["qzeros"]), "scales": scales}


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _qmm(backend):
    def run(x, t, bits, gs, layout):
        with internvl_kernels.set_backend(backend), torch.no_grad():
            return quant_matmul(x, t["qweight"], t["scales"], t["qzeros"], None, bits, gs, layout)

    return run


# ------------------------------------------------------------------------------------------------ GEMM rows
@pytest.mark.gpu
@pytest.mark.benchmark(group="quant_matmul")
@pytest.mark.parametrize("layout,bits", FORMATS, ids=[f"{lay}{b}" for lay, b in FORMATS])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_quant_matmul_gpu(bench_run, bench_device, shape, M, layout, bits, impl):
    if impl == "cuda" and "cuda" not in _backend.available_impls("quant_matmul"):
        pytest.skip("the CUDA extension (internvl_kernels._C) is not built: no 'cuda' quant_matmul to time")
    if impl == "cuda":
        from internvl_kernels.ops import _cuda

        max_m = getattr(_cuda, "QUANT_MATMUL_MAX_M", 16)
        if layout == "awq" or M > max_m:
            pytest.skip(f"the CUDA quant_matmul covers GPTQ at M <= {max_m} only; this row would time its Triton "
                        "fallback")
    K, N = SHAPES[shape]
    gs = 128
    dev = bench_device
    t = random_packed(K, N, bits, gs, layout, dev)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w_bf16 = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    moved = _nbytes(t["qweight"], t["qzeros"], t["scales"], x) + M * N * 2
    target = 3.0 if M <= 16 else 0.9 if M == 128 else None
    # the bf16 cuBLAS baseline is its own row (test_bf16_matmul_gpu), timed the same way in the same run; the
    # results writer pairs them on (M, K, N) and stores speedup_vs_best_baseline / meets_target
    bench_run(_qmm(impl), x, t, bits, gs, layout, bytes_moved=moved, flops=2 * M * N * K, flush_l2=True,
              match=("M", "K", "N"), target_speedup=target,
              shapes={"M": M, "K": K, "N": N, "case": shape, "bits": bits, "group_size": gs, "layout": layout},
              dtype=torch.bfloat16, impl=f"{impl}-{layout}-w{bits}")


@pytest.mark.gpu
@pytest.mark.benchmark(group="quant_matmul")
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bf16_matmul_gpu(bench_run, bench_device, shape, M):
    """The cuBLAS baseline as its own rows (same shapes, bf16 weight K×N)."""
    K, N = SHAPES[shape]
    x = torch.randn(M, K, device=bench_device, dtype=torch.bfloat16)
    w = torch.randn(K, N, device=bench_device, dtype=torch.bfloat16)
    bench_run(torch.matmul, x, w, bytes_moved=(K * N + M * K + M * N) * 2, flops=2 * M * N * K, flush_l2=True,
              shapes={"M": M, "K": K, "N": N, "case": shape}, dtype=torch.bfloat16, impl="torch.matmul-bf16")


@pytest.mark.benchmark(group="quant_matmul_cpu")
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_quant_matmul_tiny_cpu(bench_run, bench_device, M, impl):
    """Tiny row that runs everywhere (CPU: eager dequantize path / Triton interpreter) — keeps the file alive."""
    if bench_device.type == "cuda":
        pytest.skip("CPU-only smoke row; the GPU rows above are the measurement")
    K, N, gs = 256, 128, 128
    t = random_packed(K, N, 4, gs, "gptq", bench_device)
    x = torch.randn(M, K, device=bench_device)
    moved = _nbytes(t["qweight"], t["qzeros"], t["scales"], x) + M * N * 4
    bench_run(_qmm(impl), x, t, 4, gs, "gptq", bytes_moved=moved,
              flops=2 * M * N * K, shapes={"M": M, "K": K, "N": N}, dtype=torch.float32,
              impl=f"{impl}-interpreter" if impl == "triton" else impl, rounds=2)


# ----------------------------------------------------------------------------------------------- decode rows
def _llama(hidden, inter, heads, layers, vocab, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(dtype)
    return m.eval()


def _quantize_random_(model, bits, gs, layout):
    """Every decoder Linear → QuantLinear with random packed tensors (lm_head stays bf16, as checkpoints keep it)."""
    from internvl_kernels.quant import QuantLinear
    from internvl_kernels.quant.loading import set_submodule

    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            t = random_packed(mod.in_features, mod.out_features, bits, gs, layout, mod.weight.device)
            q = QuantLinear.from_packed(t["qweight"], t["qzeros"], t["scales"], None, bits=bits, group_size=gs,
                                        layout=layout, dtype=mod.weight.dtype)
            set_submodule(model.model.layers, name, q.to(mod.weight.device))
    return model


def _decode(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.mark.benchmark(group="quant_decode")
@pytest.mark.parametrize("variant", ["bf16", "w4-gptq", "w8-gptq", "w4-awq"])
def test_decode_tokens_per_s(bench_run, benchmark, bench_device, full_shapes, variant):
    dev = bench_device
    if dev.type == "cuda" and full_shapes:
        hidden, inter, heads, layers, vocab, new, dtype = 5120, 13824, 40, 4, 32000, 32, torch.bfloat16
    else:  # CPU smoke: a toy model; the quantized rows run the eager dequantize path
        hidden, inter, heads, layers, vocab, new, dtype = 256, 512, 4, 2, 512, 4, torch.float32
    model = _llama(hidden, inter, heads, layers, vocab, dtype, dev)
    if variant != "bf16":
        bits = int(variant[1])
        _quantize_random_(model, bits, 128, variant.split("-")[1])
    prompt = torch.randint(0, vocab, (1, 8), device=dev)
    bench_run(_decode, model, prompt, new, shapes={"hidden": hidden, "intermediate": inter, "layers": layers,
                                                    "vocab": vocab, "new_tokens": new, "batch": 1,
                                                    "note": "LLaMA2-13B widths, 4 of 40 layers" if hidden == 5120
                                                    else "toy CPU smoke model"},
              dtype=dtype, impl=f"generate-{variant}", rounds=5)
    benchmark.extra_info["tokens_per_s"] = round(new / benchmark.stats.stats.median, 2)
    benchmark.extra_info["weight_bytes"] = sum(t.numel() * t.element_size() for t in
                                               list(model.parameters()) + list(model.buffers()))
