// Every layer of a Llama-style model whose matrices are 4/8-bit blocks, in one call: per layer
//
//   h = h + wo(attention(wqkv(rms_norm(h))))     the norm folded into wqkv; RoPE and the cache
//   h = h + w2(swiglu(w13(rms_norm(h))))         writes into attention; SwiGLU into w2
//
// with q and k normed before RoPE where the model does (`qk_norm` 1: per head, Qwen3's; 2: over
// all heads at once, OLMoE's), and in a Mixture-of-Experts layer (`moe_ffn` below) the second
// line routed, x = rms_norm(h):
//
//   h = h + sum over the token's top_k experts e of weight_e * w2_e(swiglu(w13_e(x))) + shared(x)
//
// The layers as Python would call them cost one interpreter round trip per kernel (four a layer,
// 120 for a 30-layer model), which for a decode step of one sequence is a tenth of its time.
//
//   h          fp32 [T, hidden]  the step's embedded tokens; returns the last layer's output
//   weights    per layer, each matrix as serve/quantize.py's BlockLinear holds it (qweight, d, m):
//              attention_norm, q_norm and k_norm (when qk_norm), wqkv (3), wo (3), ffn_norm, then
//              a dense layer's w13 (3), w2 (3), or an MoE layer's router weight (fp32 [experts,
//              hidden]), its expert bias [experts] when `expert_bias`, each expert's w13 (3) and
//              w2 (3), and when `shared` the shared experts' w1 (3), w3 (3), w2 (3)
//   bits, out_features  per matrix, in the same order
//   activation_bits     8 or 16, for every product (see blocks_linear.cpp)
//   heads      query heads (the pools give key/value heads and the head size)
//   qk_norm    0: none; 1: RMSNorm over each head of q and of k; 2: over all of q, and all of k
//   k_pools, v_pools    per layer; the rest as paged_attention takes it
//   experts    per layer, its routed experts (0: a dense layer); none given: every layer dense
//   top_k, sigmoid, norm_topk, route_scale, groups, topk_groups: the router (model/moe.py's Router)

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"

