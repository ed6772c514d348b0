// The only file that sees torch: validates tensors, picks the current CUDA stream, calls the plain-CUDA launchers
// of ik_launchers.h and checks the returned cudaError_t after every launch.
//
// The kernels are registered as their own operator namespace `internvl_kernels_cuda` (CUDA dispatch key) and
// called by internvl_kernels/ops/_cuda.py, which registers them as the "cuda" backend of the public custom ops
// `internvl_kernels::<op>` (defined in Python). Schemas take the same arguments as the eager references in
// internvl_kernels/model/functional.py, except where a string argument became an int/bool
// (pixel_shuffle: r = round(1/scale_factor), v2 = version == "v2"; quant_matmul: zero_offset from the layout).
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/version.h>

#include "ik_launchers.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define IK_CHECK_LAUNCH(expr, opname)                                                                     \
  do {                                                                                                    \
    const cudaError_t ik_err_ = (expr);                                                                   \
    TORCH_CHECK(ik_err_ == cudaSuccess, "internvl_kernels_cuda::", opname, ": CUDA kernel launch failed: ", \
                cudaGetErrorName(ik_err_), " (", cudaGetErrorString(ik_err_), ")");                      \
  } while (0)

ik::DType to_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ik::DType::kFloat32;
    case at::kHalf:
      return ik::DType::kFloat16;
    case at::kBFloat16:
      return ik::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return ik::DType::kFloat32;
}

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", ref.scalar_type(), " (the CUDA kernels need one dtype)");
}

void check_vector(const Tensor& t, int64_t n, const Tensor& ref, const char* op, const char* name) {
  check_same(t, ref, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
}

// [.., C] -> 2-D view with unit inner stride (copies only when no such view exists).
Tensor rows_view(const Tensor& x) {
  Tensor x2 = x.reshape({-1, x.size(-1)});
  if (x2.stride(1) != 1 || (x2.size(0) > 1 && x2.stride(0) < x2.size(1))) x2 = x2.contiguous();
  return x2;
}

cudaStream_t stream_for(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// Test hook (internvl_kernels.ops.poison_outputs): when set, every output buffer is pre-filled with this value so
// the parity tests prove each element is written by the kernel.
std::optional<double> g_poison;

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
  if (g_poison) t.fill_(*g_poison);
  return t;
}

void set_poison(std::optional<double> value) { g_poison = value; }

// ------------------------------------------------------------------------------------------------------ norms
std::tuple<Tensor, Tensor> norm_impl(const char* op, bool rms, const Tensor& x, const OptTensor& residual,
                                     const OptTensor& weight, const OptTensor& bias, double eps,
                                     const OptTensor& scale) {
  check_cuda(x, op, "x");
  const ik::DType dt = to_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got ", x.sizes());
  const int64_t C = x.size(-1);
  if (weight) check_vector(*weight, C, x, op, "weight");
  if (bias) check_vector(*bias, C, x, op, "bias");
  if (scale) check_vector(*scale, C, x, op, "scale");
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows_view(x);
  Tensor out = new_output(x.sizes(), x.options());
  Tensor res_out;
  Tensor r2;
  ik::NormArgs a;
  a.dtype = dt;
  a.rows = x2.size(0);
  a.cols = C;
  a.x = x2.data_ptr();
  a.x_stride = x2.stride(0);
  a.out = out.data_ptr();
  a.out_stride = C;
  a.eps = static_cast<float>(eps);
  const Tensor w = weight ? weight->contiguous() : Tensor();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  const Tensor s = scale ? scale->contiguous() : Tensor();
  a.weight = weight ? w.data_ptr() : nullptr;
  a.bias = bias ? b.data_ptr() : nullptr;
  if (residual) {
    check_same(*residual, x, op, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual has shape ", residual->sizes(), " but x has ",
                x.sizes());
    r2 = rows_view(*residual);
    res_out = new_output(x.sizes(), x.options());
    a.residual = r2.data_ptr();
    a.residual_stride = r2.stride(0);
    a.residual_out = res_out.data_ptr();
    a.residual_out_stride = C;
    a.scale = scale ? s.data_ptr() : nullptr;
  }
  const cudaStream_t stream = stream_for(x);
  IK_CHECK_LAUNCH(rms ? ik::rms_norm_launch(a, stream) : ik::layer_norm_launch(a, stream), op);
  return {res_out, out};
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  return std::get<1>(norm_impl("rms_norm", true, x, std::nullopt, weight, std::nullopt, eps, std::nullopt));
}

Tensor layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  return std::get<1>(norm_impl("layer_norm", false, x, std::nullopt, weight, bias, eps, std::nullopt));
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps,
                                        const OptTensor& scale) {
  return norm_impl("add_rms_norm", true, x, residual, weight, std::nullopt, eps, scale);
}

