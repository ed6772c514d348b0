// quant_matmul: W4A16 / W8A16 GEMM for small M (decode), GPTQ layout, on tensor cores.
//
// out[M, N] = x[M, K] @ W[K, N], W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n], g = g_idx[k] (or k / group_size).
//
// Work split: a CTA (8 warps) owns 32 output columns and 16 rows of M (blockIdx.x, blockIdx.z); blockIdx.y is the
// split-K slice. K is cut into 64-wide chunks; warp w of the CTA takes chunks w, w+8, ... of its slice, so the 8
// warps stream disjoint qweight rows, then reduce through shared memory; split-K slices are summed by a second
// tiny kernel from an fp32 workspace in a fixed order (deterministic, no atomics).
//
// The trick that keeps the loads wide: mma's k index is only a summation index, so any permutation applied to
// both operands is free. In a chunk, lane (g = lane/4, t = lane%4) owns the 16 consecutive k's 16t..16t+15 and the
// 4 consecutive columns 4g..4g+3:
//   * qweight: its 16 k's are 2 (4-bit) or 4 (8-bit) whole packed int32 rows -> 16-byte loads of 4 columns; the 8
//     lanes of a packed row read 128 contiguous bytes.
//   * x: its 16 k's are 32 contiguous bytes of row g (and of row g+8).
//   * n-tile j (of 4) holds column 4g'+j in its slot g', so C fragment (c, j) of lane (g, t) is row g + 8*(c/2),
//     column 8t + 4*(c%2) + j.
// Two ways to feed the codes (index maps in ik_layout.h, checked on the CPU by csrc/test/host_layout_test.cpp):
//   * exact-integer path (g_idx == null, group_size % 64 == 0 -- every chunk lies in one group): one LOP3 turns two
//     codes of a packed word into the fp16 pair (1024 + n_a, 1024 + n_b) (bf16: 128 + n), one HSUB2 subtracts the
//     zero: the B operand is the exact integer n - z. The chunk's fp32 product x @ (n - z) is then scaled per
//     output column -- more exact than dequantize-then-round, and ~1.5 instructions per weight. The k permutation
//     follows the code pairing (nibbles i, i+4 / bytes i, i+2); A pairs are rebuilt with one PRMT each.
//     bf16 with 8-bit codes goes through fp32 (128 + n is not exact in bf16), still exact.
//   * general path (act-order g_idx, other group sizes): per weight in fp32, w = fma(q, s, -z*s) (exact in fp32
//     for fp16 scales), rounded once to the activation dtype; scale/zero looked up per k through g_idx, reloaded
//     only when the group changes. k-step kk takes local k (2kk, 2kk+1) in slots (2t, 2t+1) and (8+2kk, 9+2kk)
//     in slots (2t+8, 2t+9), so A registers are the plain 32-bit words of the x run.
// Not tuned on a GPU yet (no device was available when this was written); see bench/bench_quant_matmul.py.
#include "ik_mma.cuh"

