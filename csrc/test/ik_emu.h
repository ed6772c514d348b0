// CPU SIMT emulator for the csrc/ kernels -- TESTS ONLY, never part of the extension.
//
// Built when the kernel sources are compiled as plain C++ with -DIK_EMULATION (tests/test_csrc_emulation.py).
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another. Fibers switch
// only at synchronization points, which gives the CUDA semantics our kernels rely on:
//   __syncthreads()        block barrier (a barrier not reached by every thread of the block = deadlock -> abort)
//   __syncwarp(), shuffles, ldmatrix, mma.sync   warp-collective: every lane deposits its operands, barrier,
//                          every lane computes its own result from all lanes' operands, barrier
//   cp.async               a synchronous 16-byte copy (or zero fill); commit / wait are no-ops
// The instruction models follow the PTX ISA (fragment layouts of mma.m16n8k16 and ldmatrix, prmt). Shared
// memory is the kernels' own static arrays (__shared__ -> static). Misaligned vector / ldmatrix / cp.async
// addresses abort. Built with AddressSanitizer, out-of-bounds accesses to global or shared memory are reported.
// What it cannot show: timing, real memory-ordering hazards between threads (it is sequentially consistent),
// and the hardware's exact fp32 accumulation order inside mma (emulated in double, rounded once per mma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace ik {
namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "ik_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  bool waiting = false;
  uint3 tid;
};

struct WarpState {
  int arrived = 0;
  int expected = 32;
  std::vector<int> waiters;
  // deposit slots
  uint64_t u64[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  uintptr_t addr[32];
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = -1;
  int nthreads = 0;
  int block_arrived = 0;
  std::vector<int> block_waiters;
  std::vector<WarpState> warps;
  std::function<void()> body;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

inline Block*& cur_block() {
  static Block* b = nullptr;
  return b;
}

inline Fiber& me() { return cur_block()->fibers[cur_block()->current]; }

inline bool sched_skew() {
  const char* v = std::getenv("IK_EMU_SCHED");
  return v != nullptr && std::strcmp(v, "skew") == 0;
}

inline int linear_tid() {
  const Block* b = cur_block();
  const uint3 t = b->fibers[b->current].tid;
  return static_cast<int>(t.x + b->block_dim.x * (t.y + b->block_dim.y * t.z));
}

inline void yield_waiting() {
  Block* b = cur_block();
  Fiber& f = b->fibers[b->current];
  f.waiting = true;
  swapcontext(&f.ctx, &b->main);
}

inline void block_sync() {
  Block* b = cur_block();
  if (++b->block_arrived == b->nthreads) {
    b->block_arrived = 0;
    for (int w : b->block_waiters) b->fibers[w].waiting = false;
    b->block_waiters.clear();
    return;
  }
  b->block_waiters.push_back(b->current);
  yield_waiting();
}

inline WarpState& warp() { return cur_block()->warps[linear_tid() / 32]; }
inline int lane() { return linear_tid() % 32; }

inline void warp_sync() {
  Block* b = cur_block();
  WarpState& w = warp();
  if (++w.arrived == w.expected) {
    w.arrived = 0;
    for (int f : w.waiters) b->fibers[f].waiting = false;
    w.waiters.clear();
    return;
  }
  w.waiters.push_back(b->current);
  yield_waiting();
}

inline void trampoline() {
  Block* b = cur_block();
  b->body();
  b->fibers[b->current].done = true;
  // uc_link returns to the scheduler
}

// Runs `kernel(args...)` over the grid, one block at a time.
template <typename F>
inline cudaError_t run_grid(F&& body, dim3 grid, dim3 block) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  constexpr size_t kStack = 256 * 1024;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.nthreads = nthreads;
        b.block_idx = make_uint3(bx, by, bz);
        b.block_dim = block;
        b.grid_dim = grid;
        b.body = [&body]() { body(); };
        b.warps.resize((nthreads + 31) / 32);
        for (size_t w = 0; w < b.warps.size(); ++w)
          b.warps[w].expected = std::min(32, nthreads - static_cast<int>(w) * 32);
        b.fibers.resize(nthreads);
        cur_block() = &b;
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = b.fibers[i];
          f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.stack.resize(kStack);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &b.main;
          makecontext(&f.ctx, trampoline, 0);
        }
        // Scheduling: "skew" (IK_EMU_SCHED=skew) lets warp w run only every 8^(w % 4)-th pass (1, 8, 64, 512), so
        // warps drift far apart between block barriers and a missing __syncthreads shows up as a wrong result; the
        // default runs every runnable fiber once per pass.
        const bool skew = sched_skew();
        for (unsigned pass = 0;; ++pass) {
          bool all_done = true, progress = false, ran_any = false;
          for (int i = 0; i < nthreads; ++i) {
            Fiber& f = b.fibers[i];
            if (f.done) continue;
            all_done = false;
            if (f.waiting) continue;
            if (skew && pass % (1u << (3 * ((i / 32) % 4))) != 0) {
              progress = true;  // runnable, just held back this pass
              continue;
            }
            b.current = i;
            swapcontext(&b.main, &f.ctx);
            progress = ran_any = true;
          }
          if (all_done) break;
          if (!progress) fail("deadlock: a barrier was not reached by every thread of the block/warp");
          (void)ran_any;
        }
        cur_block() = nullptr;
      }
  return cudaSuccess;
}

