"""Shared bits of the kernel benchmarks (bench/bench_<op>.py): shapes, dtypes, backend-pinned callables."""
from __future__ import annotations

import pytest
import torch

from internvl_kernels import set_backend

# InternViT-6B: 3200 channels = 25 heads x 128, MLP 12800; 448 px tile = 1024 patches + cls
C6B, H6B, D6B, I6B = 3200, 25, 128, 12800
# InternViT-300M: 1024 channels = 16 heads x 64
C300M, H300M, D300M = 1024, 16, 64
LLM_HIDDEN = 6144  # InternLM2-20B (V1.5); 5120 for LLaMA2-13B (V1.1), 7168 for Yi-34B (V1.2)


def dtype_for(dev: torch.device) -> torch.dtype:
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def tiles_tokens(full: bool):
    """(tiles, tokens per tile): 13 x 1025 on a GPU; tiny on CPU, where Triton runs in the interpreter."""
    return (13, 1025) if full else (1, 17)


def impl_label(impl: str, dev: torch.device) -> str:
    """Rows whose Triton kernels ran in the interpreter (CPU) say so: their times are not kernel speeds."""
    runs_triton = impl.startswith(("triton", "auto")) or impl.endswith("triton_norm")
    return f"{impl}-interpreter" if runs_triton and dev.type != "cuda" else impl


def pinned(fn, backend: str):
    """``fn`` run under ``set_backend(backend)`` (the switch is a context variable: cheap)."""

    def run(*args, **kwargs):
        with set_backend(backend), torch.no_grad():
            return fn(*args, **kwargs)

    run.__name__ = f"{getattr(fn, '__name__', 'fn')}[{backend}]"
    return run


@pytest.fixture
def cuda_fn():
    """``cuda_fn(fn, op, *args)``: ``fn`` pinned to the CUDA backend, after checking that the extension's kernel
    really runs for these inputs (the ``cuda:<op>`` launch counter), so a call handed on to Triton can't be reported
    as a CUDA number. Skips with the loader's reason when the extension is not built."""
    from internvl_kernels.ops import _common, _cuda

    if not _cuda.available():
        pytest.skip(_cuda.status())

    def make(fn, op, *args):
        run = pinned(fn, "cuda")
        before = _common.launches("cuda:" + op)
        run(*args)
        if _common.launches("cuda:" + op) == before:
            pytest.fail(f"{op}: the CUDA kernel did not run for these inputs (routed elsewhere)")
        return run

    return make


# the backends every op's benchmark has as rows; the cuda rows need a GPU and the extension
IMPLS = ("eager", "triton", pytest.param("cuda", marks=pytest.mark.gpu))


def row_fn(request, impl: str, reference, op_fn, op: str, *args):
    """The callable a row times: the eager ``reference`` or ``op_fn`` pinned to ``impl``; for ``cuda`` after checking
    (:func:`cuda_fn`) that the extension's kernel really runs for ``args``."""
    if impl == "cuda":
        return request.getfixturevalue("cuda_fn")(op_fn, op, *args)
    return pinned(reference if impl == "eager" else op_fn, impl)


def residual_norm_bench(op: str, reference, op_fn, C: int, with_bias: bool):
    """The benchmark of a fused residual + norm op (``add_rms_norm`` / ``add_layer_norm``) over :data:`IMPLS`.

    GB/s counts the fused op's traffic (read x and residual, write the new residual and the normed output: 4
    tensors); the eager rows move the same useful bytes in five kernels (mul, add, norm)."""

    @pytest.mark.benchmark(group=op)
    @pytest.mark.parametrize("impl", IMPLS)
    def bench(request, bench_run, bench_device, full_shapes, impl):
        dt = dtype_for(bench_device)
        tiles, seq = tiles_tokens(full_shapes)
        g = dict(device=bench_device, dtype=dt)
        x, res = torch.randn(tiles, seq, C, **g), torch.randn(tiles, seq, C, **g)
        w, b, ls = torch.randn(C, **g), torch.randn(C, **g), torch.randn(C, **g)
        args = (x, res, w, b, 1e-6, ls) if with_bias else (x, res, w, 1e-6, ls)
        bench_run(row_fn(request, impl, reference, op_fn, op, *args), *args,
                  bytes_moved=4 * x.numel() * x.element_size(), shapes={"tiles": tiles, "seq": seq, "hidden": C},
                  dtype=dt, impl=impl_label(impl, bench_device))

    bench.__name__ = f"test_{op}"
    return bench
