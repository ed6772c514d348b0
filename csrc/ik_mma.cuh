// Tensor-core helpers (sm_80+): mma.sync m16n8k16, ldmatrix, cp.async, and the shared-memory swizzle.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4*g + t:
//   A (16x16, row-major)  a0:(g, 2t..2t+1)  a1:(g+8, 2t..)  a2:(g, 2t+8..)  a3:(g+8, 2t+8..)
//   B (16x8,  "col")      b0:(k=2t..2t+1, n=g)  b1:(k=2t+8..2t+9, n=g)
//   C (16x8,  fp32)       c0,c1:(g, 2t..2t+1)  c2,c3:(g+8, 2t..2t+1)
// Each 32-bit register holds two 16-bit values, the lower column (or k) in the low half.
// The lane -> address maps live in ik_layout.h so tests/test_csrc_compile.py can check them on the CPU against an
// emulation of ldmatrix / mma (csrc/test/host_layout_test.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "ik_common.cuh"
#include "ik_layout.h"  // swz, ldsm_* lane maps

namespace ik {

// Shared-memory address operand of ldmatrix / cp.async (the emulator uses the plain pointer).
#if defined(IK_EMULATION)
using saddr_t = uintptr_t;
__device__ __forceinline__ saddr_t smem_u32(const void* p) { return reinterpret_cast<uintptr_t>(p); }
#else
using saddr_t = uint32_t;
__device__ __forceinline__ saddr_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "16-bit types only");
  if constexpr (std::is_same<T, __half>::value) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define IK_HAS_SM80 1
#else
#define IK_HAS_SM80 0
#endif

// d += a * b (fp32 accumulate).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(IK_EMULATION)
  emu::mma(d, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
#elif IK_HAS_SM80
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], saddr_t addr) {
#if defined(IK_EMULATION)
  emu::ldsm(r, addr, false);
#elif IK_HAS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], saddr_t addr) {
#if defined(IK_EMULATION)
  emu::ldsm(r, addr, true);
#elif IK_HAS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// 16-byte global -> shared copy; when !pred nothing is read and the 16 bytes are zero-filled (src-size 0).
__device__ __forceinline__ void cp_async16(saddr_t smem, const void* gmem, bool pred) {
#if defined(IK_EMULATION)
  emu::cp_async16(smem, gmem, pred);
#elif IK_HAS_SM80
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_size));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if IK_HAS_SM80 && !defined(IK_EMULATION)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if IK_HAS_SM80 && !defined(IK_EMULATION)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace ik
