// Index maps of the CUDA kernels, shared by the kernels and by the CPU emulation test (csrc/test/host_layout_test.cpp,
// compiled with a plain C++ compiler by tests/test_csrc_compile.py). Pure integer arithmetic, no CUDA headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IK_HD __host__ __device__ __forceinline__
#else
#define IK_HD inline
#endif

namespace ik {

// ------------------------------------------------------------------------------------ shared-memory swizzle
// Element offset of (row, 16-byte chunk) in a [rows][D] tile of 16-bit values whose chunk index is XOR-ed with
// row % 8. ldmatrix reads 8 rows at one logical chunk; the XOR spreads them over 8 distinct 16-byte bank groups
// (row pitch is 128 or 256 bytes, a multiple of the 128-byte bank window), so reads and the cp.async writes
// (8 consecutive threads = one row's chunks, permuted) are conflict-free.
template <int D>
IK_HD constexpr int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// ------------------------------------------------------------------------------------------ ldmatrix maps
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of every lane receives matrix i.
// A operand (16x16 at rows r0.., chunks 2kk, 2kk+1): matrices (rows 0-7, c0) (rows 8-15, c0) (0-7, c1) (8-15, c1)
// -> registers a0..a3 directly. The same map serves the transposed V load (keys 0-7 / 8-15, d-chunks 2dp / 2dp+1
// -> b0, b1 of d-tile 2dp and b0, b1 of d-tile 2dp+1).
IK_HD constexpr int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
IK_HD constexpr int ldsm_a_chunk(int lane) { return lane >> 4; }
// B operand from a [n][k] tile (K of attention): matrices (n 0-7, c0) (n 0-7, c1) (n 8-15, c0) (n 8-15, c1)
// -> registers (b0, b1) of n-tile 0 and (b0, b1) of n-tile 1.
IK_HD constexpr int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
IK_HD constexpr int ldsm_b_chunk(int lane) { return (lane >> 3) & 1; }

// -------------------------------------------------------------------------------------- quant_matmul maps
namespace qmm {
// local k (0..63 within a 64-k chunk) feeding mma k-step kk, slot half (0: slots 2t,2t+1; 1: slots 2t+8,2t+9),
// element jj, for lane (g, t). Lane t owns local k 16t..16t+15.
IK_HD constexpr int local_k(int t, int kk, int half, int jj) { return 16 * t + 8 * half + 2 * kk + jj; }
// Exact-integer path (no act-order, group_size % 64 == 0): the codes go into the mma as exact small integers
// (n - zero) made by the magic-number trick, which yields the pair of codes (nibble i, nibble i+4) -- or bytes
// (i, i+2) for 8-bit -- of one packed word in one 32-bit register. The k permutation follows that pairing:
IK_HD constexpr int local_k_int(int bits, int t, int kk, int half, int jj) {
  return bits == 4 ? 16 * t + 8 * half + kk + 4 * jj : 16 * t + 8 * half + 4 * (kk >> 1) + (kk & 1) + 2 * jj;
}
// packed word (of the lane's 16 / bits words) and right shift that bring that pair to bits 0 and 16
IK_HD constexpr int int_word(int bits, int kk, int half) { return bits == 4 ? half : 2 * half + (kk >> 1); }
IK_HD constexpr int int_shift(int bits, int kk) { return bits == 4 ? 4 * kk : 8 * (kk & 1); }
// PRMT selector that packs 16-bit elements e0 (low half) and e1 (high half) of a run stored as 32-bit words of
// two elements, from words e0/2 (operand a, bytes 0-3) and e1/2 (operand b, bytes 4-7).
IK_HD constexpr uint32_t x_pair_selector(int e0, int e1) {
  return ((e0 & 1) ? 0x32u : 0x10u) | (((e1 & 1) ? 0x76u : 0x54u) << 8);
}
// output columns of a lane's C fragments: 8t + 4h + j (h = c & 1), i.e. two runs of 4 consecutive columns
// output column (0..31 within the CTA) of C fragment element c (0..3) of n-tile j for lane (g, t).
IK_HD constexpr int out_col(int t, int c, int j) { return 4 * (2 * t + (c & 1)) + j; }
IK_HD constexpr int out_row(int g, int c) { return g + 8 * (c >> 1); }
// column (0..31) whose weights lane (g, t) loads as its j-th column (= its B slot g in n-tile j).
IK_HD constexpr int load_col(int g, int j) { return 4 * g + j; }
// GPTQ packing: value k of a [K, N] code matrix sits in qweight[k / per][n], bits [bits*(k % per), +bits).
IK_HD constexpr int values_per_word(int bits) { return 32 / bits; }
// qzeros [groups, N*bits/32]: zero of column n sits in word n / per of its row, bits [bits*(n % per), +bits).
IK_HD constexpr int64_t zero_word(int64_t n, int bits) { return n / values_per_word(bits); }
IK_HD constexpr int zero_shift(int64_t n, int bits) { return bits * static_cast<int>(n % values_per_word(bits)); }
}  // namespace qmm

// ------------------------------------------------------------------------------------- pixel_shuffle map
// Output token t of the (side/r)^2 grid, chunk = ir*r + jr of its r*r*C channels -> input token (within the batch
// element). v1: t = j2*so + i2; v2: t = i2*so + j2 (so = side / r); input token (i2*r + ir)*side + (j2*r + jr).
struct ShuffleMap {
  int side, r, so;
  bool v2;
  IK_HD int64_t src_token(int t, int chunk) const {
    const int a = t / so;
    const int c = t - a * so;
    const int i2 = v2 ? a : c;
    const int j2 = v2 ? c : a;
    const int ir = chunk / r;
    const int jr = chunk - ir * r;
    return static_cast<int64_t>(i2 * r + ir) * side + (j2 * r + jr);
  }
};

}  // namespace ik
