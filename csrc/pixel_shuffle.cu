// pixel_shuffle and pixel_shuffle_layer_norm on a square token grid [batch, side*side, C].
//
// InternVL's pixel_shuffle (scale 1/r) turns the side x side x C grid into (side/r) x (side/r) x (r*r*C): output
// token (i2, j2) concatenates, for ir, jr in [0, r), the C channels of input token (i2*r + ir, j2*r + jr), in the
// order (ir, jr, c). v1 (V1.1/V1.2) emits the merged tokens column-major (t = j2*(side/r) + i2), v2 (V1.5)
// row-major (t = i2*(side/r) + j2). Index derivation from the reference (functional.pixel_shuffle_grid):
//   reshape(n, w, h/r, C*r)            [i, j2, (jr, c)]          j = j2*r + jr
//   permute(0, 2, 1, 3) -> view        [j2, i2, (ir, jr, c)]     i = i2*r + ir     (this is v1)
//   v2: permute(0, 2, 1, 3)            [i2, j2, (ir, jr, c)]
// One block per output token; each thread moves 16-byte vectors (C % VEC == 0 so a vector never straddles two
// source tokens). x is addressed through its token / batch strides (the cls-stripped view vit_embeds[:, 1:, :] is
// read in place, no contiguous copy); both strides must be multiples of VEC for the vector width to be used. The layer-norm variant gathers the same way straight into the LayerNorm (no shuffled copy).
#include "ik_layout.h"  // ShuffleMap
#include "ik_norm.cuh"

namespace ik {
namespace {

__host__ __device__ inline int64_t token_stride(const PixelShuffleArgs& p) {
  return p.token_stride ? p.token_stride : static_cast<int64_t>(p.channels);
}

__host__ __device__ inline int64_t batch_stride(const PixelShuffleArgs& p) {
  return p.batch_stride ? p.batch_stride : static_cast<int64_t>(p.side) * p.side * token_stride(p);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) pixel_shuffle_kernel(const PixelShuffleArgs p) {
  const ShuffleMap map{p.side, p.r, p.side / p.r, p.v2};
  const int64_t tokens_out = static_cast<int64_t>(map.so) * map.so;
  const int64_t orow = blockIdx.x;
  const int64_t b = orow / tokens_out;
  const int t = static_cast<int>(orow - b * tokens_out);
  const int C = p.channels;
  const int64_t cout = static_cast<int64_t>(C) * p.r * p.r;
  const int nvec = static_cast<int>(cout / VEC);
  const int64_t ts = token_stride(p);
  const T* __restrict__ xb = static_cast<const T*>(p.x) + b * batch_stride(p);
  T* __restrict__ o = static_cast<T*>(p.out) + orow * cout;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int col = v * VEC;
    const int chunk = col / C;
    const int cc = col - chunk * C;
    store_vec<T, VEC>(o + col, load_vec<T, VEC>(xb + map.src_token(t, chunk) * ts + cc));
  }
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(VPT > 0 ? 1024 : kNormUncachedThreads) pixel_shuffle_layer_norm_kernel(const PixelShuffleArgs p) {
  __shared__ float red[32];
  const ShuffleMap map{p.side, p.r, p.side / p.r, p.v2};
  const int64_t tokens_out = static_cast<int64_t>(map.so) * map.so;
  const int64_t orow = blockIdx.x;
  const int64_t b = orow / tokens_out;
  const int t = static_cast<int>(orow - b * tokens_out);
  const int C = p.channels;
  const int64_t cout = static_cast<int64_t>(C) * p.r * p.r;
  const int nvec = static_cast<int>(cout / VEC);
  const int64_t ts = token_stride(p);
  const T* __restrict__ xb = static_cast<const T*>(p.x) + b * batch_stride(p);
  T* out = static_cast<T*>(p.out) + orow * cout;
  auto src = [&](int v, float(&h)[VEC]) {
    const int col = v * VEC;
    const int chunk = col / C;
    const int cc = col - chunk * C;
    const Vec<T, VEC> xv = load_vec<T, VEC>(xb + map.src_token(t, chunk) * ts + cc);
#pragma unroll
    for (int j = 0; j < VEC; ++j) h[j] = to_f<T>(xv.v[j]);
  };
  norm_row<T, VEC, VPT, false>(src, src, nvec, cout, static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
                               out, p.eps, red);
}

template <typename T>
int shuffle_pick_vec(const PixelShuffleArgs& p) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  const int cands[3] = {kMax, 2, 1};
  for (int vec : cands) {
    const int64_t bytes = vec * static_cast<int64_t>(sizeof(T));
    bool ok = p.channels % vec == 0 && token_stride(p) % vec == 0 && batch_stride(p) % vec == 0 &&
              aligned_to(p.x, bytes) && aligned_to(p.out, bytes);
    if (p.weight != nullptr) ok = ok && aligned_to(p.weight, bytes);
    if (p.bias != nullptr) ok = ok && aligned_to(p.bias, bytes);
    if (ok) return vec;
  }
  return 1;
}

cudaError_t check_args(const PixelShuffleArgs& p) {
  if (p.batch < 0 || p.side <= 0 || p.r <= 0 || p.channels <= 0 || p.side % p.r != 0) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.channels) * p.r * p.r > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if (p.batch * (p.side / p.r) * static_cast<int64_t>(p.side / p.r) > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.x == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (p.token_stride < 0 || p.batch_stride < 0) return cudaErrorInvalidValue;
  if (p.token_stride != 0 && p.token_stride < p.channels) return cudaErrorInvalidValue;  // tokens would overlap
  return cudaSuccess;
}

template <typename T, int VEC>
cudaError_t shuffle_vec(const PixelShuffleArgs& p, cudaStream_t stream, bool ln) {
  const int64_t so = p.side / p.r;
  const dim3 grid(static_cast<unsigned>(p.batch * so * so));
  const int64_t nvec = static_cast<int64_t>(p.channels) * p.r * p.r / VEC;
  if (!ln) return launch(pixel_shuffle_kernel<T, VEC>, grid, nvec >= 256 ? 256 : round_up(nvec, 32), 0, stream, p);
  if (nvec <= static_cast<int64_t>(kNormVPT) * 1024)
    return launch(pixel_shuffle_layer_norm_kernel<T, VEC, kNormVPT>, grid, norm_threads_cached(nvec), 0, stream, p);
  return launch(pixel_shuffle_layer_norm_kernel<T, VEC, 0>, grid, kNormUncachedThreads, 0, stream, p);
}

template <typename T>
cudaError_t shuffle_typed(const PixelShuffleArgs& p, cudaStream_t stream, bool ln) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  const int vec = shuffle_pick_vec<T>(p);
  if (vec == kMax) return shuffle_vec<T, kMax>(p, stream, ln);
  if (vec == 2) return shuffle_vec<T, 2>(p, stream, ln);
  return shuffle_vec<T, 1>(p, stream, ln);
}

cudaError_t shuffle_launch(const PixelShuffleArgs& p, cudaStream_t stream, bool ln) {
  const cudaError_t err = check_args(p);
  if (err != cudaSuccess) return err;
  if (p.batch == 0) return cudaSuccess;
  IK_DISPATCH_FLOATING(p.dtype, T, return shuffle_typed<T>(p, stream, ln));
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t pixel_shuffle_launch(const PixelShuffleArgs& args, cudaStream_t stream) {
  return shuffle_launch(args, stream, false);
}

cudaError_t pixel_shuffle_layer_norm_launch(const PixelShuffleArgs& args, cudaStream_t stream) {
  return shuffle_launch(args, stream, true);
}

}  // namespace ik