namespace supercluster_kernels {
inline namespace KERNELS_LIBRARY {

namespace {

// One matrix of blocks, as the weights list holds it.
struct Blocks {
  const at::Tensor* w;  // qweight, d, m
  int64_t bits, out_features;

  at::Tensor operator()(const at::Tensor& x, const c10::optional<at::Tensor>& norm, double eps, bool swiglu,
                        const c10::optional<at::Tensor>& residual, int64_t activation_bits) const {
    return blocks_linear(x, w[0], w[1], w[2], bits, out_features, norm, eps, swiglu, residual, activation_bits);
  }
};

// Walks the weights, bits and out_features lists in step.
struct Cursor {
  const at::Tensor* w;
  const int64_t* bits;
  const int64_t* out;

  const at::Tensor& tensor() { return *w++; }
  Blocks blocks() {
    const Blocks b{w, *bits++, *out++};
    w += 3;
    return b;
  }
};

struct Router {
  int64_t top_k, groups, topk_groups;
  bool sigmoid, norm_topk, expert_bias, shared;
  double route_scale;
};

// (weights [T, top_k] fp32, experts [T, top_k] int64): model/moe.py's Router.forward, op for op.
std::pair<at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& gate, const at::Tensor* bias,
                                        const Router& r) {
  const at::Tensor logits = at::linear(x, gate);
  const at::Tensor scores = r.sigmoid ? logits.sigmoid() : logits.softmax(-1);
  at::Tensor choose = bias != nullptr ? scores + *bias : scores;
  if (r.groups > 1) {  // each token's experts from its best topk_groups groups, a group rated by its best two
    const at::Tensor grouped = choose.view({x.size(0), r.groups, -1});
    const at::Tensor group_score = std::get<0>(grouped.topk(std::min<int64_t>(2, grouped.size(-1)), -1)).sum(-1);
    const at::Tensor keep = std::get<1>(group_score.topk(r.topk_groups, -1));
    const at::Tensor mask = at::ones_like(group_score, group_score.options().dtype(at::kBool)).scatter_(1, keep, false);
    choose = grouped.masked_fill(mask.unsqueeze(-1), -std::numeric_limits<double>::infinity()).flatten(1);
  }
  const at::Tensor experts = std::get<1>(choose.topk(r.top_k, -1)).contiguous();
  at::Tensor weights = scores.gather(1, experts);
  if (r.norm_topk && r.top_k > 1) {
    const at::Tensor sum = weights.sum(-1, true);
    weights = weights / (r.sigmoid ? sum + 1e-20 : sum);
  }
  if (r.route_scale != 1.) weights = weights * r.route_scale;  // (a scale of 1 changes no bit)
  return {weights.contiguous(), experts};
}

// One MoE layer's feed-forward with its residual: h + routed experts (+ shared experts) of rms_norm(h).
// The step's (token, choice) pairs are grouped by expert, as model/moe.py sorts them: each chosen
// expert multiplies its own rows only (llama.cpp's mul_mat_id) and an expert no token chose is not
// read. The outputs are weighted and summed in fp32 in that order (expert, then token), as the
// model's index_add does.
at::Tensor moe_ffn(const at::Tensor& h, Cursor& c, int64_t experts, double eps, const Router& r,
                   int64_t activation_bits) {
  const c10::optional<at::Tensor> none;
  const int64_t T = h.size(0), hidden = h.size(1), k = r.top_k;
  const at::Tensor& norm = c.tensor();
  const at::Tensor& gate = c.tensor();
  const at::Tensor* bias = r.expert_bias ? &c.tensor() : nullptr;
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == experts && gate.size(1) == hidden && gate.scalar_type() == at::kFloat,
              "decoder_layers: the router is fp32 [experts, hidden]");
  TORCH_CHECK(bias == nullptr || bias->numel() == experts, "decoder_layers: the expert bias is [experts]");
  const at::Tensor x = at::rms_norm(h, {hidden}, norm, eps);
  const auto [weights, chosen] = route(x, gate, bias, r);

  std::vector<std::vector<int64_t>> pairs(experts);  // per expert, its (token * k + choice) in order
  const int64_t* e_of = chosen.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) pairs[e_of[i]].push_back(i);
  at::Tensor y = at::zeros({T, hidden}, h.options());
  float* yp = y.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const Blocks w13 = c.blocks(), w2 = c.blocks();
    TORCH_CHECK(w2.out_features == hidden && w13.out_features % 2 == 0, "decoder_layers: expert ", e,
                "'s w13 is not [gate | up] or its w2 not [hidden, width]");
    if (pairs[e].empty()) continue;
    const int64_t n = static_cast<int64_t>(pairs[e].size());
    at::Tensor rows = x;
    if (T > 1) {
      std::vector<int64_t> tokens(n);
      for (int64_t j = 0; j < n; ++j) tokens[j] = pairs[e][j] / k;
      rows = x.index_select(0, at::tensor(tokens, x.options().dtype(at::kLong)));
    }
    const at::Tensor out = w2(w13(rows, none, 0., false, none, activation_bits), none, 0., true, none, activation_bits);
    const float* op = out.data_ptr<float>();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = pairs[e][j];
      const float weight = wp[i];
      float* dst = yp + (i / k) * hidden;
      const float* src = op + j * hidden;
      for (int64_t f = 0; f < hidden; ++f) dst[f] += src[f] * weight;
    }
  }
  if (r.shared) {  // one dense SwiGLU over every token, added to the routed sum
    const Blocks w1 = c.blocks(), w3 = c.blocks(), w2 = c.blocks();
    const at::Tensor gate_up = at::cat({w1(x, none, 0., false, none, activation_bits),
                                        w3(x, none, 0., false, none, activation_bits)}, 1);
    y = w2(gate_up, none, 0., true, y, activation_bits);
  }
  return h + y;
}

}  // namespace