template <typename... KArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args&&... args) {
  auto body = [&]() { kernel(args...); };
  return run_grid(body, grid, block);
}

inline void check_aligned(const void* p, size_t n, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % n != 0) {
    std::fprintf(stderr, "ik_emu: misaligned %s: %p not a multiple of %zu\n", what, p, n);
    std::abort();
  }
}

// ---------------------------------------------------------------------------------------------- warp ops
inline uint64_t exchange(uint64_t v, int src_lane) {
  WarpState& w = warp();
  w.u64[lane()] = v;
  warp_sync();
  const uint64_t r = w.u64[src_lane];
  warp_sync();
  return r;
}

inline float bf16_bits_to_f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_bits_to_f(uint16_t v) {
  __half_raw r;
  r.x = v;
  return __half2float(__half(r));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A(16x16) * B(16x8)
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  WarpState& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i], w.c[l][i] = d[i];
  w.b[l][0] = b0, w.b[l][1] = b1;
  warp_sync();
  auto val = [&](uint32_t reg, int hi) {
    const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFF);
    return bf16 ? bf16_bits_to_f(bits) : half_bits_to_f(bits);
  };
  auto A = [&](int row, int k) {  // a0:(g,2t..) a1:(g+8,2t..) a2:(g,2t+8..) a3:(g+8,2t+8..)
    const int g = row % 8, upper = row / 8, t = (k % 8) / 2, reg = upper + 2 * (k / 8);
    return val(w.a[4 * g + t][reg], k % 2);
  };
  auto B = [&](int k, int n) {  // b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g)
    const int t = (k % 8) / 2, reg = k / 8;
    return val(w.b[4 * n + t][reg], k % 2);
  };
  const int g = l / 4, t = l % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
    double s = w.c[l][e];
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A(row, k)) * B(k, col);
    out[e] = static_cast<float>(s);
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
inline void ldsm(uint32_t (&r)[4], uintptr_t addr, bool trans) {
  WarpState& w = warp();
  const int l = lane();
  check_aligned(reinterpret_cast<const void*>(addr), 16, "ldmatrix row address");
  w.addr[l] = addr;
  warp_sync();
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(w.addr[8 * i + l / 4]);
      r[i] = static_cast<uint32_t>(row[2 * (l % 4)]) | (static_cast<uint32_t>(row[2 * (l % 4) + 1]) << 16);
    } else {
      const int r0 = 2 * (l % 4);
      const uint16_t* ra = reinterpret_cast<const uint16_t*>(w.addr[8 * i + r0]);
      const uint16_t* rb = reinterpret_cast<const uint16_t*>(w.addr[8 * i + r0 + 1]);
      r[i] = static_cast<uint32_t>(ra[l / 4]) | (static_cast<uint32_t>(rb[l / 4]) << 16);
    }
  }
  warp_sync();
}

inline void cp_async16(uintptr_t smem, const void* gmem, bool pred) {
  check_aligned(reinterpret_cast<const void*>(smem), 16, "cp.async shared address");
  if (pred) {
    check_aligned(gmem, 16, "cp.async global address");
    std::memcpy(reinterpret_cast<void*>(smem), gmem, 16);
  } else {
    std::memset(reinterpret_cast<void*>(smem), 0, 16);
  }
}

}  // namespace emu
}  // namespace ik

// ----------------------------------------------------------------------------------- CUDA built-ins on the CPU
#define threadIdx (::ik::emu::me().tid)
#define blockIdx (::ik::emu::cur_block()->block_idx)
#define blockDim (::ik::emu::cur_block()->block_dim)
#define gridDim (::ik::emu::cur_block()->grid_dim)

inline void __syncthreads() { ik::emu::block_sync(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ik::emu::warp_sync(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = static_cast<uint32_t>(ik::emu::exchange(u, ik::emu::lane() ^ o));
  float f;
  std::memcpy(&f, &r, 4);
  return f;
}
[[noreturn]] inline void __trap() { ik::emu::fail("__trap()"); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline uint32_t __byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((ab >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}

// runtime API stubs (an "sm_90" device with 132 SMs)
extern "C" inline cudaError_t ik_emu_get_last_error() { return cudaSuccess; }
#define cudaGetLastError ik_emu_get_last_error
inline cudaError_t ik_emu_get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
#define cudaGetDevice ik_emu_get_device
inline cudaError_t ik_emu_device_attr(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *v = 9;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *v = 0;
      break;
    case cudaDevAttrMultiProcessorCount:
      *v = 132;
      break;
    default:
      *v = 0;
  }
  return cudaSuccess;
}
#define cudaDeviceGetAttribute ik_emu_device_attr