std::tuple<Tensor, Tensor> add_layer_norm(const Tensor& x, const Tensor& residual, const OptTensor& weight,
                                          const OptTensor& bias, double eps, const OptTensor& scale) {
  return norm_impl("add_layer_norm", false, x, residual, weight, bias, eps, scale);
}

// -------------------------------------------------------------------------------------------- pixel shuffle
Tensor shuffle_impl(const char* op, bool ln, const Tensor& x, int64_t r, bool v2, const OptTensor& weight,
                    const OptTensor& bias, double eps) {
  check_cuda(x, op, "x");
  const ik::DType dt = to_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 3, op, ": x must be [batch, tokens, channels], got ", x.sizes());
  TORCH_CHECK(r >= 1, op, ": 1/scale_factor must be a positive integer, got ", r);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(N))));
  TORCH_CHECK(side * side == N, op, ": ", N, " tokens do not form a square grid (drop the cls token first)");
  TORCH_CHECK(side % r == 0, op, ": grid ", side, "x", side, " is not divisible by 1/scale_factor=", r);
  TORCH_CHECK(C > 0 && side > 0, op, ": empty channel or token dimension: ", x.sizes());
  const int64_t cout = C * r * r;
  if (weight) check_vector(*weight, cout, x, op, "weight");
  if (bias) check_vector(*bias, cout, x, op, "bias");
  c10::cuda::CUDAGuard guard(x.device());
  // read strided token views (e.g. vit_embeds[:, 1:, :]) in place; only the channel stride must be 1
  const bool in_place = x.stride(2) == 1 && x.stride(1) >= C && (B == 1 || x.stride(0) >= N * x.stride(1));
  const Tensor xc = in_place ? x : x.contiguous();
  Tensor out = new_output({B, (side / r) * (side / r), cout}, x.options());
  const Tensor w = weight ? weight->contiguous() : Tensor();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  ik::PixelShuffleArgs a;
  a.dtype = dt;
  a.batch = B;
  a.side = static_cast<int>(side);
  a.r = static_cast<int>(r);
  a.channels = static_cast<int>(C);
  a.v2 = v2;
  a.token_stride = xc.stride(1);
  a.batch_stride = B == 1 ? 0 : xc.stride(0);
  a.x = xc.data_ptr();
  a.out = out.data_ptr();
  a.weight = weight ? w.data_ptr() : nullptr;
  a.bias = bias ? b.data_ptr() : nullptr;
  a.eps = static_cast<float>(eps);
  const cudaStream_t stream = stream_for(x);
  IK_CHECK_LAUNCH(ln ? ik::pixel_shuffle_layer_norm_launch(a, stream) : ik::pixel_shuffle_launch(a, stream), op);
  return out;
}

Tensor pixel_shuffle(const Tensor& x, int64_t r, bool v2) {
  return shuffle_impl("pixel_shuffle", false, x, r, v2, std::nullopt, std::nullopt, 0.0);
}

Tensor pixel_shuffle_layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t r, bool v2,
                                double eps) {
  return shuffle_impl("pixel_shuffle_layer_norm", true, x, r, v2, weight, bias, eps);
}