namespace ik {
namespace qmm {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBN = 32;     // output columns per CTA
constexpr int kBM = 16;     // rows of M per CTA
constexpr int kChunk = 64;  // k per warp iteration

template <int BITS>
struct Raw {
  static constexpr int kWords = 16 * BITS / 32;  // packed int32 rows per 16 k
  uint32_t xa[8];                                  // x row g, k 16t..16t+15 as 8 bf16x2/half2 words
  uint32_t xb[8];                                  // x row g+8
  uint32_t q[kWords][4];                           // [packed row][column j]
};

template <typename T, int BITS>
__device__ __forceinline__ void load_raw(Raw<BITS>& raw, const QuantMatmulArgs& p, int64_t kbase, int m0, int n0,
                                         int g) {
  const bool kvalid = kbase < p.K;  // K % 16 == 0: the thread's 16 k's are all valid or all past K
  const T* x = static_cast<const T*>(p.x);
  const int64_t ra = m0 + g;
  const int64_t rb = m0 + g + 8;
  if (kvalid && ra < p.M) {
    const uint4* src = reinterpret_cast<const uint4*>(x + ra * p.x_stride + kbase);
    IK_CHECK_ALIGNED(src, 16);
    const uint4 lo = src[0], hi = src[1];
    raw.xa[0] = lo.x, raw.xa[1] = lo.y, raw.xa[2] = lo.z, raw.xa[3] = lo.w;
    raw.xa[4] = hi.x, raw.xa[5] = hi.y, raw.xa[6] = hi.z, raw.xa[7] = hi.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) raw.xa[i] = 0u;
  }
  if (kvalid && rb < p.M) {
    const uint4* src = reinterpret_cast<const uint4*>(x + rb * p.x_stride + kbase);
    IK_CHECK_ALIGNED(src, 16);
    const uint4 lo = src[0], hi = src[1];
    raw.xb[0] = lo.x, raw.xb[1] = lo.y, raw.xb[2] = lo.z, raw.xb[3] = lo.w;
    raw.xb[4] = hi.x, raw.xb[5] = hi.y, raw.xb[6] = hi.z, raw.xb[7] = hi.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) raw.xb[i] = 0u;
  }
#pragma unroll
  for (int w = 0; w < Raw<BITS>::kWords; ++w) {
    if (kvalid) {
      const int64_t prow = kbase / values_per_word(BITS) + w;
      const int32_t* src = p.qweight + prow * p.N + n0 + load_col(g, 0);
      IK_CHECK_ALIGNED(src, 16);
      const uint4 v = *reinterpret_cast<const uint4*>(src);
      raw.q[w][0] = v.x, raw.q[w][1] = v.y, raw.q[w][2] = v.z, raw.q[w][3] = v.w;
    } else {
      raw.q[w][0] = raw.q[w][1] = raw.q[w][2] = raw.q[w][3] = 0u;
    }
  }
}

// scale and -zero*scale of group `grp` for this lane's 4 columns.
template <typename S, int BITS>
__device__ __forceinline__ void load_group(const QuantMatmulArgs& p, int64_t grp, int n0, int g, float (&sc)[4],
                                           float (&zs)[4]) {
  const Vec<S, 4> sv =
      load_vec<S, 4>(static_cast<const S*>(p.scales) + grp * p.N + n0 + load_col(g, 0));
  const int64_t zwords_per_row = p.N * BITS / 32;
  const int col0 = n0 + load_col(g, 0);  // multiple of 4
  const uint32_t zw = static_cast<uint32_t>(p.qzeros[grp * zwords_per_row + zero_word(col0, BITS)]);  // 4 cols, 1 word
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int z = static_cast<int>((zw >> zero_shift(col0 + j, BITS)) & ((1u << BITS) - 1u)) + p.zero_offset;
    sc[j] = to_f<S>(sv.v[j]);
    zs[j] = -static_cast<float>(z) * sc[j];
  }
}

// Exact small integer -> float: 2^23 + v has v in its mantissa.
__device__ __forceinline__ float u2f_exact(uint32_t v) { return __uint_as_float(0x4B000000u | v) - 8388608.f; }

template <typename T, typename S, int BITS>
__device__ __forceinline__ void compute_chunk(const Raw<BITS>& raw, const QuantMatmulArgs& p, int64_t kbase, int n0,
                                              int g, float (&acc)[4][4]) {
  const bool kvalid = kbase < p.K;
  float sc[4] = {0.f, 0.f, 0.f, 0.f}, zs[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t cur = -1;
  // One k-step at a time (keeps 8 B registers live instead of 32): step kk uses local k 2kk, 2kk+1 (b0) and
  // 8+2kk, 9+2kk (b1).
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t b[4][2];  // [n-tile j][b0/b1]
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float w[2][4];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int e = local_k(0, kk, half, jj);  // 0..15 within the thread's run
        if (kvalid) {
          const int64_t k = kbase + e;
          const int64_t grp = p.g_idx[k];
          if (grp != cur) {
            cur = grp;
            load_group<S, BITS>(p, grp, n0, g, sc, zs);
          }
        }
        constexpr int kPer = values_per_word(BITS);  // kbase % 16 == 0: local k e is in word e / kPer
        const int word = e / kPer;
        const int shift = BITS * (e % kPer);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float qv = u2f_exact((raw.q[word][j] >> shift) & ((1u << BITS) - 1u));
          // Past K: raw.q, sc and zs are 0, so w = 0 (finite) and A is 0 as well.
          w[jj][j] = fmaf(qv, sc[j], zs[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j][half] = pack2<T>(w[0][j], w[1][j]);
    }
    const uint32_t a[4] = {raw.xa[kk], raw.xb[kk], raw.xa[4 + kk], raw.xb[4 + kk]};
#pragma unroll
    for (int j = 0; j < 4; ++j) mma16816<T>(acc[j], a, b[j][0], b[j][1]);
  }
}

