// attention and qk_norm_attention: non-causal flash attention (online softmax) on tensor cores.
//
// One CTA = 4 warps = 64 query rows (16 per warp) of one (batch, head); it streams 64-key tiles of K and V
// through shared memory. S = Q K^T and O += P V run on mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate); P is
// reused from the S accumulators as the A operand (the C layout of two n-tiles is the A layout of one k-step),
// rounded to the input dtype like FlashAttention-2. Softmax runs in the log2 domain (exp2f) with the scale
// folded in. Keys >= seqlen are masked to -inf in the last tile; rows/keys beyond seqlen are zero-filled by
// cp.async (src-size 0) so no garbage (possibly NaN) ever reaches an mma; output rows >= seqlen are not stored.
// Shared memory: Q, K, V tiles of 64 x D 16-bit values, 16-byte chunks XOR-swizzled by row (ik_mma.cuh):
// 24 KB (D=64) / 48 KB (D=128), static. Pipeline (FlashAttention-2 style, one buffer each): V_j loads while
// S_j = Q K_j^T and the softmax run; K_{j+1} loads while O += P_j V_j runs.
//
// qk_norm_attention: q/k arrive un-normalized inside the packed qkv tensor (strided views, no copies). A
// pre-pass (qk_rstd_kernel) computes each token's rstd over all C channels of q and of k; the attention kernel
// applies dtype(dtype(x * rstd) * w) -- exactly the Llama-cast RMSNorm of the reference -- to each Q / K tile in
// shared memory right after it lands (each thread transforms the 16-byte chunks it copied itself, so only the
// usual barrier is needed). Normalized q/k are never written to global memory.
//
// Not done (honest list): no sm_90a (wgmma / TMA) path -- mma.sync runs on Hopper at well below its wgmma peak;
// attention is ~5% of InternViT's FLOPs. No split-KV. fp32 inputs are routed to Triton by the Python wrapper.
#include "ik_mma.cuh"