at::Tensor decoder_layers(at::Tensor h, at::TensorList weights, at::IntArrayRef bits, at::IntArrayRef out_features,
                          double eps, int64_t heads, const at::Tensor& rope, const at::Tensor& positions,
                          const at::Tensor& token_seq, const at::Tensor& block_tables, int64_t block_size,
                          at::TensorList k_pools, at::TensorList v_pools, double scale, int64_t activation_bits,
                          at::IntArrayRef experts, int64_t top_k, bool sigmoid, bool norm_topk, double route_scale,
                          int64_t groups, int64_t topk_groups, bool expert_bias, bool shared, int64_t qk_norm) {
  const int64_t layers = static_cast<int64_t>(k_pools.size());
  const Router router{top_k, groups, topk_groups, sigmoid, norm_topk, expert_bias, shared, route_scale};
  TORCH_CHECK(qk_norm >= 0 && qk_norm <= 2, "decoder_layers: qk_norm is 0, 1 (per head) or 2 (over all heads)");
  TORCH_CHECK(experts.empty() || static_cast<int64_t>(experts.size()) == layers,
              "decoder_layers: experts gives each layer's count (0: dense), or none for all dense");
  int64_t want_weights = 0, want_matrices = 0;  // what the layers take, checked before any is read
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t e = experts.empty() ? 0 : experts[i];
    TORCH_CHECK(e == 0 || (top_k >= 1 && top_k <= e), "decoder_layers: top_k must be 1..experts");
    want_weights += (e == 0 ? 14 : 9 + expert_bias + 6 * e + 9 * shared) + (qk_norm ? 2 : 0);
    want_matrices += e == 0 ? 4 : 2 + 2 * e + 3 * shared;
  }
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == want_weights &&
              static_cast<int64_t>(bits.size()) == want_matrices &&
              static_cast<int64_t>(out_features.size()) == want_matrices &&
              static_cast<int64_t>(v_pools.size()) == layers,
              "decoder_layers: the weights, bits and out_features do not match the layers (see decoder.cpp)");
  TORCH_CHECK(layers == 0 || k_pools[0].dim() == 3, "decoder_layers: pools are [slots, kv_heads, head_dim]");
  const c10::optional<at::Tensor> none;
  Cursor c{weights.data(), bits.data(), out_features.data()};
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t kv = k_pools[i].size(1) * k_pools[i].size(2);
    const at::Tensor& attention_norm = c.tensor();
    const at::Tensor* q_norm = qk_norm ? &c.tensor() : nullptr;
    const at::Tensor* k_norm = qk_norm ? &c.tensor() : nullptr;
    const Blocks wqkv = c.blocks(), wo = c.blocks();
    const int64_t n = wqkv.out_features;
    TORCH_CHECK(n == heads * k_pools[i].size(2) + 2 * kv, "decoder_layers: wqkv does not match the heads");
    const at::Tensor qkv = wqkv(h, attention_norm, eps, false, none, activation_bits);
    at::Tensor q = qkv.narrow(1, 0, n - 2 * kv), k = qkv.narrow(1, n - 2 * kv, kv);
    if (qk_norm) {  // before RoPE, as the model's Attention: over each head, or over the whole row
      const auto norm = [&](const at::Tensor& x, const at::Tensor& weight) {
        const int64_t width = qk_norm == 1 ? k_pools[i].size(2) : x.size(1);
        return at::rms_norm(x.view({x.size(0), -1, width}), {width}, weight, eps).view({x.size(0), -1});
      };
      q = norm(q, *q_norm);
      k = norm(k, *k_norm);
    }
    const at::Tensor attended = paged_attention(q, k, qkv.narrow(1, n - kv, kv), rope, positions, token_seq,
                                                block_tables, block_size, k_pools[i], v_pools[i], scale);
    h = wo(attended, none, 0., false, h, activation_bits);
    if (!experts.empty() && experts[i] > 0) {
      h = moe_ffn(h, c, experts[i], eps, router, activation_bits);
    } else {
      const at::Tensor& ffn_norm = c.tensor();
      const Blocks w13 = c.blocks(), w2 = c.blocks();
      const at::Tensor gate_up = w13(h, ffn_norm, eps, false, none, activation_bits);
      h = w2(gate_up, none, 0., true, h, activation_bits);
    }
  }
  return h;
}

}  // namespace KERNELS_LIBRARY
}  // namespace supercluster_kernels

#define REGISTER_DECODER(ns) TORCH_LIBRARY_FRAGMENT(ns, m)
REGISTER_DECODER(KERNELS_LIBRARY) {
  m.def("decoder_layers(Tensor h, Tensor[] weights, int[] bits, int[] out_features, float eps, int heads, Tensor rope, "
        "Tensor positions, Tensor token_seq, Tensor block_tables, int block_size, Tensor(a!)[] k_pools, "
        "Tensor(b!)[] v_pools, float scale, int activation_bits=8, int[] experts=[], int top_k=2, bool sigmoid=False, "
        "bool norm_topk=True, float route_scale=1., int groups=1, int topk_groups=1, bool expert_bias=False, "
        "bool shared=False, int qk_norm=0) -> Tensor");
  m.impl("decoder_layers", c10::DispatchKey::CPU, TORCH_FN(supercluster_kernels::decoder_layers));
}