// ------------------------------------------------------------------------------------ exact-integer path
// Elements e0, e1 of the lane's 16-element x run (8 words of 2) as one register (one PRMT, or a plain word).
__device__ __forceinline__ uint32_t x_pair(const uint32_t (&w)[8], int e0, int e1) {
  if ((e0 & 1) == 0 && e1 == e0 + 1) return w[e0 >> 1];
  return __byte_perm(w[e0 >> 1], w[e1 >> 1], x_pair_selector(e0, e1));
}

// Per-column constant of code_pair: fp16 (1024 + z, 1024 + z); bf16 4-bit (128 + z, 128 + z); bf16 8-bit the
// fp32 bits of 2^23 + z. All exact.
template <typename T, int BITS>
__device__ __forceinline__ uint32_t zero_const(int z) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half h = __float2half_rn(1024.f + static_cast<float>(z));
    const __half2 h2 = __halves2half2(h, h);
    return *reinterpret_cast<const uint32_t*>(&h2);
  } else if constexpr (BITS == 4) {
    const __nv_bfloat16 h = __float2bfloat16_rn(128.f + static_cast<float>(z));
    const __nv_bfloat162 h2 = __halves2bfloat162(h, h);
    return *reinterpret_cast<const uint32_t*>(&h2);
  } else {
    return __float_as_uint(8388608.f + static_cast<float>(z));
  }
}

// The codes at bits [shift, shift+BITS) and [shift+16, shift+16+BITS) of `word`, minus the zero, as an exact
// 16-bit pair (low half = the first).
template <typename T, int BITS>
__device__ __forceinline__ uint32_t code_pair(uint32_t word, int shift, uint32_t zc) {
  constexpr uint32_t kMask = BITS == 4 ? 0x000F000Fu : 0x00FF00FFu;
  if constexpr (std::is_same<T, __half>::value) {
    const uint32_t h = ((word >> shift) & kMask) | 0x64006400u;  // (1024 + n_a, 1024 + n_b), exact
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&h), *reinterpret_cast<const __half2*>(&zc));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else if constexpr (BITS == 4) {
    const uint32_t h = ((word >> shift) & kMask) | 0x43004300u;  // bf16 (128 + n_a, 128 + n_b), exact
    const __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&h), *reinterpret_cast<const __nv_bfloat162*>(&zc));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const uint32_t v = (word >> shift) & kMask;
    const float a = __uint_as_float(0x4B000000u | (v & 0xFFu)) - __uint_as_float(zc);  // n_a - z, exact
    const float b = __uint_as_float(0x4B000000u | (v >> 16)) - __uint_as_float(zc);
    return pack2<T>(a, b);  // |n - z| <= 256: exact in bf16
  }
}

