// Device helpers shared by the internvl-kernels CUDA translation units (plain CUDA, no ATen).
#pragma once

#include <cstdint>
#include <utility>

#if defined(IK_EMULATION)
#include "test/ik_emu.h"  // CPU SIMT emulator: tests/test_csrc_emulation.py only
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "ik_launchers.h"

// Alignment assertion of vector accesses: free on the GPU (a misaligned access faults there), checked by the
// CPU emulator (where x86 would silently accept it).
#if defined(IK_EMULATION)
#define IK_CHECK_ALIGNED(p, n) ::ik::emu::check_aligned((p), (n), "vector access")
#else
#define IK_CHECK_ALIGNED(p, n) ((void)0)
#endif

namespace ik {

// ----------------------------------------------------------------------------------------------- scalar types
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// float -> T -> float: the rounding eager PyTorch applies when an fp32 intermediate is stored in dtype T.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f<T>(from_f<T>(v));
}

// --------------------------------------------------------------------------------------------- vector access
// N elements of T moved as one access of N*sizeof(T) bytes (16 bytes at most). Caller guarantees alignment.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  IK_CHECK_ALIGNED(p, sizeof(Vec<T, N>));
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  IK_CHECK_ALIGNED(p, sizeof(Vec<T, N>));
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__host__ __device__ __forceinline__ bool aligned_to(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// ------------------------------------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32 (<= 1024).
// `red` is 32 floats of shared memory; the trailing barrier makes it reusable immediately.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  if (lane == 0) red[wid] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// ------------------------------------------------------------------------------------------------ host utils
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kFloat32;
};
template <>
struct DTypeOf<__half> {
  static constexpr DType value = DType::kFloat16;
};
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr DType value = DType::kBFloat16;
};

// Every launch goes through here: `kernel<<<grid, block, smem, stream>>>(args...)` then cudaGetLastError() (the CPU
// emulator runs the same kernel on fibers instead).
template <typename... KArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
#if defined(IK_EMULATION)
  (void)smem;
  (void)stream;
  return emu::launch(kernel, grid, block, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

inline int round_up(int64_t v, int64_t m) { return static_cast<int>((v + m - 1) / m * m); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ik

// Calls `BODY` with `T` bound to the element type of `dt`; unknown dtypes return cudaErrorInvalidValue.
#define IK_DISPATCH_FLOATING(dt, T, ...)                    \
  switch (dt) {                                             \
    case ::ik::DType::kFloat32: {                           \
      using T = float;                                      \
      __VA_ARGS__;                                          \
    } break;                                                \
    case ::ik::DType::kFloat16: {                           \
      using T = __half;                                     \
      __VA_ARGS__;                                          \
    } break;                                                \
    case ::ik::DType::kBFloat16: {                          \
      using T = __nv_bfloat16;                              \
      __VA_ARGS__;                                          \
    } break;                                                \
    default:                                                \
      return cudaErrorInvalidValue;                         \
  }

#define IK_DISPATCH_HALF(dt, T, ...)                        \
  switch (dt) {                                             \
    case ::ik::DType::kFloat16: {                           \
      using T = __half;                                     \
      __VA_ARGS__;                                          \
    } break;                                                \
    case ::ik::DType::kBFloat16: {                          \
      using T = __nv_bfloat16;                              \
      __VA_ARGS__;                                          \
    } break;                                                \
    default:                                                \
      return cudaErrorInvalidValue;                         \
  }
