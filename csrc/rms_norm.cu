// rms_norm and add_rms_norm: Llama-style RMSNorm (fp32 mean of squares, rsqrt, cast to dtype, then * weight),
// optionally fused with InternViT's residual update `residual + ls * x`. See ik_norm.cuh for the kernel.
#include "ik_norm.cuh"

namespace ik {

cudaError_t rms_norm_launch(const NormArgs& args, cudaStream_t stream) { return norm_launch<true>(args, stream); }

}  // namespace ik