// ------------------------------------------------------------------------------------------------ projector
Tensor bias_gelu_(Tensor y, const Tensor& bias) {
  const char* op = "bias_gelu_";
  check_cuda(y, op, "y");
  const ik::DType dt = to_dtype(y, op, "y");
  TORCH_CHECK(y.dim() >= 1, op, ": y must have at least one dimension");
  const int64_t C = y.size(-1);
  check_vector(bias, C, y, op, "bias");
  TORCH_CHECK(y.is_contiguous(), op, ": y must be contiguous (it is updated in place)");
  c10::cuda::CUDAGuard guard(y.device());
  const Tensor b = bias.contiguous();
  IK_CHECK_LAUNCH(ik::bias_gelu_launch(dt, y.data_ptr(), C, b.data_ptr(), C == 0 ? 0 : y.numel() / C, C,
                                       stream_for(y)),
                  op);
  return y;
}

Tensor mlp_projector(const Tensor& x, const Tensor& ln_weight, const Tensor& ln_bias, const Tensor& w1,
                     const Tensor& b1, const Tensor& w2, const Tensor& b2, double eps) {
  const char* op = "mlp_projector";
  check_cuda(x, op, "x");
  to_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t C = x.size(-1);
  check_same(w1, x, op, "w1");
  check_same(w2, x, op, "w2");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, op, ": w1 must be [hidden, ", C, "], got ", w1.sizes());
  const int64_t H = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H, op, ": w2 must be [out, ", H, "], got ", w2.sizes());
  check_vector(b1, H, x, op, "b1");
  check_vector(b2, w2.size(0), x, op, "b2");
  // LayerNorm (our kernel) -> GEMM (cuBLAS) -> bias + erf-GELU (our kernel, in place) -> GEMM + bias (cuBLAS).
  const Tensor h = layer_norm(x, ln_weight, ln_bias, eps);
  Tensor g = at::matmul(h, w1.t()).contiguous();
  bias_gelu_(g, b1);
  const Tensor g2 = g.reshape({-1, H});
  Tensor out = at::addmm(b2, g2, w2.t());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w2.size(0);
  return out.view(shape);
}

// ------------------------------------------------------------------------------------------------ attention
void check_sm80(const char* op) {
  const int sm = ik::current_device_sm();
  TORCH_CHECK(sm >= 80, op, ": the CUDA kernel needs compute capability 8.0 or newer (got ", sm / 10, ".", sm % 10,
              "); use set_backend('triton')");
}

bool attn_aligned(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride(d) % 8 != 0) return false;
  return t.stride(3) == 1;
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, std::optional<double> scale) {
  const char* op = "attention";
  check_cuda(q, op, "q");
  const ik::DType dt = to_dtype(q, op, "q");
  TORCH_CHECK(dt != ik::DType::kFloat32, op, ": the CUDA kernel takes float16/bfloat16 only (fp32 runs on Triton)");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q, k, v must be [batch, seq, heads, head_dim], got ", q.sizes(),
              ", ", k.sizes());
  check_same(k, q, op, "k");
  check_same(v, q, op, "v");
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t SK = k.size(1);
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(0) == B && k.size(2) == H && k.size(3) == D, op,
              ": k and v must be [", B, ", S_kv, ", H, ", ", D, "], got ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(SK > 0, op, ": k/v have no tokens (S_kv = 0)");
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128 for the CUDA kernel, got ", D);
  TORCH_CHECK(B <= 65535 && H <= 65535 && S <= 0x7fffffff && SK <= 0x7fffffff, op,
              ": shape too large for the grid: ", q.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  check_sm80(op);
  // strided views are used as they are when 16-byte aligned; anything else gets one fresh (aligned) copy
  const Tensor qc = attn_aligned(q) ? q : q.clone(at::MemoryFormat::Contiguous);
  const Tensor kc = attn_aligned(k) ? k : k.clone(at::MemoryFormat::Contiguous);
  const Tensor vc = attn_aligned(v) ? v : v.clone(at::MemoryFormat::Contiguous);
  Tensor out = new_output({B, S, H, D}, q.options());
  ik::AttentionArgs a;
  a.dtype = dt;
  a.batch = static_cast<int>(B);
  a.seqlen = static_cast<int>(S);
  a.seqlen_k = static_cast<int>(SK);
  a.heads = static_cast<int>(H);
  a.head_dim = static_cast<int>(D);
  a.q = qc.data_ptr();
  a.k = kc.data_ptr();
  a.v = vc.data_ptr();
  a.out = out.data_ptr();
  for (int d = 0; d < 3; ++d) {  // batch, seq, head strides (head_dim stride is 1)
    a.q_stride[d] = qc.stride(d);
    a.k_stride[d] = kc.stride(d);
    a.v_stride[d] = vc.stride(d);
    a.o_stride[d] = out.stride(d);
  }
  a.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  IK_CHECK_LAUNCH(ik::attention_launch(a, stream_for(q)), op);
  return out;
}

