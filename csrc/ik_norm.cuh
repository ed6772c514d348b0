// Row normalization core shared by rms_norm.cu, layer_norm.cu and pixel_shuffle.cu.
//
// One thread block normalizes one row. The row is read as vectors of VEC elements (16 bytes when the launcher
// could prove alignment, else 2 elements or 1: odd hidden sizes take the scalar path). With VPT > 0 each thread
// keeps its at most VPT vectors in registers between the statistics and the output pass (one read of the row);
// VPT == 0 is the fallback for rows longer than VPT * blockDim vectors: it re-reads the row (L1/L2 hits).
#pragma once

#include "ik_common.cuh"

namespace ik {

constexpr int kNormVPT = 4;  // vectors per thread of the register-cached path
constexpr int kNormUncachedThreads = 512;  // block of the re-reading path (rows > 4096 vectors)

// Block size for a row of `nvec` vectors on the cached path: at most kNormVPT vectors per thread, and at least
// min(nvec, 128) threads so short rows still spread over several warps. Always a multiple of 32, <= 1024.
inline int norm_threads_cached(int64_t nvec) {
  int64_t t = round_up(ceil_div(nvec, kNormVPT), 32);
  const int64_t floor_t = round_up(nvec < 128 ? nvec : 128, 32);
  if (t < floor_t) t = floor_t;
  if (t > 1024) t = 1024;
  return static_cast<int>(t);
}

// Writes one output vector from the row statistics.
//   RMS: y = dtype(h * rstd); out = dtype(weight * y)                                  (Llama casting)
//   LN:  out = dtype((h - mean) * rstd * weight + bias)                                 (fp32 math)
template <typename T, int VEC, bool RMS>
__device__ __forceinline__ void norm_store(int v, const float (&h)[VEC], float mean, float rstd,
                                           const T* __restrict__ weight, const T* __restrict__ bias, T* out) {
  Vec<T, VEC> w, b, o;
  if (weight != nullptr) w = load_vec<T, VEC>(weight + static_cast<int64_t>(v) * VEC);
  if (bias != nullptr) b = load_vec<T, VEC>(bias + static_cast<int64_t>(v) * VEC);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float y;
    if constexpr (RMS) {
      y = round_to<T>(h[j] * rstd);
      if (weight != nullptr) y = to_f<T>(w.v[j]) * y;
    } else {
      y = (h[j] - mean) * rstd;
      if (weight != nullptr) y = y * to_f<T>(w.v[j]);
      if (bias != nullptr) y = y + to_f<T>(b.v[j]);
    }
    o.v[j] = from_f<T>(y);
  }
  store_vec<T, VEC>(out + static_cast<int64_t>(v) * VEC, o);
}

// Normalizes one row. `src(v, h)` fills h[0..VEC) with the float values of vector v (0 <= v < nvec) -- the
// values the statistics are taken of, already rounded to T where the reference rounds them; it may have side
// effects (add_*_norm writes the new residual there) and is called exactly once per vector. `resrc(v, h)`
// returns the same values again without side effects (used only by the VPT == 0 path).
// Statistics: RMS mean(h^2); LN two-pass mean then mean((h - mean)^2) -- exact two-pass, not Welford.
template <typename T, int VEC, int VPT, bool RMS, class Src, class Resrc>
__device__ __forceinline__ void norm_row(const Src& src, const Resrc& resrc, int nvec, int64_t cols,
                                         const T* __restrict__ weight, const T* __restrict__ bias, T* out, float eps,
                                         float* red) {
  // PyTorch's mean multiplies the sum by 1/n (MeanOps factor); do the same.
  const float inv_cols = 1.f / static_cast<float>(cols);
  if constexpr (VPT > 0) {
    float h[VPT][VEC];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[i][j] = 0.f;
      if (v < nvec) {
        src(v, h[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += RMS ? h[i][j] * h[i][j] : h[i][j];
      }
    }
    s = block_sum(s, red);
    float mean = 0.f;
    float rstd;
    if constexpr (RMS) {
      rstd = rsqrtf(s * inv_cols + eps);
    } else {
      mean = s * inv_cols;
      float s2 = 0.f;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float d = h[i][j] - mean;
            s2 += d * d;
          }
        }
      }
      s2 = block_sum(s2, red);
      rstd = rsqrtf(s2 * inv_cols + eps);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < nvec) norm_store<T, VEC, RMS>(v, h[i], mean, rstd, weight, bias, out);
    }
  } else {
    float s = 0.f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float h[VEC];
      src(v, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += RMS ? h[j] * h[j] : h[j];
    }
    s = block_sum(s, red);
    float mean = 0.f;
    float rstd;
    if constexpr (RMS) {
      rstd = rsqrtf(s * inv_cols + eps);
    } else {
      mean = s * inv_cols;
      float s2 = 0.f;
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        float h[VEC];
        resrc(v, h);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = h[j] - mean;
          s2 += d * d;
        }
      }
      s2 = block_sum(s2, red);
      rstd = rsqrtf(s2 * inv_cols + eps);
    }
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float h[VEC];
      resrc(v, h);
      norm_store<T, VEC, RMS>(v, h, mean, rstd, weight, bias, out);
    }
  }
}

