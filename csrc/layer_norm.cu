// layer_norm and add_layer_norm: LayerNorm over the last dimension in fp32 (exact two-pass statistics),
// optionally fused with the residual update `residual + ls * x`. See ik_norm.cuh for the kernel.
#include "ik_norm.cuh"

namespace ik {

cudaError_t layer_norm_launch(const NormArgs& args, cudaStream_t stream) { return norm_launch<false>(args, stream); }

}  // namespace ik