Tensor qk_norm_attention(const Tensor& qkv, const Tensor& q_norm_weight, const Tensor& k_norm_weight,
                         int64_t num_heads, double eps, std::optional<double> scale) {
  const char* op = "qk_norm_attention";
  check_cuda(qkv, op, "qkv");
  const ik::DType dt = to_dtype(qkv, op, "qkv");
  TORCH_CHECK(dt != ik::DType::kFloat32, op,
              ": the CUDA kernel takes float16/bfloat16 only (fp32 runs on Triton)");
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be [batch, seq, 3*C], got ", qkv.sizes());
  const int64_t B = qkv.size(0), S = qkv.size(1), C3 = qkv.size(2);
  TORCH_CHECK(C3 % 3 == 0, op, ": last dim of qkv (", C3, ") is not 3*C");
  const int64_t C = C3 / 3;
  TORCH_CHECK(num_heads > 0 && C % num_heads == 0, op, ": C=", C, " is not divisible by num_heads=", num_heads);
  const int64_t D = C / num_heads;
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128 for the CUDA kernel, got ", D);
  check_vector(q_norm_weight, C, qkv, op, "q_norm_weight");
  check_vector(k_norm_weight, C, qkv, op, "k_norm_weight");
  TORCH_CHECK(B <= 65535 && num_heads <= 65535, op, ": shape too large for the grid: ", qkv.sizes());
  c10::cuda::CUDAGuard guard(qkv.device());
  check_sm80(op);
  // rows b*S + s must be evenly spaced (stride(0) == S*stride(1)), 16-byte aligned, unit inner stride.
  const bool ok = qkv.stride(2) == 1 && qkv.stride(1) % 8 == 0 && (B <= 1 || qkv.stride(0) == S * qkv.stride(1)) &&
                  reinterpret_cast<uintptr_t>(qkv.data_ptr()) % 16 == 0 && C % 8 == 0;
  const Tensor x = ok ? qkv : qkv.clone(at::MemoryFormat::Contiguous);
  TORCH_CHECK(C % 8 == 0, op, ": C must be a multiple of 8, got ", C);
  const Tensor qw = q_norm_weight.contiguous();
  const Tensor kw = k_norm_weight.contiguous();
  const int64_t row_stride = x.stride(1);
  Tensor rstd = at::empty({2, B * S}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = stream_for(x);
  IK_CHECK_LAUNCH(ik::qk_rstd_launch(dt, x.data_ptr(), B * S, row_stride, C, static_cast<float>(eps),
                                     rstd.data_ptr<float>(), stream),
                  op);
  Tensor out = new_output({B, S, C}, x.options());
  ik::AttentionArgs a;
  a.dtype = dt;
  a.batch = static_cast<int>(B);
  a.seqlen = static_cast<int>(S);
  a.seqlen_k = static_cast<int>(S);
  a.heads = static_cast<int>(num_heads);
  a.head_dim = static_cast<int>(D);
  const int64_t esz = x.element_size();
  const char* base = static_cast<const char*>(x.data_ptr());
  a.q = base;
  a.k = base + C * esz;
  a.v = base + 2 * C * esz;
  a.out = out.data_ptr();
  const int64_t bstride = S * row_stride;
  const int64_t qs[3] = {bstride, row_stride, D};
  for (int d = 0; d < 3; ++d) a.q_stride[d] = a.k_stride[d] = a.v_stride[d] = qs[d];
  a.o_stride[0] = S * C;
  a.o_stride[1] = C;
  a.o_stride[2] = D;
  a.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  a.q_rstd = rstd.data_ptr<float>();
  a.k_rstd = rstd.data_ptr<float>() + B * S;
  a.q_norm_weight = qw.data_ptr();
  a.k_norm_weight = kw.data_ptr();
  IK_CHECK_LAUNCH(ik::attention_launch(a, stream), op);
  return out;
}

// --------------------------------------------------------------------------------------------- quant_matmul
Tensor quant_matmul(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& qzeros,
                    const OptTensor& g_idx, const OptTensor& bias, int64_t bits, int64_t group_size,
                    int64_t zero_offset) {
  const char* op = "quant_matmul";
  check_cuda(x, op, "x");
  const ik::DType dt = to_dtype(x, op, "x");
  TORCH_CHECK(dt != ik::DType::kFloat32, op, ": x must be float16 or bfloat16, got float32");
  TORCH_CHECK(bits == 4 || bits == 8, op, ": the CUDA kernel supports bits 4 and 8, got ", bits);
  TORCH_CHECK(zero_offset == 0 || zero_offset == 1, op, ": zero_offset must be 0 (gptq_v2) or 1 (gptq v1)");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K]");
  const int64_t K = x.size(-1);
  for (const auto* t : {&qweight, &qzeros}) {
    check_cuda(*t, op, "qweight/qzeros");
    TORCH_CHECK(t->scalar_type() == at::kInt, op, ": qweight and qzeros must be int32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": qweight/qzeros on ", t->device(), " but x on ", x.device());
  }
  check_cuda(scales, op, "scales");
  TORCH_CHECK(scales.device() == x.device(), op, ": scales on ", scales.device(), " but x on ", x.device());
  to_dtype(scales, op, "scales");
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) * 32 == K * bits, op, ": qweight must be [K*bits/32, N] = [",
              K * bits / 32, ", N] for K=", K, ", got ", qweight.sizes());
  const int64_t N = qweight.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N, op, ": scales must be [groups, ", N, "], got ",
              scales.sizes());
  const int64_t G = scales.size(0);
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == G && qzeros.size(1) * 32 == N * bits, op,
              ": qzeros must be [", G, ", ", N * bits / 32, "], got ", qzeros.sizes());
  TORCH_CHECK(K % 16 == 0 && N % 32 == 0, op, ": the CUDA kernel needs K % 16 == 0 and N % 32 == 0, got K=", K,
              " N=", N);
  const int64_t gs = group_size <= 0 ? K : group_size;
  if (g_idx) {
    check_cuda(*g_idx, op, "g_idx");
    TORCH_CHECK(g_idx->scalar_type() == at::kInt && g_idx->dim() == 1 && g_idx->size(0) == K, op,
                ": g_idx must be int32 [", K, "], got ", g_idx->scalar_type(), " ", g_idx->sizes());
  } else {
    TORCH_CHECK((K + gs - 1) / gs <= G, op, ": ", G, " groups cannot cover K=", K, " with group_size ", gs);
  }
  if (bias) {
    check_cuda(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias on ", bias->device(), " but x on ", x.device());
  }
  c10::cuda::CUDAGuard guard(x.device());
  Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1 || x2.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0)
    x2 = x2.clone(at::MemoryFormat::Contiguous);
  const int64_t M = x2.size(0);
  const Tensor qw = qweight.contiguous();
  // fp16 scales (the format) are read as is; bf16/fp32 ones as fp32 (exact for bf16)
  const Tensor sc = scales.scalar_type() == at::kHalf ? scales.contiguous() : scales.to(at::kFloat).contiguous();
  const Tensor qz = qzeros.contiguous();
  // Without g_idx the exact-integer kernel path needs group_size % 64 == 0; other group sizes get an explicit
  // g_idx = k / group_size and take the general path.
  Tensor gi;
  if (g_idx)
    gi = g_idx->contiguous();
  else if (gs % ik::kQmmIntGroupMultiple != 0)
    gi = at::arange(K, x.options().dtype(at::kInt)).div(gs, "floor").to(at::kInt);
  const Tensor bf = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor out = new_output(shape, x.options());
  if (M == 0) return out;
  ik::QuantMatmulArgs a;
  a.dtype = dt;
  a.scale_dtype = scales.scalar_type() == at::kHalf ? ik::DType::kFloat16 : ik::DType::kFloat32;
  a.bits = static_cast<int>(bits);
  a.zero_offset = static_cast<int>(zero_offset);
  a.M = M;
  a.K = K;
  a.N = N;
  a.x = x2.data_ptr();
  a.x_stride = x2.stride(0);
  a.qweight = qw.data_ptr<int32_t>();
  a.scales = sc.data_ptr();
  a.qzeros = qz.data_ptr<int32_t>();
  a.g_idx = gi.defined() ? gi.data_ptr<int32_t>() : nullptr;
  a.bias = bias ? bf.data_ptr<float>() : nullptr;
  a.group_size = gs;
  a.groups = G;
  a.out = out.data_ptr();
  a.out_stride = N;
  a.split_k = ik::quant_matmul_split_k(M, K, N, x.device().index());
  Tensor ws;
  if (a.split_k > 1) {
    ws = at::empty({a.split_k, M, N}, x.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
  }
  check_sm80(op);
  IK_CHECK_LAUNCH(ik::quant_matmul_launch(a, stream_for(x)), op);
  return out;
}