// x / residual / residual_out / out rows, optional scale / weight / bias vectors.
template <typename T, int VEC, int VPT, bool RMS, bool ADD>
__global__ void __launch_bounds__(VPT > 0 ? 1024 : kNormUncachedThreads) norm_kernel(const NormArgs p) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int nvec = static_cast<int>(p.cols / VEC);
  const T* __restrict__ x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  if constexpr (ADD) {
    const T* __restrict__ res = static_cast<const T*>(p.residual) + row * p.residual_stride;
    const T* __restrict__ scale = static_cast<const T*>(p.scale);
    T* ro = static_cast<T*>(p.residual_out) + row * p.residual_out_stride;
    // new_residual = residual + (x * scale): the product rounds to T first, then the sum (eager's rounding).
    // __fmul_rn / __fadd_rn are never contracted into an FMA, so fp32 matches eager's two roundings bit for bit.
    auto src = [&](int v, float(&h)[VEC]) {
      const int64_t off = static_cast<int64_t>(v) * VEC;
      const Vec<T, VEC> xv = load_vec<T, VEC>(x + off);
      const Vec<T, VEC> rv = load_vec<T, VEC>(res + off);
      Vec<T, VEC> o;
      if (scale != nullptr) {
        const Vec<T, VEC> sv = load_vec<T, VEC>(scale + off);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          o.v[j] = from_f<T>(
              __fadd_rn(to_f<T>(rv.v[j]), round_to<T>(__fmul_rn(to_f<T>(xv.v[j]), to_f<T>(sv.v[j])))));
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = from_f<T>(__fadd_rn(to_f<T>(rv.v[j]), to_f<T>(xv.v[j])));
      }
      store_vec<T, VEC>(ro + off, o);
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[j] = to_f<T>(o.v[j]);
    };
    // Re-read what this same thread stored above (same mapping v -> thread): no barrier needed.
    auto resrc = [&](int v, float(&h)[VEC]) {
      const Vec<T, VEC> o = load_vec<T, VEC>(ro + static_cast<int64_t>(v) * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[j] = to_f<T>(o.v[j]);
    };
    norm_row<T, VEC, VPT, RMS>(src, resrc, nvec, p.cols, weight, bias, out, p.eps, red);
  } else {
    auto src = [&](int v, float(&h)[VEC]) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(x + static_cast<int64_t>(v) * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[j] = to_f<T>(xv.v[j]);
    };
    norm_row<T, VEC, VPT, RMS>(src, src, nvec, p.cols, weight, bias, out, p.eps, red);
  }
}

// Widest vector (elements) that every row start and every [cols] vector of `p` allows: 16 bytes, else 2, else 1.
template <typename T>
int norm_pick_vec(const NormArgs& p) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  const int cands[3] = {kMax, 2, 1};
  for (int vec : cands) {
    const int64_t bytes = vec * static_cast<int64_t>(sizeof(T));
    bool ok = p.cols % vec == 0 && p.x_stride % vec == 0 && p.out_stride % vec == 0 && aligned_to(p.x, bytes) &&
              aligned_to(p.out, bytes);
    if (p.weight != nullptr) ok = ok && aligned_to(p.weight, bytes);
    if (p.bias != nullptr) ok = ok && aligned_to(p.bias, bytes);
    if (p.residual != nullptr) {
      ok = ok && p.residual_stride % vec == 0 && p.residual_out_stride % vec == 0 && aligned_to(p.residual, bytes) &&
           aligned_to(p.residual_out, bytes);
      if (p.scale != nullptr) ok = ok && aligned_to(p.scale, bytes);
    }
    if (ok) return vec;
  }
  return 1;
}

template <typename T, int VEC, bool RMS>
cudaError_t norm_launch_vec(const NormArgs& p, cudaStream_t stream) {
  const int64_t nvec = p.cols / VEC;
  const bool add = p.residual != nullptr;
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (nvec <= static_cast<int64_t>(kNormVPT) * 1024) {
    const int threads = norm_threads_cached(nvec);
    if (add) return launch(norm_kernel<T, VEC, kNormVPT, RMS, true>, grid, threads, 0, stream, p);
    return launch(norm_kernel<T, VEC, kNormVPT, RMS, false>, grid, threads, 0, stream, p);
  }
  if (add) return launch(norm_kernel<T, VEC, 0, RMS, true>, grid, kNormUncachedThreads, 0, stream, p);
  return launch(norm_kernel<T, VEC, 0, RMS, false>, grid, kNormUncachedThreads, 0, stream, p);
}

template <typename T, bool RMS>
cudaError_t norm_launch_typed(const NormArgs& p, cudaStream_t stream) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  const int vec = norm_pick_vec<T>(p);
  if (vec == kMax) return norm_launch_vec<T, kMax, RMS>(p, stream);
  if (vec == 2) return norm_launch_vec<T, 2, RMS>(p, stream);
  return norm_launch_vec<T, 1, RMS>(p, stream);
}

template <bool RMS>
cudaError_t norm_launch(const NormArgs& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols <= 0 || p.cols > (int64_t{1} << 30) || p.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (p.x == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (RMS && p.weight == nullptr) return cudaErrorInvalidValue;
  if (p.residual != nullptr && p.residual_out == nullptr) return cudaErrorInvalidValue;
  IK_DISPATCH_FLOATING(p.dtype, T, return norm_launch_typed<T, RMS>(p, stream));
  return cudaErrorInvalidValue;
}

}  // namespace ik
