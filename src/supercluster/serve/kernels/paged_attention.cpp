// Attention of one engine step, straight on the paged KV cache: the step's tokens (many sequences'
// prompt chunks and decoded tokens, packed) are rotated (RoPE), their keys and values stored in
// their sequences' blocks, and each query attends to its own sequence's positions up to its own,
// read where the block table points: nothing gathered into a padded batch, no mask tensor.
//
//   q, k, v      fp32 [T, H*D], [T, KVH*D], [T, KVH*D]  the step's projections (rows may be strided)
//   rope         fp32 [positions, D] (cos | sin of D/2 frequencies), or empty when q and k come rotated
//   positions    int64 [T]           each token's position in its sequence
//   token_seq    int64 [T]           each token's sequence (a row of block_tables); a sequence's
//                                    tokens are consecutive, positions rising
//   block_tables int64 [S, N]        each sequence's blocks
//   k_pool, v_pool fp32 or fp16 [blocks * block_size, KVH, D]  one layer's pool
//   returns      fp32 [T, H*D]       softmax(q . k * scale) . v over positions 0..own
//
// A decode step reads every sequence's whole context at every layer, so with many sequences the
// step is bound by memory: fp16 pools halve the bytes (llama.cpp's default KV cache type). Scores,
// softmax and sums are fp32 either way.
//
// Query head h reads key/value head h / (H / KVH), as grouped-query attention shares them. Work is
// split over (run of a sequence's tokens, up to kTile of them, key/value head), taken by PyTorch's
// intra-op threads as each is free: a tile's queries share every key and value they read. Each query's result is
// computed the same way whatever else the step holds, so a sequence's output does not depend on its
// batch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "vector_math.h"

namespace {

using supercluster_kernels::exp_approx;
using supercluster_kernels::to_float;
using supercluster_kernels::Vec;

constexpr int64_t kTile = 8;  // tokens of one sequence per task

// Where one task's rows and keys lie. Row r: token t0 + r / group, query head kvh * group + r % group;
// it sees keys 0..seen[r]-1. Its (rotated, scaled) query and its output lie at row_offset[r] in
// queries and out; key l at key_offset[l] in the pools.
struct TaskLayout {
  int64_t rows, keys, D;
  const int64_t *seen, *row_offset, *key_offset;
};

#if defined(__AVX512F__)
// Lane j of the result: the sum of v[j]'s 16 lanes. Summed one vector at a time, each key's score
// would end in a horizontal sum of its own (as long as its 4 products for a head of 64), the bulk
// of attention's time at many sequences; 16 at once share one transposing tree of adds.
inline __m512 lane_sums16(const __m512 v[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i]'s and v[2i+1]'s even and odd halves
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the sums of v[4i..4i+3] over that lane
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // the four 128-bit lanes added, v[4i..4i+3]'s sums moved to lane i
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// task_scores for a head of Dim (a multiple of 16): a row's query held in registers, its keys 16 at
// a time. Scores past a row's own keys are left as they are (0: the weights task_values reads).
template <int64_t Dim, typename T>
void task_scores_fixed(const TaskLayout& t, const float* queries, const T* k_pool, float* scores, float* top) {
  constexpr int V = Dim / 16;
  for (int64_t r = 0; r < t.rows; ++r) {
    __m512 q[V];
    for (int j = 0; j < V; ++j) q[j] = _mm512_loadu_ps(queries + t.row_offset[r] + 16 * j);
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    float* row = scores + r * t.keys;
    for (int64_t l0 = 0; l0 < t.seen[r]; l0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, t.seen[r] - l0));
      // the next 16 keys, asked for now: they lie a slot apart each (or a block apart), a stride
      // the hardware prefetchers do not follow from one row to the next
      for (int64_t i = l0 + 16; i < std::min<int64_t>(l0 + 32, t.seen[r]); ++i)
        for (int64_t b = 0; b < Dim * static_cast<int64_t>(sizeof(T)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(k_pool + t.key_offset[i]) + b, _MM_HINT_T0);
      __m512 products[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= n) {
          products[i] = _mm512_setzero_ps();
          continue;
        }
        const T* key = k_pool + t.key_offset[l0 + i];
        __m512 p = _mm512_mul_ps(q[0], Vec::load(key).v);
        for (int j = 1; j < V; ++j) p = _mm512_fmadd_ps(q[j], Vec::load(key + 16 * j).v, p);
        products[i] = p;
      }
      const __mmask16 mask = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
      const __m512 s = lane_sums16(products);
      _mm512_mask_storeu_ps(row + l0, mask, s);
      best = _mm512_mask_max_ps(best, mask, best, s);
    }
    top[r] = _mm512_reduce_max_ps(best);
  }
}
#endif

