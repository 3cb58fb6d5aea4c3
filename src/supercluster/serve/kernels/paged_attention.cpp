// Decode attention straight from the paged KV cache: each decoding sequence's one query per head
// against the keys and values its block table points at, without first gathering them into a
// padded batch (which copies every context at every layer) and without a padding mask.
//
//   q        fp32 [B, H, D]         one query per sequence and head
//   k, v     fp32 [slots, KVH, D]   one layer's pool
//   slots    int64 [B, L]           the pool slot of each context position (L: the longest)
//   lengths  int64 [B]              each sequence's context
//   out      fp32 [B, H, D]         softmax(q . k * scale) . v over the sequence's own context
//
// Query head h reads key/value head h / (H / KVH), as grouped-query attention shares them. Work
// is split over (sequence, key/value head) pairs across PyTorch's intra-op threads; the inner
// loops over D run in SIMD registers.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// 16 independent partial sums: the compiler keeps them in one vector register without having to
// reorder a single sum (which it may not do for floats unasked).
inline float dot(const float* a, const float* b, int64_t n) {
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] += a[i + j] * b[i + j];
  float acc = 0.f;
  for (; i < n; ++i) acc += a[i] * b[i];
  for (float p : partial) acc += p;
  return acc;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                                  const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "paged_decode_attention: fp32 queries and pools");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(2) == k.size(2), "paged_decode_attention: shapes");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "paged_decode_attention: contiguous tensors");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && slots.is_contiguous() &&
              slots.dim() == 2 && slots.size(0) == q.size(0) && lengths.numel() == q.size(0), "paged_decode_attention: slots, lengths");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = slots.size(1), pool = k.size(0);
  TORCH_CHECK(H % KVH == 0, "paged_decode_attention: heads must be a multiple of key/value heads");
  const int64_t group = H / KVH;
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(length[b] >= 1 && length[b] <= L, "paged_decode_attention: a context length is out of range");
  at::Tensor out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> weights;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KVH, kvh = t % KVH, n = length[b];
      const int64_t* positions = slot + b * L;
      weights.assign(group * n, 0.f);
      for (int64_t l = 0; l < n; ++l) {
        TORCH_CHECK(positions[l] >= 0 && positions[l] < pool, "paged_decode_attention: a slot is outside the pool");
        const float* key = kp + (positions[l] * KVH + kvh) * D;
        for (int64_t g = 0; g < group; ++g) weights[g * n + l] = dot(qp + (b * H + kvh * group + g) * D, key, D) * s;
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax over the context, from its maximum
        float* w = weights.data() + g * n;
        const float top = *std::max_element(w, w + n);
        float total = 0.f;
        for (int64_t l = 0; l < n; ++l) total += (w[l] = std::exp(w[l] - top));
        for (int64_t l = 0; l < n; ++l) w[l] /= total;
        std::fill_n(op + (b * H + kvh * group + g) * D, D, 0.f);
      }
      for (int64_t l = 0; l < n; ++l) {
        const float* value = vp + (positions[l] * KVH + kvh) * D;
        for (int64_t g = 0; g < group; ++g) {
          float* o = op + (b * H + kvh * group + g) * D;
          const float w = weights[g * n + l];
          for (int64_t i = 0; i < D; ++i) o[i] += w * value[i];
        }
      }
    }
  });
  return out;
}

}  // namespace

#define REGISTER_ATTENTION(ns) TORCH_LIBRARY_FRAGMENT(ns, m)
REGISTER_ATTENTION(KERNELS_LIBRARY) {
  m.def("paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor lengths, float scale) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
