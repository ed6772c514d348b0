"""One run of every kernel of the CUDA extension at small, awkward shapes -- the program that
scripts/gpu_cuda_check.sh runs under compute-sanitizer (memcheck / racecheck / synccheck).

Shapes are chosen to hit every code path: sequence lengths that are not tile multiples (masking, zero-fill), odd
hidden sizes (scalar path), misaligned rows (narrow vectors), rows too long for the register-cached norm path, split-K
with a bias, act-order g_idx, 8-bit. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own
allocation and an out-of-bounds access is not hidden inside the caching allocator's blocks.

    python scripts/cuda_smoke.py [--only attention,quant_matmul]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, if not installed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated subset of: norms, shuffle, projector, attention, "
                                               "quant_matmul")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))

    from internvl_kernels.ops import _cuda

    if not _cuda.available():
        print(_cuda.status(), file=sys.stderr)
        return 2
    C = torch.ops.internvl_kernels_cuda
    dev = "cuda"
    torch.manual_seed(0)

    def want(name):
        return not only or name in only

    def r(*shape, dtype=torch.float16):
        return torch.randn(*shape, device=dev, dtype=dtype)

    ran = []
    if want("norms"):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for hidden in (3200, 1001, 5001):  # 16-byte path, scalar path, scalar + uncached (> 4096 vectors)
                x, res = r(3, 5, hidden, dtype=dt), r(3, 5, hidden, dtype=dt)
                w, b, s = r(hidden, dtype=dt), r(hidden, dtype=dt), r(hidden, dtype=dt)
                C.rms_norm(x, w, 1e-6)
                C.layer_norm(x, w, b, 1e-6)
                C.layer_norm(x, None, None, 1e-6)
                C.add_rms_norm(x, res, w, 1e-6, s)
                C.add_layer_norm(x, res, w, b, 1e-6, None)
            base = r(2, 7, 3201, dtype=dt)
            C.rms_norm(base[..., 1:], r(3200, dtype=dt), 1e-6)  # misaligned rows
            C.rms_norm(r(2, 40000, dtype=dt), r(40000, dtype=dt), 1e-6)  # uncached, vectorized
        ran.append("norms")
    if want("shuffle"):
        for dt in (torch.float32, torch.bfloat16):
            for (B, N, Ch, r_) in ((2, 64, 3200, 2), (1, 36, 7, 3), (2, 16, 5, 2)):
                x = r(B, N, Ch, dtype=dt)
                for v2 in (False, True):
                    C.pixel_shuffle(x, r_, v2)
                    C.pixel_shuffle_layer_norm(x, r(r_ * r_ * Ch, dtype=dt), r(r_ * r_ * Ch, dtype=dt), r_, v2, 1e-5)
        ran.append("shuffle")
    if want("projector"):
        for dt in (torch.float32, torch.bfloat16):
            x = r(1, 17, 1000, dtype=dt)
            C.mlp_projector(x, r(1000, dtype=dt), r(1000, dtype=dt), r(512, 1000, dtype=dt), r(512, dtype=dt),
                            r(256, 512, dtype=dt), r(256, dtype=dt), 1e-5)
            C.bias_gelu_(r(33, 517, dtype=dt), r(517, dtype=dt))
        ran.append("projector")
    if want("attention"):
        for dt in (torch.float16, torch.bfloat16):
            for D in (64, 128):
                for S, SK in ((97, 97), (1, 65), (130, 17)):
                    C.attention(r(2, S, 3, D, dtype=dt), r(2, SK, 3, D, dtype=dt), r(2, SK, 3, D, dtype=dt), None)
                qkv = r(2, 97, 3 * 4 * D, dtype=dt)
                C.qk_norm_attention(qkv, r(4 * D, dtype=dt), r(4 * D, dtype=dt), 4, 1e-6, None)
            q, k, v = r(1, 33, 3, 2, 128, dtype=dt).unbind(2)  # strided views
            C.attention(q, k, v, 0.1)
        ran.append("attention")
    if want("quant_matmul"):
        from internvl_kernels.quant import formats as fm

        K, N = 1024, 512
        for bits in (4, 8):
            for version in (1, 2):
                iw = torch.randint(0, 2**bits, (N, K), dtype=torch.int32)
                zeros = torch.randint(1, 2**bits, (K // 128, N), dtype=torch.int32)
                qw, qz = fm.pack_gptq(iw, zeros, bits, version)
                sc = (torch.rand(K // 128, N) * 0.01).half()
                perm = torch.randperm(K)
                gi = fm.make_g_idx(K, 128, perm=perm)
                qw, qz, sc, gi = qw.to(dev), qz.to(dev), sc.to(dev), gi.to(dev)
                for dt in (torch.float16, torch.bfloat16):
                    for M in (1, 17):
                        x = r(M, K, dtype=dt)
                        C.quant_matmul(x, qw, sc, qz, None, r(N, dtype=dt), bits, 128, 2 - version)
                        C.quant_matmul(x, qw, sc, qz, gi, None, bits, 128, 2 - version)
                        C.quant_matmul(x, qw, sc.float(), qz, None, None, bits, 128, 2 - version)
        ran.append("quant_matmul")
    torch.cuda.synchronize()
    print("cuda_smoke: ran", ", ".join(ran))
    return 0


if __name__ == "__main__":
    sys.exit(main())