template <typename T, typename S, int BITS>
__device__ __forceinline__ void compute_chunk_int(const Raw<BITS>& raw, const QuantMatmulArgs& p, int64_t kchunk,
                                                  int n0, int g, int t, float (&acc)[4][4]) {
  // group_size % 64 == 0: the whole chunk (uniform over the warp) lies in one group. Lanes past K (K % 64 != 0)
  // have zero x and codes; their B = -z is finite and meets A = 0.
  const int64_t grp = kchunk / p.group_size;
  const int col0 = n0 + load_col(g, 0);
  const uint32_t zw = static_cast<uint32_t>(p.qzeros[grp * (p.N * BITS / 32) + zero_word(col0, BITS)]);
  uint32_t zc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    zc[j] = zero_const<T, BITS>(static_cast<int>((zw >> zero_shift(col0 + j, BITS)) & ((1u << BITS) - 1u)) +
                                p.zero_offset);
  float so[2][4];  // scales of the output columns 8t + 4h + j
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const Vec<S, 4> v = load_vec<S, 4>(static_cast<const S*>(p.scales) + grp * p.N + n0 + out_col(t, h, 0));
#pragma unroll
    for (int j = 0; j < 4; ++j) so[h][j] = to_f<S>(v.v[j]);
  }
  float d[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int e00 = local_k_int(BITS, 0, kk, 0, 0), e01 = local_k_int(BITS, 0, kk, 0, 1);
    const int e10 = local_k_int(BITS, 0, kk, 1, 0), e11 = local_k_int(BITS, 0, kk, 1, 1);
    const uint32_t a[4] = {x_pair(raw.xa, e00, e01), x_pair(raw.xb, e00, e01), x_pair(raw.xa, e10, e11),
                           x_pair(raw.xb, e10, e11)};
    const int w0 = int_word(BITS, kk, 0), w1 = int_word(BITS, kk, 1), sh = int_shift(BITS, kk);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      mma16816<T>(d[j], a, code_pair<T, BITS>(raw.q[w0][j], sh, zc[j]), code_pair<T, BITS>(raw.q[w1][j], sh, zc[j]));
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = fmaf(d[j][c], so[c & 1][j], acc[j][c]);
}

// INT: exact-integer path (g_idx == null, group_size % 64 == 0); else the general path (g_idx required).
template <typename T, typename S, int BITS, bool INT>
__global__ void __launch_bounds__(kThreads, 2) quant_matmul_kernel(const QuantMatmulArgs p) {
#if IK_HAS_SM80
  __shared__ float red[kWarps][kBM][kBN + 1];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * kBN;
  const int m0 = blockIdx.z * kBM;
  const int64_t nchunks = (p.K + kChunk - 1) / kChunk;
  const int64_t per_split = (nchunks + p.split_k - 1) / p.split_k;
  const int64_t c_begin = blockIdx.y * per_split;
  const int64_t c_end = c_begin + per_split < nchunks ? c_begin + per_split : nchunks;

  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  int64_t c = c_begin + warp;
  if (c < c_end) {
    Raw<BITS> cur;
    load_raw<T, BITS>(cur, p, c * kChunk + local_k(t, 0, 0, 0), m0, n0, g);
    for (; c < c_end; c += kWarps) {
      Raw<BITS> nxt;
      const int64_t cn = c + kWarps;
      if (cn < c_end) load_raw<T, BITS>(nxt, p, cn * kChunk + local_k(t, 0, 0, 0), m0, n0, g);  // prefetch
      if constexpr (INT)
        compute_chunk_int<T, S, BITS>(cur, p, c * kChunk, n0, g, t, acc);
      else
        compute_chunk<T, S, BITS>(cur, p, c * kChunk + local_k(t, 0, 0, 0), n0, g, acc);
      cur = nxt;
    }
  }

#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][out_row(g, e)][out_col(t, e, j)] = acc[j][e];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN;
    const int col = idx % kBN;
    const int64_t m = m0 + r;
    if (m >= p.M) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w][r][col];
    if (p.split_k == 1)
      static_cast<T*>(p.out)[m * p.out_stride + n0 + col] =
          from_f<T>(p.bias != nullptr ? sum + p.bias[n0 + col] : sum);
    else
      p.workspace[(static_cast<int64_t>(blockIdx.y) * p.M + m) * p.N + n0 + col] = sum;
  }
#else
  __trap();
#endif
}

template <typename T>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const float* __restrict__ ws, int split, int64_t M,
                                                            int64_t N, const float* __restrict__ bias,
                                                            T* __restrict__ out, int64_t out_stride) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < split; ++k) s += ws[k * total + i];  // fixed order: deterministic
    const int64_t m = i / N;
    const int64_t n = i - m * N;
    if (bias != nullptr) s += bias[n];
    out[m * out_stride + n] = from_f<T>(s);
  }
}

