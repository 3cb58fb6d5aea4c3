// Every layer of a Llama-style model whose matrices are 4/8-bit blocks, in one call: per layer
//
//   h = h + wo(attention(wqkv(rms_norm(h))))     the norm folded into wqkv; RoPE and the cache
//   h = h + w2(swiglu(w13(rms_norm(h))))         writes into attention; SwiGLU into w2
//
// The layers as Python would call them cost one interpreter round trip per kernel (four a layer,
// 120 for a 30-layer model), which for a decode step of one sequence is a tenth of its time.
//
//   h          fp32 [T, hidden]  the step's embedded tokens; returns the last layer's output
//   weights    per layer, 14 tensors: attention_norm, wqkv (qweight, d, m), wo (3), ffn_norm,
//              w13 (3), w2 (3), as serve/quantize.py's BlockLinear holds them
//   bits, out_features  per layer, 4 each: of wqkv, wo, w13, w2
//   activation_bits     8 or 16, for every product (see blocks_linear.cpp)
//   heads      query heads (the pools give key/value heads and the head size)
//   k_pools, v_pools    per layer; the rest as paged_attention takes it

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"

namespace supercluster_kernels {
inline namespace KERNELS_LIBRARY {

at::Tensor decoder_layers(at::Tensor h, at::TensorList weights, at::IntArrayRef bits, at::IntArrayRef out_features,
                          double eps, int64_t heads, const at::Tensor& rope, const at::Tensor& positions,
                          const at::Tensor& token_seq, const at::Tensor& block_tables, int64_t block_size,
                          at::TensorList k_pools, at::TensorList v_pools, double scale, int64_t activation_bits) {
  const int64_t layers = static_cast<int64_t>(k_pools.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 14 * layers && static_cast<int64_t>(bits.size()) == 4 * layers &&
              static_cast<int64_t>(out_features.size()) == 4 * layers && static_cast<int64_t>(v_pools.size()) == layers,
              "decoder_layers: 14 weights, 4 bits and 4 out_features per layer, and a pool each");
  TORCH_CHECK(layers == 0 || k_pools[0].dim() == 3, "decoder_layers: pools are [slots, kv_heads, head_dim]");
  const c10::optional<at::Tensor> none;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + 14 * i;
    const int64_t* b = bits.data() + 4 * i;
    const int64_t* n = out_features.data() + 4 * i;
    const int64_t kv = k_pools[i].size(1) * k_pools[i].size(2);
    TORCH_CHECK(n[0] == heads * k_pools[i].size(2) + 2 * kv, "decoder_layers: wqkv does not match the heads");
    const at::Tensor qkv = blocks_linear(h, w[1], w[2], w[3], b[0], n[0], w[0], eps, false, none, activation_bits);
    const at::Tensor attended = paged_attention(qkv.narrow(1, 0, n[0] - 2 * kv), qkv.narrow(1, n[0] - 2 * kv, kv),
                                                qkv.narrow(1, n[0] - kv, kv), rope, positions, token_seq, block_tables,
                                                block_size, k_pools[i], v_pools[i], scale);
    h = blocks_linear(attended, w[4], w[5], w[6], b[1], n[1], none, 0., false, h, activation_bits);
    const at::Tensor gate_up = blocks_linear(h, w[8], w[9], w[10], b[2], n[2], w[7], eps, false, none, activation_bits);
    h = blocks_linear(gate_up, w[11], w[12], w[13], b[3], n[3], none, 0., true, h, activation_bits);
  }
  return h;
}

}  // namespace KERNELS_LIBRARY
}  // namespace supercluster_kernels

#define REGISTER_DECODER(ns) TORCH_LIBRARY_FRAGMENT(ns, m)
REGISTER_DECODER(KERNELS_LIBRARY) {
  m.def("decoder_layers(Tensor h, Tensor[] weights, int[] bits, int[] out_features, float eps, int heads, Tensor rope, "
        "Tensor positions, Tensor token_seq, Tensor block_tables, int block_size, Tensor(a!)[] k_pools, "
        "Tensor(b!)[] v_pools, float scale, int activation_bits=8) -> Tensor");
  m.impl("decoder_layers", c10::DispatchKey::CPU, TORCH_FN(supercluster_kernels::decoder_layers));
}
