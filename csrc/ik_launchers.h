// Host-side interface of the internvl-kernels CUDA kernels.
//
// Plain C++ (no ATen, no torch): every launcher takes raw pointers, sizes and strides (in elements), a
// cudaStream_t, and returns the cudaError_t of its launch(es) (cudaGetLastError() right after each launch).
// The binding (bindings.cpp) validates tensors, picks the current stream and checks the returned error.
// Strides are in elements; the innermost dimension is always contiguous (stride 1).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ik {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------------------------
// rms_norm / add_rms_norm (rms_norm.cu) and layer_norm / add_layer_norm (layer_norm.cu).
//   plain:        out = norm(x)
//   with residual: residual_out = residual + (scale ? x * scale : x)   (each op rounded to dtype, like eager)
//                  out = norm(residual_out)
// RMS (Llama casting): out = weight * dtype(x_f32 * rsqrt(mean(x_f32^2) + eps)).
// LayerNorm: out = dtype((x - mean) * rstd * weight + bias) in fp32 (weight / bias may be null).
// All tensors share `dtype`; rows are `cols` long, `*_stride` is the distance between rows.
struct NormArgs {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* residual = nullptr;  // null: plain norm
  int64_t residual_stride = 0;
  const void* scale = nullptr;  // [cols] or null
  const void* weight = nullptr;  // [cols]; required for RMS, optional for LayerNorm
  const void* bias = nullptr;  // [cols] or null (LayerNorm only)
  void* out = nullptr;
  int64_t out_stride = 0;
  void* residual_out = nullptr;  // required when residual != null
  int64_t residual_out_stride = 0;
  float eps = 1e-6f;
};
cudaError_t rms_norm_launch(const NormArgs& args, cudaStream_t stream);
cudaError_t layer_norm_launch(const NormArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// pixel_shuffle / pixel_shuffle_layer_norm (pixel_shuffle.cu).
// x: [batch, side*side, channels] with unit channel stride; token t of batch b starts at
//    x + b*batch_stride + t*token_stride (elements; 0 = contiguous: token_stride = channels, batch_stride =
//    side*side*token_stride), so a strided view such as vit_embeds[:, 1:, :] is read in place;
// out: contiguous [batch, (side/r)^2, channels*r*r].
// Output token t of the (side/r)^2 grid and channel (ir*r + jr)*channels + c read input token
// (i2*r + ir)*side + (j2*r + jr), channel c, where (v1) t = j2*(side/r) + i2, (v2) t = i2*(side/r) + j2.
// The layer-norm variant normalizes each output row (weight/bias [channels*r*r], may be null).
struct PixelShuffleArgs {
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int side = 0;
  int r = 2;
  int channels = 0;
  bool v2 = true;
  int64_t token_stride = 0;  // elements between consecutive tokens of x (0: channels)
  int64_t batch_stride = 0;  // elements between consecutive batch items of x (0: side*side*token_stride)
  const void* x = nullptr;
  void* out = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  float eps = 1e-5f;
};
cudaError_t pixel_shuffle_launch(const PixelShuffleArgs& args, cudaStream_t stream);
cudaError_t pixel_shuffle_layer_norm_launch(const PixelShuffleArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// mlp_projector epilogue (mlp_projector.cu): y[r, c] = dtype(gelu_erf(float(y[r, c]) + float(bias[c]))) in place.
cudaError_t bias_gelu_launch(DType dtype, void* y, int64_t y_stride, const void* bias, int64_t rows, int64_t cols,
                             cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// attention / qk_norm_attention (attention.cu). Non-causal softmax(q k^T * scale) v with fp32 accumulation on
// tensor cores (mma.sync m16n8k16). dtype: fp16 or bf16 only. head_dim: 64 or 128. Needs sm_80 or newer.
// q/k/v/out are addressed as base + b*stride[0] + s*stride[1] + h*stride[2] + d; every stride and every base
// must be a multiple of 8 elements (16 bytes).
// qk-norm: when q_rstd/k_rstd are given, q and k are replaced while loading by
//   dtype(dtype(x * rstd[b*seqlen(_k) + s]) * w[h*head_dim + d])    (Llama casting, rms_norm over all heads)
// with rstd from qk_rstd_launch and w = q_norm_weight / k_norm_weight ([heads*head_dim]).
struct AttentionArgs {
  DType dtype = DType::kFloat16;
  int batch = 0;
  int seqlen = 0;    // query rows
  int seqlen_k = 0;  // keys / values (>= 1)
  int heads = 0;
  int head_dim = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};
  float scale = 0.f;
  const float* q_rstd = nullptr;  // [batch*seqlen] or null
  const float* k_rstd = nullptr;  // [batch*seqlen_k] or null
  const void* q_norm_weight = nullptr;
  const void* k_norm_weight = nullptr;
};
cudaError_t attention_launch(const AttentionArgs& args, cudaStream_t stream);

// Per-token rstd of q and of k over all `channels` channels of a packed qkv [rows, >= 2*channels] tensor:
// rstd[0*rows + i] = rsqrt(mean(q_i^2) + eps), rstd[1*rows + i] = same for k (q at column 0, k at `channels`).
// dtype: fp32 / fp16 / bf16.
cudaError_t qk_rstd_launch(DType dtype, const void* qkv, int64_t rows, int64_t row_stride, int64_t channels,
                           float eps, float* rstd, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// quant_matmul (quant_matmul.cu): out[M, N] = x[M, K] @ dequant(W)[K, N], GPTQ layout, fp32 accumulation,
// tensor cores (mma.sync m16n8k16) with the weights dequantized in registers. Tuned for small M (decode).
//   qweight int32 [K*bits/32, N] (values packed along K, low bits first), scales [groups, N] (fp16 or fp32),
//   qzeros int32 [groups, N*bits/32] (packed along N, low bits first), zero = stored + zero_offset
//   (GPTQ v1: zero_offset 1, gptq_v2: 0), g_idx int32 [K] (group of each input row) or null (k / group_size;
//   then group_size must be a multiple of kQmmIntGroupMultiple -- pass an explicit g_idx otherwise).
//   w[k, n] = (q[k, n] - zero[g, n]) * scale[g, n], g = g_idx[k].
// Constraints: bits 4 or 8; x/out fp16 or bf16; K % 16 == 0; N % 32 == 0; x row stride % 8 == 0; 16-byte
// aligned x / qweight; 8-byte aligned scales (fp16/bf16) or 16-byte (fp32). Needs sm_80 or newer.
// workspace: fp32 [split_k, M, N] when split_k > 1 (see quant_matmul_split_k), else may be null.
struct QuantMatmulArgs {
  DType dtype = DType::kFloat16;
  DType scale_dtype = DType::kFloat16;
  int bits = 4;
  int zero_offset = 1;
  int64_t M = 0, K = 0, N = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const int32_t* qweight = nullptr;
  const void* scales = nullptr;
  const int32_t* qzeros = nullptr;
  const int32_t* g_idx = nullptr;
  int64_t group_size = 128;
  int64_t groups = 0;
  const float* bias = nullptr;  // fp32 [N] or null, added to the fp32 sum before the final rounding
  void* out = nullptr;
  int64_t out_stride = 0;
  float* workspace = nullptr;
  int split_k = 1;
};
constexpr int kQmmIntGroupMultiple = 64;
// Split-K factor the launcher will use for this problem on `device` (>= 1).
int quant_matmul_split_k(int64_t M, int64_t K, int64_t N, int device);
cudaError_t quant_matmul_launch(const QuantMatmulArgs& args, cudaStream_t stream);

// Compute capability major*10+minor of the current device, or -1.
int current_device_sm();

}  // namespace ik