namespace ik {
namespace {

constexpr int kBM = 64;  // query rows per CTA
constexpr int kBN = 64;  // keys per tile
constexpr int kThreads = 128;
static_assert(kBN == kBM, "one smem tile shape for Q, K and V");

// Issues cp.async for a [64][D] tile: rows row0.. of a strided [seq][D] matrix, rows >= rows_valid zero-filled.
// Thread `tid` copies chunks idx = tid + i*128 -> (row idx / (D/8), chunk idx % (D/8)); since 128 % (D/8) == 0 the
// chunk column of a thread is always tid % (D/8).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int row0, int rows_valid, int tid) {
  constexpr int kCPR = D / 8;
  static_assert(kThreads % kCPR == 0, "chunk column of a thread must be fixed");
#pragma unroll
  for (int i = 0; i < kBM * kCPR / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / kCPR;
    const int c = idx % kCPR;
    const bool ok = r < rows_valid;
    const T* src = ok ? g + static_cast<int64_t>(row0 + r) * row_stride + c * 8 : g;
    cp_async16(smem_u32(s + swz<D>(r, c)), src, ok);
  }
}

// Llama-cast RMSNorm of the chunks this thread copied with load_tile (call after cp_async_wait, before the
// barrier): x <- dtype(w * dtype(x * rstd[row0 + r])).
template <typename T, int D>
__device__ __forceinline__ void norm_tile(T* s, const float* __restrict__ rstd, int row0, int rows_valid,
                                          const float (&w)[8], int tid) {
  constexpr int kCPR = D / 8;
#pragma unroll
  for (int i = 0; i < kBM * kCPR / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / kCPR;
    const int c = idx % kCPR;
    if (r < rows_valid) {
      const float rs = rstd[row0 + r];
      T* p = s + swz<D>(r, c);
      Vec<T, 8> val = load_vec<T, 8>(p);
#pragma unroll
      for (int j = 0; j < 8; ++j) val.v[j] = from_f<T>(w[j] * round_to<T>(to_f<T>(val.v[j]) * rs));
      store_vec<T, 8>(p, val);
    }
  }
}

template <typename T, int D, bool QKNORM>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionArgs p) {
#if IK_HAS_SM80
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  constexpr int kCPR = D / 8;
  __shared__ __align__(128) uint16_t smem_raw[3 * kBM * D];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * D;
  T* sV = sK + kBN * D;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int m0 = blockIdx.x * kBM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int S = p.seqlen;     // query rows
  const int SK = p.seqlen_k;  // keys

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];

  float wq[8], wk[8];
  const float* rq = nullptr;
  const float* rk = nullptr;
  if constexpr (QKNORM) {
    const int c = tid % kCPR;
    const T* qw = static_cast<const T*>(p.q_norm_weight) + h * D + c * 8;
    const T* kw = static_cast<const T*>(p.k_norm_weight) + h * D + c * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      wq[j] = to_f<T>(qw[j]);
      wk[j] = to_f<T>(kw[j]);
    }
    rq = p.q_rstd + static_cast<int64_t>(b) * S;
    rk = p.k_rstd + static_cast<int64_t>(b) * SK;
  }

  load_tile<T, D>(sQ, qg, p.q_stride[1], m0, S - m0, tid);
  load_tile<T, D>(sK, kg, p.k_stride[1], 0, SK, tid);
  cp_async_commit();
  cp_async_wait<0>();
  if constexpr (QKNORM) {
    norm_tile<T, D>(sQ, rq, m0, S - m0, wq, tid);
    norm_tile<T, D>(sK, rk, 0, SK, wk, tid);
  }
  __syncthreads();

  // This warp's 16 query rows as A fragments, one per 16-wide k-step of D.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldsm_x4(qf[kk], smem_u32(sQ + swz<D>(warp * 16 + ldsm_a_row(lane), 2 * kk + ldsm_a_chunk(lane))));

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g+8 of this warp, log2 domain
  float row_sum[2] = {0.f, 0.f};               // partial over this thread's columns
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const int t2 = 2 * (lane & 3);
  const int ntiles = (SK + kBN - 1) / kBN;

  for (int j = 0; j < ntiles; ++j) {
    const int n0 = j * kBN;
    load_tile<T, D>(sV, vg, p.v_stride[1], n0, SK - n0, tid);
    cp_async_commit();

    // S = Q K^T for 16 rows x 64 keys: 8 n-tiles of 8 keys.
    float s[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t kf[4];
        ldsm_x4(kf, smem_u32(sK + swz<D>(np * 16 + ldsm_b_row(lane), 2 * kk + ldsm_b_chunk(lane))));
        mma16816<T>(s[2 * np], qf[kk], kf[0], kf[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Scale into the log2 domain; mask keys >= SK (only the last tile can have any).
    if (n0 + kBN <= SK) {
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[i][c] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int key = n0 + i * 8 + t2 + (c & 1);
          s[i][c] = key < SK ? s[i][c] * scale_log2 : -INFINITY;
        }
    }

    // Online softmax. Every tile holds at least one valid key (n0 < SK), so the new max is finite.
    float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
      mx[0] = fmaxf(mx[0], fmaxf(s[i][0], s[i][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[i][2], s[i][3]));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    const float corr0 = exp2f(row_max[0] - mx[0]);  // exp2(-inf) = 0 on the first tile
    const float corr1 = exp2f(row_max[1] - mx[1]);
    row_max[0] = mx[0];
    row_max[1] = mx[1];
    float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
      s[i][0] = exp2f(s[i][0] - mx[0]);
      s[i][1] = exp2f(s[i][1] - mx[0]);
      s[i][2] = exp2f(s[i][2] - mx[1]);
      s[i][3] = exp2f(s[i][3] - mx[1]);
      ls0 += s[i][0] + s[i][1];
      ls1 += s[i][2] + s[i][3];
    }
    row_sum[0] = row_sum[0] * corr0 + ls0;
    row_sum[1] = row_sum[1] * corr1 + ls1;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= corr0;
      o[i][1] *= corr0;
      o[i][2] *= corr1;
      o[i][3] *= corr1;
    }

    cp_async_wait<0>();
    __syncthreads();  // V_j visible to all warps; every warp is done reading sK
    if (j + 1 < ntiles) {
      load_tile<T, D>(sK, kg, p.k_stride[1], n0 + kBN, SK - n0 - kBN, tid);
      cp_async_commit();
    }

    // O += P V_j: k-step kk covers keys 16kk..16kk+15 = n-tiles 2kk, 2kk+1 of S.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vf[4];
        ldsm_x4_trans(vf, smem_u32(sV + swz<D>(kk * 16 + ldsm_a_row(lane), 2 * dp + ldsm_a_chunk(lane))));
        mma16816<T>(o[2 * dp], pa, vf[0], vf[1]);
        mma16816<T>(o[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }

    if (j + 1 < ntiles) {
      cp_async_wait<0>();
      if constexpr (QKNORM) norm_tile<T, D>(sK, rk, n0 + kBN, SK - n0 - kBN, wk, tid);
    }
    __syncthreads();  // K_{j+1} visible; every warp is done reading sV
  }

  // Epilogue: finish the row sums across the quad, normalize, stage this warp's 16 rows in its own rows of sQ
  // (no other warp reads them after the prologue), then write 16-byte vectors.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  const float inv0 = 1.f / row_sum[0];
  const float inv1 = 1.f / row_sum[1];
  const int g = lane >> 2;
  const int r0 = warp * 16 + g;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    *reinterpret_cast<uint32_t*>(sQ + swz<D>(r0, i) + t2) = pack2<T>(o[i][0] * inv0, o[i][1] * inv0);
    *reinterpret_cast<uint32_t*>(sQ + swz<D>(r0 + 8, i) + t2) = pack2<T>(o[i][2] * inv1, o[i][3] * inv1);
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[2];
#pragma unroll
  for (int i = 0; i < 16 * kCPR / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = idx / kCPR;
    const int c = idx % kCPR;
    const int qrow = m0 + warp * 16 + r;
    if (qrow < S) {
      const T* src = sQ + swz<D>(warp * 16 + r, c);
      T* dst = og + static_cast<int64_t>(qrow) * p.o_stride[1] + c * 8;
      IK_CHECK_ALIGNED(src, 16);
      IK_CHECK_ALIGNED(dst, 16);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    }
  }
#else
  __trap();
#endif
}

// rstd over all `channels` channels of q (columns [0, C)) and of k (columns [C, 2C)) of one token.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) qk_rstd_kernel(const T* __restrict__ qkv, int64_t rows, int64_t row_stride,
                                                      int64_t channels, float eps, float* __restrict__ rstd) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* q = qkv + row * row_stride;
  const T* k = q + channels;
  const int nvec = static_cast<int>(channels / VEC);
  float sq = 0.f, sk = 0.f;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const Vec<T, VEC> qv = load_vec<T, VEC>(q + static_cast<int64_t>(v) * VEC);
    const Vec<T, VEC> kv = load_vec<T, VEC>(k + static_cast<int64_t>(v) * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = to_f<T>(qv.v[j]);
      const float c = to_f<T>(kv.v[j]);
      sq += a * a;
      sk += c * c;
    }
  }
  sq = block_sum(sq, red);
  sk = block_sum(sk, red);
  if (threadIdx.x == 0) {
    const float inv = 1.f / static_cast<float>(channels);
    rstd[row] = rsqrtf(sq * inv + eps);
    rstd[rows + row] = rsqrtf(sk * inv + eps);
  }
}

