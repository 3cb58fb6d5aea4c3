// The kernels' entry points, for the ops that compose them (decoder.cpp). They live in a namespace
// named after the build (-DKERNELS_LIBRARY=...), so builds for other instruction sets loaded into
// the same process (the tests load each code path) never bind to each other's symbols.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace supercluster_kernels {
inline namespace KERNELS_LIBRARY {

// blocks_linear.cpp: x @ W^T for 4/8-bit weight blocks, with an optional RMSNorm or SwiGLU prologue
// and a residual added; activations in 8- or 16-bit blocks.
at::Tensor blocks_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& d, const at::Tensor& m,
                         int64_t bits, int64_t out_features, const c10::optional<at::Tensor>& norm, double eps,
                         bool swiglu, const c10::optional<at::Tensor>& residual, int64_t activation_bits);

// paged_attention.cpp: one step's RoPE, KV-cache writes and attention on the paged blocks.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rope,
                           const at::Tensor& positions, const at::Tensor& token_seq, const at::Tensor& block_tables,
                           int64_t block_size, const at::Tensor& k_pool, const at::Tensor& v_pool, double scale);

}  // namespace KERNELS_LIBRARY
}  // namespace supercluster_kernels