template <typename T, typename S, int BITS>
cudaError_t launch_bits(const QuantMatmulArgs& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.N / kBN), static_cast<unsigned>(p.split_k),
                  static_cast<unsigned>(ceil_div(p.M, kBM)));
  const cudaError_t err = p.g_idx == nullptr  // launcher checked group_size % 64 == 0
                              ? launch(quant_matmul_kernel<T, S, BITS, true>, grid, kThreads, 0, stream, p)
                              : launch(quant_matmul_kernel<T, S, BITS, false>, grid, kThreads, 0, stream, p);
  if (err != cudaSuccess || p.split_k == 1) return err;
  const int64_t total = p.M * p.N;
  const int64_t blocks = ceil_div(total, 256) < 4096 ? ceil_div(total, 256) : 4096;
  return launch(splitk_reduce_kernel<T>, static_cast<unsigned>(blocks), 256, 0, stream,
                static_cast<const float*>(p.workspace), p.split_k, p.M, p.N, p.bias, static_cast<T*>(p.out),
                p.out_stride);
}

template <typename T, typename S>
cudaError_t launch_scales(const QuantMatmulArgs& p, cudaStream_t stream) {
  if (p.bits == 4) return launch_bits<T, S, 4>(p, stream);
  if (p.bits == 8) return launch_bits<T, S, 8>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_typed(const QuantMatmulArgs& p, cudaStream_t stream) {
  // fp16 (the checkpoint format) or fp32; the binding converts other scale dtypes to fp32 (fewer instantiations).
  switch (p.scale_dtype) {
    case DType::kFloat16:
      return launch_scales<T, __half>(p, stream);
    case DType::kFloat32:
      return launch_scales<T, float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace qmm

int quant_matmul_split_k(int64_t M, int64_t K, int64_t N, int device) {
  int sms = 132;
  if (device >= 0) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (sms <= 0) sms = 132;
  const int64_t tiles = (N / qmm::kBN) * ceil_div(M, qmm::kBM);
  const int64_t nchunks = ceil_div(K, qmm::kChunk);
  // ~4 CTAs (32 warps) per SM to hide the load latency; every warp of a slice should still get a chunk.
  const int64_t target = 4 * static_cast<int64_t>(sms);
  int64_t split = tiles > 0 ? ceil_div(target, tiles) : 1;
  int64_t max_split = nchunks / qmm::kWarps;
  if (max_split < 1) max_split = 1;
  if (split > max_split) split = max_split;
  if (split > 64) split = 64;
  if (split < 1) split = 1;
  return static_cast<int>(split);
}

cudaError_t quant_matmul_launch(const QuantMatmulArgs& p, cudaStream_t stream) {
  if (p.M < 0 || p.K <= 0 || p.N <= 0 || p.K % 16 != 0 || p.N % qmm::kBN != 0) return cudaErrorInvalidValue;
  if (p.bits != 4 && p.bits != 8) return cudaErrorInvalidValue;
  if (p.split_k < 1 || p.split_k > 65535 || (p.split_k > 1 && p.workspace == nullptr)) return cudaErrorInvalidValue;
  // without g_idx the exact-integer path needs every 64-k chunk inside one group
  if (p.g_idx == nullptr && (p.group_size <= 0 || p.group_size % kQmmIntGroupMultiple != 0))
    return cudaErrorInvalidValue;
  if (ceil_div(p.M, qmm::kBM) > 65535) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  if (p.x_stride % 8 != 0 || !aligned_to(p.x, 16) || !aligned_to(p.qweight, 16)) return cudaErrorMisalignedAddress;
  const int64_t sbytes = p.scale_dtype == DType::kFloat32 ? 16 : 8;
  if (!aligned_to(p.scales, sbytes)) return cudaErrorMisalignedAddress;
  if (current_device_sm() < 80) return cudaErrorNotSupported;
  IK_DISPATCH_HALF(p.dtype, T, return qmm::launch_typed<T>(p, stream));
  return cudaErrorInvalidValue;
}

}  // namespace ik