// Scores of every row against its keys, and each row's maximum.
template <typename T>
void task_scores(const TaskLayout& t, const float* queries, const T* k_pool, float* scores, float* top) {
#if defined(__AVX512F__)
  if (t.D == 64) return task_scores_fixed<64>(t, queries, k_pool, scores, top);
  if (t.D == 128) return task_scores_fixed<128>(t, queries, k_pool, scores, top);
#endif
  std::fill_n(top, t.rows, -std::numeric_limits<float>::infinity());
  for (int64_t l = 0; l < t.keys; ++l) {  // each key read once for every row
    const T* key = k_pool + t.key_offset[l];
    for (int64_t r = 0; r < t.rows; ++r) {
      if (l >= t.seen[r]) continue;
      const float score = supercluster_kernels::dot(queries + t.row_offset[r], key, t.D);
      scores[r * t.keys + l] = score;
      top[r] = std::max(top[r], score);
    }
  }
}

// R rows of out = weights . values, the rows' Dim outputs held in registers while each value is
// read once. Weights past a row's own keys are 0 (and those keys' values finite), so a row's sums
// are the same whichever rows share the pass.
template <int64_t Dim, int R, typename T>
void values_in_registers(const TaskLayout& t, int64_t r0, int64_t keys, const float* weights, const T* v_pool, float* out) {
  constexpr int V = Dim / Vec::width;
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = Vec::zero();
  for (int64_t l = 0; l < keys; ++l) {
    const T* value = v_pool + t.key_offset[l];
#if defined(__AVX512F__) || defined(__AVX2__)
    if (l + 8 < keys)  // as task_scores_fixed asks for keys: values a slot apart, 8 ahead
      for (int64_t b = 0; b < Dim * static_cast<int64_t>(sizeof(T)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(v_pool + t.key_offset[l + 8]) + b, _MM_HINT_T0);
#endif
    Vec v[V];
    for (int j = 0; j < V; ++j) v[j] = Vec::load(value + j * Vec::width);
    for (int r = 0; r < R; ++r) {
      const Vec w = Vec::broadcast(weights[(r0 + r) * t.keys + l]);
      for (int j = 0; j < V; ++j) acc[r][j] = fmadd(w, v[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j].store(out + t.row_offset[r0 + r] + j * Vec::width);
}

template <int64_t Dim, typename T>
void task_values_fixed(const TaskLayout& t, const float* weights, const T* v_pool, float* out) {
  // Half of the vector registers accumulate (AVX-512: 32, AVX2: 16): rows of 64 outputs 4 at a
  // time with AVX-512, one at a time with AVX2.
  constexpr int R = std::max<int64_t>(1, (Vec::width == 16 ? 16 : 8) / (Dim / Vec::width));
  for (int64_t r = 0; r < t.rows; r += R) {
    const int64_t count = std::min<int64_t>(R, t.rows - r), keys = *std::max_element(t.seen + r, t.seen + r + count);
    // a grouped-query head's rows (3 for SmolLM2's 9 heads over 3) share each value they read
    if (count == R) values_in_registers<Dim, R>(t, r, keys, weights, v_pool, out);
    else if (R > 3 && count == 3) values_in_registers<Dim, std::min(R, 3)>(t, r, keys, weights, v_pool, out);
    else if (R > 2 && count == 2) values_in_registers<Dim, std::min(R, 2)>(t, r, keys, weights, v_pool, out);
    else
      for (int64_t i = r; i < r + count; ++i) values_in_registers<Dim, 1>(t, i, t.seen[i], weights, v_pool, out);
  }
}

template <typename T>
void task_values(const TaskLayout& t, const float* weights, const T* v_pool, float* out) {
  if (t.D == 64 && 64 % Vec::width == 0) return task_values_fixed<64>(t, weights, v_pool, out);
  if (t.D == 128 && 128 % Vec::width == 0) return task_values_fixed<128>(t, weights, v_pool, out);
  for (int64_t r = 0; r < t.rows; ++r) {  // any head size
    float* o = out + t.row_offset[r];
    std::fill_n(o, t.D, 0.f);
    for (int64_t l = 0; l < t.seen[r]; ++l) {
      const T* value = v_pool + t.key_offset[l];
      const float w = weights[r * t.keys + l];
      for (int64_t i = 0; i < t.D; ++i) o[i] += w * to_float(value[i]);
    }
  }
}

// out = x rotated by position's angles: (x1 cos - x2 sin, x2 cos + x1 sin) over halves, times scale
inline void rotate(const float* x, const float* angles, int64_t D, float scale, float* out) {
  const int64_t half = D / 2;
  const float *cos = angles, *sin = angles + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    out[i] = (x[i] * cos[i] - x[i + half] * sin[i]) * scale;
    out[i + half] = (x[i + half] * cos[i] + x[i] * sin[i]) * scale;
  }
}

template <typename T>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rope,
                  const int64_t* pos, const int64_t* seq, const int64_t* tables, int64_t N, int64_t block_size,
                  const std::vector<int64_t>& runs, T* kp, T* vp, int64_t KVH, int64_t D, float scale) {
  const int64_t T_ = q.size(0), H = q.size(1) / D, group = H / KVH;
  const bool rotated = rope.numel() == 0;
  auto slot = [&](int64_t s, int64_t p) { return tables[s * N + p / block_size] * block_size + p % block_size; };

  // Queries rotated and scaled; keys rotated and stored with their values.
  at::Tensor queries = at::empty({T_, H * D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  float* qs = queries.data_ptr<float>();
  supercluster_kernels::parallel_chunks(T_, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> key(KVH * D);
    for (int64_t t = t0; t < t1; ++t) {
      const float *qt = q.data_ptr<float>() + t * q.stride(0), *kt = k.data_ptr<float>() + t * k.stride(0);
      const float* vt = v.data_ptr<float>() + t * v.stride(0);
      const int64_t at = slot(seq[t], pos[t]) * KVH * D;
      if (rotated) {
        for (int64_t i = 0; i < H * D; ++i) qs[t * H * D + i] = qt[i] * scale;
        supercluster_kernels::store(kt, kp + at, KVH * D);
      } else {
        const float* angles = rope.data_ptr<float>() + pos[t] * D;
        for (int64_t h = 0; h < H; ++h) rotate(qt + h * D, angles, D, scale, qs + (t * H + h) * D);
        for (int64_t h = 0; h < KVH; ++h) rotate(kt + h * D, angles, D, 1.f, key.data() + h * D);
        supercluster_kernels::store(key.data(), kp + at, KVH * D);
      }
      supercluster_kernels::store(vt, vp + at, KVH * D);
    }
  });

  struct Task {
    int64_t t0, t1, kvh;
  };
  std::vector<Task> tasks;
  for (size_t r = 0; r + 1 < runs.size(); ++r)
    for (int64_t t0 = runs[r]; t0 < runs[r + 1]; t0 += kTile)
      for (int64_t h = 0; h < KVH; ++h) tasks.push_back({t0, std::min(t0 + kTile, runs[r + 1]), h});

  at::Tensor out = at::empty({T_, H * D}, queries.options());
  float* op = out.data_ptr<float>();
  supercluster_kernels::parallel_chunks(static_cast<int64_t>(tasks.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, tops;
    std::vector<int64_t> seen, row_offset, key_offset;
    for (int64_t i = i0; i < i1; ++i) {
      const Task& task = tasks[i];
      const int64_t sq = seq[task.t0], n = pos[task.t1 - 1] + 1, rows = (task.t1 - task.t0) * group;
      seen.resize(rows);
      row_offset.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {
        seen[r] = pos[task.t0 + r / group] + 1;
        row_offset[r] = ((task.t0 + r / group) * H + task.kvh * group + r % group) * D;
      }
      key_offset.resize(n);
      for (int64_t l = 0; l < n; l += block_size) {  // block by block: no division per key
        const int64_t first = tables[sq * N + l / block_size] * block_size;
        for (int64_t j = 0; j < std::min(block_size, n - l); ++j) key_offset[l + j] = ((first + j) * KVH + task.kvh) * D;
      }
      const TaskLayout layout{rows, n, D, seen.data(), row_offset.data(), key_offset.data()};
      scores.assign(rows * n, 0.f);
      tops.resize(rows);
      task_scores(layout, qs, kp, scores.data(), tops.data());
      for (int64_t r = 0; r < rows; ++r) {  // softmax over each row's keys, normalized here
        float* w = scores.data() + r * n;
        const int64_t m = seen[r];
        const float top = tops[r];
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t l = 0; l < m; ++l) {
          w[l] = exp_approx(w[l] - top);
          total += w[l];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t l = 0; l < m; ++l) w[l] *= inv;
      }
      task_values(layout, scores.data(), vp, op);
    }
  });
  return out;
}

}  // namespace

namespace supercluster_kernels {
inline namespace KERNELS_LIBRARY {

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rope,
                           const at::Tensor& positions, const at::Tensor& token_seq, const at::Tensor& block_tables,
                           int64_t block_size, const at::Tensor& k_pool, const at::Tensor& v_pool, double scale) {
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
              k_pool.scalar_type() == v_pool.scalar_type() &&
              (k_pool.scalar_type() == at::kFloat || k_pool.scalar_type() == at::kHalf),
              "paged_attention: fp32 or fp16 contiguous pools [slots, kv_heads, head_dim]");
  const int64_t KVH = k_pool.size(1), D = k_pool.size(2), pool = k_pool.size(0), T = q.size(0);
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->stride(1) == 1 && t->scalar_type() == at::kFloat,
                "paged_attention: q, k, v are fp32 [tokens, heads * head_dim] with contiguous rows");
  TORCH_CHECK(k.size(1) == KVH * D && v.size(1) == KVH * D && q.size(1) % (KVH * D) == 0 && D % 2 == 0,
              "paged_attention: q, k, v do not match the pools' heads");
  const bool rotated = rope.numel() == 0;
  TORCH_CHECK(rotated || (rope.dim() == 2 && rope.size(1) == D && rope.is_contiguous() && rope.scalar_type() == at::kFloat),
              "paged_attention: rope is fp32 [positions, head_dim]");
  for (const at::Tensor* t : {&positions, &token_seq, &block_tables})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "paged_attention: int64 contiguous indices");
  TORCH_CHECK(positions.numel() == T && token_seq.numel() == T && block_tables.dim() == 2, "paged_attention: index shapes");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t S = block_tables.size(0), N = block_tables.size(1);

  // Every index is checked before any is used: a bad one is an error, never a read outside the pool.
  std::vector<int64_t> runs;  // first token of each sequence's run, then T
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(seq[t] >= 0 && seq[t] < S && pos[t] >= 0 && pos[t] < N * block_size,
                "paged_attention: a token's sequence or position is out of range");
    TORCH_CHECK(rotated || pos[t] < rope.size(0), "paged_attention: a position is beyond the rope table");
    if (t == 0 || seq[t] != seq[t - 1]) runs.push_back(t);
    else TORCH_CHECK(pos[t] > pos[t - 1], "paged_attention: a sequence's positions must rise");
  }
  runs.push_back(T);
  for (size_t r = 0; r + 1 < runs.size(); ++r) {
    const int64_t* table = tables + seq[runs[r]] * N;
    for (int64_t b = 0; b <= pos[runs[r + 1] - 1] / block_size; ++b)
      TORCH_CHECK(table[b] >= 0 && (table[b] + 1) * block_size <= pool, "paged_attention: a block is outside the pool");
  }
  const float s = static_cast<float>(scale);
  if (k_pool.scalar_type() == at::kHalf)
    return attend(q, k, v, rope, pos, seq, tables, N, block_size, runs, k_pool.data_ptr<c10::Half>(),
                  v_pool.data_ptr<c10::Half>(), KVH, D, s);
  return attend(q, k, v, rope, pos, seq, tables, N, block_size, runs, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(),
                KVH, D, s);
}

}  // namespace KERNELS_LIBRARY
}  // namespace supercluster_kernels

#define REGISTER_ATTENTION(ns) TORCH_LIBRARY_FRAGMENT(ns, m)
REGISTER_ATTENTION(KERNELS_LIBRARY) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor rope, Tensor positions, Tensor token_seq, "
        "Tensor block_tables, int block_size, Tensor(a!) k_pool, Tensor(b!) v_pool, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(supercluster_kernels::paged_attention));
}
