// C entry points of the CPU-emulated kernels (tests/test_csrc_emulation.py loads them with ctypes).
// Compiled together with the csrc/*.cu sources as plain C++ with -DIK_EMULATION; each function fills the launcher's
// argument struct exactly as csrc/bindings.cpp does and returns the launcher's cudaError_t.
#include <cstdint>
#include <vector>

#include "../ik_launchers.h"

using ik::DType;

extern "C" {

int ik_emu_norm(int rms, int dtype, int64_t rows, int64_t cols, const void* x, int64_t x_stride, const void* residual,
                int64_t residual_stride, const void* scale, const void* weight, const void* bias, void* out,
                int64_t out_stride, void* residual_out, int64_t residual_out_stride, float eps) {
  ik::NormArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.rows = rows;
  a.cols = cols;
  a.x = x;
  a.x_stride = x_stride;
  a.residual = residual;
  a.residual_stride = residual_stride;
  a.scale = scale;
  a.weight = weight;
  a.bias = bias;
  a.out = out;
  a.out_stride = out_stride;
  a.residual_out = residual_out;
  a.residual_out_stride = residual_out_stride;
  a.eps = eps;
  return static_cast<int>(rms ? ik::rms_norm_launch(a, nullptr) : ik::layer_norm_launch(a, nullptr));
}

int ik_emu_pixel_shuffle(int ln, int dtype, int64_t batch, int side, int r, int channels, int v2,
                         int64_t token_stride, int64_t batch_stride, const void* x, void* out, const void* weight,
                         const void* bias, float eps) {
  ik::PixelShuffleArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.batch = batch;
  a.side = side;
  a.r = r;
  a.channels = channels;
  a.v2 = v2 != 0;
  a.token_stride = token_stride;
  a.batch_stride = batch_stride;
  a.x = x;
  a.out = out;
  a.weight = weight;
  a.bias = bias;
  a.eps = eps;
  return static_cast<int>(ln ? ik::pixel_shuffle_layer_norm_launch(a, nullptr) : ik::pixel_shuffle_launch(a, nullptr));
}

int ik_emu_bias_gelu(int dtype, void* y, int64_t y_stride, const void* bias, int64_t rows, int64_t cols) {
  return static_cast<int>(ik::bias_gelu_launch(static_cast<DType>(dtype), y, y_stride, bias, rows, cols, nullptr));
}

int ik_emu_qk_rstd(int dtype, const void* qkv, int64_t rows, int64_t row_stride, int64_t channels, float eps,
                   float* rstd) {
  return static_cast<int>(ik::qk_rstd_launch(static_cast<DType>(dtype), qkv, rows, row_stride, channels, eps, rstd,
                                             nullptr));
}

// strides: 12 int64 = q, k, v, out x (batch, seq, head)
int ik_emu_attention(int dtype, int batch, int seqlen, int seqlen_k, int heads, int head_dim, const void* q,
                     const void* k, const void* v, void* out, const int64_t* strides, float scale, const float* q_rstd,
                     const float* k_rstd, const void* q_norm_weight, const void* k_norm_weight) {
  ik::AttentionArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.batch = batch;
  a.seqlen = seqlen;
  a.seqlen_k = seqlen_k;
  a.heads = heads;
  a.head_dim = head_dim;
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = out;
  for (int d = 0; d < 3; ++d) {
    a.q_stride[d] = strides[d];
    a.k_stride[d] = strides[3 + d];
    a.v_stride[d] = strides[6 + d];
    a.o_stride[d] = strides[9 + d];
  }
  a.scale = scale;
  a.q_rstd = q_rstd;
  a.k_rstd = k_rstd;
  a.q_norm_weight = q_norm_weight;
  a.k_norm_weight = k_norm_weight;
  return static_cast<int>(ik::attention_launch(a, nullptr));
}

// split_k <= 0: the launcher's own choice (quant_matmul_split_k on the emulated 132-SM device)
int ik_emu_quant_matmul(int dtype, int scale_dtype, int bits, int zero_offset, int64_t M, int64_t K, int64_t N,
                        const void* x, int64_t x_stride, const int32_t* qweight, const void* scales,
                        const int32_t* qzeros, const int32_t* g_idx, int64_t group_size, int64_t groups,
                        const float* bias, void* out, int split_k) {
  ik::QuantMatmulArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.scale_dtype = static_cast<DType>(scale_dtype);
  a.bits = bits;
  a.zero_offset = zero_offset;
  a.M = M;
  a.K = K;
  a.N = N;
  a.x = x;
  a.x_stride = x_stride;
  a.qweight = qweight;
  a.scales = scales;
  a.qzeros = qzeros;
  a.g_idx = g_idx;
  a.group_size = group_size;
  a.groups = groups;
  a.bias = bias;
  a.out = out;
  a.out_stride = N;
  a.split_k = split_k > 0 ? split_k : ik::quant_matmul_split_k(M, K, N, 0);
  std::vector<float> ws;
  if (a.split_k > 1) {
    ws.resize(static_cast<size_t>(a.split_k) * M * N);
    a.workspace = ws.data();
  }
  return static_cast<int>(ik::quant_matmul_launch(a, nullptr));
}

int ik_emu_quant_matmul_split_k(int64_t M, int64_t K, int64_t N) { return ik::quant_matmul_split_k(M, K, N, 0); }

}  // extern "C"