template <typename T>
cudaError_t qk_rstd_typed(const void* qkv, int64_t rows, int64_t row_stride, int64_t channels, float eps,
                          float* rstd, cudaStream_t stream) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  const int64_t nvec16 = channels / kMax;
  const bool vec_ok = channels % kMax == 0 && row_stride % kMax == 0 && aligned_to(qkv, 16);
  const int64_t nvec = vec_ok ? nvec16 : channels;
  const int threads = nvec >= 256 ? 256 : (nvec >= 128 ? 128 : round_up(nvec, 32));
  const dim3 grid(static_cast<unsigned>(rows));
  const T* x = static_cast<const T*>(qkv);
  if (vec_ok) return launch(qk_rstd_kernel<T, kMax>, grid, threads, 0, stream, x, rows, row_stride, channels, eps, rstd);
  return launch(qk_rstd_kernel<T, 1>, grid, threads, 0, stream, x, rows, row_stride, channels, eps, rstd);
}

bool stride_ok(const int64_t (&s)[3]) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

template <typename T, int D>
cudaError_t attention_typed(const AttentionArgs& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seqlen, kBM)), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  if (p.q_rstd != nullptr) return launch(attention_kernel<T, D, true>, grid, kThreads, 0, stream, p);
  return launch(attention_kernel<T, D, false>, grid, kThreads, 0, stream, p);
}

}  // namespace

int current_device_sm() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return -1;
  // cached per device (benign race: every writer stores the same value)
  static int cache[64] = {0};
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return -1;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return -1;
  if (dev >= 0 && dev < 64) cache[dev] = major * 10 + minor;
  return major * 10 + minor;
}

cudaError_t attention_launch(const AttentionArgs& p, cudaStream_t stream) {
  if (p.batch < 0 || p.seqlen < 0 || p.heads < 0 || p.batch > 65535 || p.heads > 65535) return cudaErrorInvalidValue;
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.seqlen == 0 || p.heads == 0) return cudaSuccess;
  if (p.seqlen_k <= 0) return cudaErrorInvalidValue;  // softmax over no keys
  if (!stride_ok(p.q_stride) || !stride_ok(p.k_stride) || !stride_ok(p.v_stride) || !stride_ok(p.o_stride))
    return cudaErrorMisalignedAddress;
  if (!aligned_to(p.q, 16) || !aligned_to(p.k, 16) || !aligned_to(p.v, 16) || !aligned_to(p.out, 16))
    return cudaErrorMisalignedAddress;
  if ((p.q_rstd == nullptr) != (p.k_rstd == nullptr)) return cudaErrorInvalidValue;
  if (p.q_rstd != nullptr && (p.q_norm_weight == nullptr || p.k_norm_weight == nullptr)) return cudaErrorInvalidValue;
  if (current_device_sm() < 80) return cudaErrorNotSupported;
  IK_DISPATCH_HALF(p.dtype, T, {
    if (p.head_dim == 64) return attention_typed<T, 64>(p, stream);
    return attention_typed<T, 128>(p, stream);
  });
  return cudaErrorInvalidValue;
}

cudaError_t qk_rstd_launch(DType dtype, const void* qkv, int64_t rows, int64_t row_stride, int64_t channels,
                           float eps, float* rstd, cudaStream_t stream) {
  if (rows < 0 || channels <= 0 || rows > 0x7fffffff || row_stride < 2 * channels) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (qkv == nullptr || rstd == nullptr) return cudaErrorInvalidValue;
  IK_DISPATCH_FLOATING(dtype, T, return qk_rstd_typed<T>(qkv, rows, row_stride, channels, eps, rstd, stream));
  return cudaErrorInvalidValue;
}

}  // namespace ik