std::string build_info() {
  return std::string("torch=") + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
         "." + std::to_string(TORCH_VERSION_PATCH) + ";cuda=" + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace

TORCH_LIBRARY(internvl_kernels_cuda, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, Tensor? scale) -> (Tensor, Tensor)");
  m.def(
      "add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, Tensor? scale) -> "
      "(Tensor, Tensor)");
  m.def("pixel_shuffle(Tensor x, int r, bool v2) -> Tensor");
  m.def("pixel_shuffle_layer_norm(Tensor x, Tensor? weight, Tensor? bias, int r, bool v2, float eps) -> Tensor");
  m.def("bias_gelu_(Tensor(a!) y, Tensor bias) -> Tensor(a!)");
  m.def(
      "mlp_projector(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "float eps) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale) -> Tensor");
  m.def(
      "qk_norm_attention(Tensor qkv, Tensor q_norm_weight, Tensor k_norm_weight, int num_heads, float eps, "
      "float? scale) -> Tensor");
  m.def(
      "quant_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, Tensor? g_idx, Tensor? bias, int bits, "
      "int group_size, int zero_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl_kernels_cuda, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("layer_norm", &layer_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("add_layer_norm", &add_layer_norm);
  m.impl("pixel_shuffle", &pixel_shuffle);
  m.impl("pixel_shuffle_layer_norm", &pixel_shuffle_layer_norm);
  m.impl("bias_gelu_", &bias_gelu_);
  m.impl("mlp_projector", &mlp_projector);
  m.impl("attention", &attention);
  m.impl("qk_norm_attention", &qk_norm_attention);
  m.impl("quant_matmul", &quant_matmul);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "internvl-kernels CUDA kernels; the ops live in torch.ops.internvl_kernels_cuda";
  m.def("build_info", &build_info, "torch and CUDA versions this extension was built against");
  m.def("set_poison", &set_poison, "test hook: pre-fill outputs with this value (None: off)");
}
