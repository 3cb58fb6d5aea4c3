// y = x @ W^T for W held in blocks of 32 low-bit integers, x quantized on the fly to int8 blocks:
// the integer dot products llama.cpp computes on CPUs (Q4_1 / Q8_0 weights times Q8_1 activations).
//
// Weights (made by serve/quantize.py) are unsigned, w = d*q + m per block of 32 inputs, with an
// fp16 scale d and offset m (8-bit weights are stored as q+128 with m = -128*d). Output features
// come in panels of 16 and inputs in blocks of 32 (both zero-padded). Per panel and block:
//   q      8 chunks of 64 bytes, chunk c holding inputs 4c..4c+3 of all 16 features, byte 4*n+j
//          for feature n and input 4c+j (8-bit); for 4-bit, 4 chunks, chunk c's low nibbles
//          holding inputs 8c..8c+3 and its high nibbles 8c+4..8c+7
//   d, m   16 halves each
// so one vpdpbusd multiplies 4 inputs of one row of x (broadcast) into 16 features at once, and
// a block's 16 int32 sums meet their 16 scales in one vector: no horizontal sums, and each row
// of x costs one multiply-add per 4 inputs per 16 features.
//
// Activations, per row and block, in 8 bits (`activation_bits` 8, llama.cpp's Q8_1): dx = max|x|/127,
// qx = round(x/dx) in int8, sx = dx*sum(qx); a block adds d*dx*dot(q, qx) + m*sx to each output.
// In 16 bits (`activation_bits` 16, the default a served model gets): dx = max|x|/16256 and
// v = round(x/dx), held as two int8 planes v = 128*hi + lo (|hi| <= 127, |lo| <= 64), so the same
// integer dot products run twice and meet in int32 as 128*dot(q, hi) + dot(q, lo): each input keeps
// about 15 bits instead of 8, for about twice the multiply-adds (the weights are read once).
//
// A layer may fold its neighbours into the call, saving a pass over the activations and a Python
// op each: a prologue applied to each row before it is quantized (RMSNorm with its weight, or
// SwiGLU's silu(gate) * up) and a residual added to the output.
//
// Code paths by the instruction set the compiler targets (-march=native): AVX-512 VNNI, AVX2
// (maddubs, a block's eight products added in int16, one madd; 8-bit weights as two 4-bit halves so
// no 16-bit sum saturates), plain C++.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "vector_math.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using supercluster_kernels::to_float;

constexpr int64_t kBlock = 32;
constexpr int64_t kPanel = 16;

struct Activations {
  const int8_t* q;  // [M, planes, Kp]: a row's hi plane, then (16-bit) its lo plane
  const float* dx;  // [M, blocks]
  const float* sx;  // [M, blocks]
  int64_t Kp, blocks;
  int64_t row_bytes;  // planes * Kp
};

constexpr float kHiSteps = 127.f * 128.f;  // 16-bit activations: v = 128*hi + lo spans +-127*128

struct Panel {
  const uint8_t* q;   // this panel's first block
  const c10::Half* d;  // [blocks, 16]
  const c10::Half* m;
  int64_t block_bytes;  // 256 (4-bit) or 512 (8-bit)
};

#if defined(__AVX512F__) || defined(__AVX2__)
// How far ahead of the block being multiplied the kernel asks for weights. A decode step reads
// every weight once from memory, and with one row of x there are too few instructions per byte
// for the out-of-order window to keep enough loads in flight: with the hardware prefetchers alone
// the 49,152 x 576 8-bit head streamed at about 9 GB/s on one Zen 4 core, where a plain read
// reaches 30. Asking for the lines 4 KiB ahead (the next blocks of this panel, then the next
// panel's, which the same thread takes next) took it from 2.9 to 1.2 ms (1 to 8 KiB: the same
// within noise), and one stream's decode step from 13.7 to 8.9 ms (bench/serve.py).
constexpr int64_t kPrefetchBytes = 4096;

// always_inline: as a plain inline function, GCC 12 at -O3 emitted none of its prefetches (no
// prefetcht0 in the built library: check with objdump -d after changing this).
template <int Bits>
__attribute__((always_inline)) inline void prefetch_ahead(const uint8_t* q, const c10::Half* d, const c10::Half* m, int64_t b) {
  constexpr int kLines = Bits * kBlock * kPanel / 8 / 64;  // a block's weights: 4 (4-bit) or 8 lines
  // d and m: 32 bytes a block each, so a line every other block, asked for twice as many blocks ahead
  constexpr int64_t kScalesAhead = 2 * kPrefetchBytes / (64 * kLines) * kPanel * 2;
  const char* ahead = reinterpret_cast<const char*>(q) + kPrefetchBytes;
  for (int line = 0; line < kLines; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
  if (b % 2 == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(d) + kScalesAhead, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m) + kScalesAhead, _MM_HINT_T0);
  }
}
#endif

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// What a row of x goes through before it is quantized (see blocks_linear).
struct Prologue {
  const float* norm = nullptr;  // RMSNorm's weight [K]: x / rms(x) * norm
  float eps = 0.f;
  bool swiglu = false;  // x is [gate | up], 2K wide: silu(gate) * up
};

// Each row of x, after the prologue, as int8 blocks (one plane, or hi and lo planes for 16 bits):
// qx, with the block's scale dx and dx * sum(v) in sx.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, const Prologue& pro, int planes, int8_t* qx,
                   float* dx, float* sx) {
  const int64_t blocks = Kp / kBlock, width = pro.swiglu ? 2 * K : K;
  const float steps = planes == 2 ? kHiSteps : 127.f;
  supercluster_kernels::parallel_chunks(M, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(Kp, 0.f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * width;
      float* y = row.data();
      if (pro.swiglu) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) y[k] = xr[k] / (1.f + supercluster_kernels::exp_approx(-xr[k])) * xr[K + k];
      } else if (pro.norm != nullptr) {  // as torch's RMSNorm: x * rsqrt(mean(x^2) + eps) * weight
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t k = 0; k < K; ++k) squares += xr[k] * xr[k];
        const float inv = 1.f / std::sqrt(squares / static_cast<float>(K) + pro.eps);
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) y[k] = xr[k] * inv * pro.norm[k];
      } else {
        std::copy_n(xr, K, y);
      }
      int8_t* hi_row = qx + r * planes * Kp;
      int8_t* lo_row = hi_row + Kp;  // used with 2 planes only
      for (int64_t b = 0; b < blocks; ++b) {
        const float* yb = y + b * kBlock;  // zero beyond K
        float amax = 0.f;
        for (int64_t k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(yb[k]));
        const float inv = amax > 0.f ? steps / amax : 0.f;
        int8_t* hi = hi_row + b * kBlock;
        int sum = 0;
        if (planes == 2) {
          int8_t* lo = lo_row + b * kBlock;
          for (int64_t k = 0; k < kBlock; ++k) {
            const int v = static_cast<int>(std::nearbyint(yb[k] * inv));
            const int h = (v + 64) >> 7;  // floor((v + 64) / 128): lo = v - 128*h in -64..63
            hi[k] = static_cast<int8_t>(h);
            lo[k] = static_cast<int8_t>(v - 128 * h);
            sum += v;
          }
        } else {
          for (int64_t k = 0; k < kBlock; ++k) {
            const int v = static_cast<int>(std::nearbyint(yb[k] * inv));
            hi[k] = static_cast<int8_t>(v);
            sum += v;
          }
        }
        dx[r * blocks + b] = amax / steps;
        sx[r * blocks + b] = amax / steps * static_cast<float>(sum);
      }
    }
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)

constexpr int64_t kRowTile = 8;

// 16 features' integer dot products with 32 inputs of one activation plane
inline __m512i dot_block(const __m512i* wv, const int8_t* x) {
  __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();  // two chains for latency
  for (int c = 0; c < 8; c += 2) {
    even = _mm512_dpbusd_epi32(even, wv[c], _mm512_set1_epi32(four_bytes(x + 4 * c)));
    odd = _mm512_dpbusd_epi32(odd, wv[c + 1], _mm512_set1_epi32(four_bytes(x + 4 * c + 4)));
  }
  return _mm512_add_epi32(even, odd);
}

template <int Bits, int Planes>
void panel_rows(const Panel& w, const Activations& a, int64_t r0, int64_t rows, float* out, int64_t stride) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[kRowTile];
  for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint8_t* q = w.q + b * w.block_bytes;
    prefetch_ahead<Bits>(q, w.d + b * kPanel, w.m + b * kPanel, b);
    __m512i wv[8];  // inputs 4c..4c+3 of the block for the 16 features
    if constexpr (Bits == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(q + 64 * c);
        wv[2 * c] = _mm512_and_si512(v, low);
        wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int c = 0; c < 8; ++c) wv[c] = _mm512_loadu_si512(q + 64 * c);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.d + b * kPanel)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.m + b * kPanel)));
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* x = a.q + (r0 + r) * a.row_bytes + b * kBlock;
      __m512i sum = dot_block(wv, x);
      if constexpr (Planes == 2) sum = _mm512_add_epi32(_mm512_slli_epi32(sum, 7), dot_block(wv, x + a.Kp));
      const int64_t at = (r0 + r) * a.blocks + b;
      const __m512 dot = _mm512_cvtepi32_ps(sum);
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(a.dx[at])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.sx[at]), acc[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(out + (r0 + r) * stride, acc[r]);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

constexpr int64_t kRowTile = 4;

// 8 features' sums over one block (32 inputs) of one activation plane: maddubs multiplies 4-bit
// weights (0..15) by int8 activations (|x| <= 127) into pairs of at most 2*15*127 = 3810, so the
// eight chunks' pairs add up in int16 (at most 30480 < 2^15, never saturating) and one madd
// widens them to int32.
inline __m256i block_sums(const __m256i* wv, const int8_t* x, __m256i weight) {
  __m256i s = _mm256_maddubs_epi16(wv[0], _mm256_set1_epi32(four_bytes(x)));
  for (int c = 1; c < 8; ++c) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[c], _mm256_set1_epi32(four_bytes(x + 4 * c))));
  return _mm256_madd_epi16(s, weight);
}

// Half a panel (8 features, h = 0 or 1) at a time: a block's weights are unpacked into registers
// once and every row of the tile meets them (a row's float sums run over the blocks in order, as
// one row alone would run them). 8-bit weights (q = 16*hi + lo) go as two 4-bit halves.
template <int Bits, int Planes>
void panel_rows(const Panel& w, const Activations& a, int64_t r0, int64_t rows, float* out, int64_t stride) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  for (int h = 0; h < 2; ++h) {  // features 0-7, 8-15
    __m256 acc[kRowTile];
    for (int64_t r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.blocks; ++b) {
      const uint8_t* q = w.q + b * w.block_bytes;
      if (h == 0) prefetch_ahead<Bits>(q, w.d + b * kPanel, w.m + b * kPanel, b);  // the second half reads the panel again, from L1
      __m256i wv[Bits == 4 ? 8 : 16];  // inputs 4c..4c+3 of the block for the 8 features (8-bit: hi nibbles, then lo)
      if constexpr (Bits == 4) {
        for (int c = 0; c < 4; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * c + 32 * h));
          wv[2 * c] = _mm256_and_si256(v, low);
          wv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
      } else {
        for (int c = 0; c < 8; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * c + 32 * h));
          wv[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          wv[8 + c] = _mm256_and_si256(v, low);
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.d + b * kPanel + 8 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + b * kPanel + 8 * h)));
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* x0 = a.q + (r0 + r) * a.row_bytes + b * kBlock;
        const int64_t at = (r0 + r) * a.blocks + b;
        __m256i sum = _mm256_setzero_si256();
        for (int p = 0; p < Planes; ++p) {
          const int8_t* x = x0 + p * a.Kp;
          if (p == 1) sum = _mm256_slli_epi32(sum, 7);  // the hi plane's sums count 128 each
          if constexpr (Bits == 4) {
            sum = _mm256_add_epi32(sum, block_sums(wv, x, ones));
          } else {
            sum = _mm256_add_epi32(sum, block_sums(wv, x, sixteen));
            sum = _mm256_add_epi32(sum, block_sums(wv + 8, x, ones));
          }
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, _mm256_set1_ps(a.dx[at])), acc[r]);
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.sx[at]), acc[r]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) _mm256_storeu_ps(out + (r0 + r) * stride + 8 * h, acc[r]);
  }
}

#else

constexpr int64_t kRowTile = 4;

template <int Bits, int Planes>
void panel_rows(const Panel& w, const Activations& a, int64_t r0, int64_t rows, float* out, int64_t stride) {
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float acc[kPanel] = {};
    for (int64_t b = 0; b < a.blocks; ++b) {
      const uint8_t* q = w.q + b * w.block_bytes;
      const int8_t* x = a.q + r * a.row_bytes + b * kBlock;
      const int64_t at = r * a.blocks + b;
      for (int64_t n = 0; n < kPanel; ++n) {
        int32_t dot = 0;
        for (int k = 0; k < kBlock; ++k) {
          const int c = k / 4, j = k % 4;
          const int v = Bits == 4 ? (q[64 * (c / 2) + 4 * n + j] >> (4 * (c % 2))) & 0x0F : q[64 * c + 4 * n + j];
          dot += v * (Planes == 2 ? 128 * x[k] + x[a.Kp + k] : x[k]);
        }
        acc[n] += to_float(w.d[b * kPanel + n]) * a.dx[at] * static_cast<float>(dot) + to_float(w.m[b * kPanel + n]) * a.sx[at];
      }
    }
    std::copy_n(acc, kPanel, out + r * stride);
  }
}

#endif

}  // namespace

namespace supercluster_kernels {
inline namespace KERNELS_LIBRARY {

at::Tensor blocks_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& d, const at::Tensor& m,
                         int64_t bits, int64_t out_features, const c10::optional<at::Tensor>& norm, double eps,
                         bool swiglu, const c10::optional<at::Tensor>& residual, int64_t activation_bits) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "blocks_linear takes fp32 CPU activations");
  TORCH_CHECK(bits == 4 || bits == 8, "blocks_linear: 4- or 8-bit weights");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16, "blocks_linear: 8- or 16-bit activations");
  const int planes = activation_bits == 16 ? 2 : 1;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "qweight: uint8, panel-major");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.is_contiguous() && m.is_contiguous() &&
              d.dim() == 3 && d.size(2) == kPanel && m.sizes() == d.sizes(), "d, m: half [panels, blocks, 16]");
  const int64_t panels = d.size(0), blocks = d.size(1), Kp = blocks * kBlock, Np = panels * kPanel;
  const int64_t block_bytes = bits * kBlock * kPanel / 8;
  TORCH_CHECK(qweight.numel() == panels * blocks * block_bytes, "blocks_linear: qweight does not match d");
  TORCH_CHECK(out_features <= Np && out_features > Np - kPanel, "blocks_linear: out_features does not match the panels");
  const int64_t K = swiglu ? x.size(-1) / 2 : x.size(-1);
  TORCH_CHECK(!swiglu || x.size(-1) == 2 * K, "blocks_linear: swiglu takes [gate | up], an even width");
  TORCH_CHECK(!(swiglu && norm.has_value()), "blocks_linear: a norm or swiglu, not both");
  Prologue pro;
  pro.swiglu = swiglu;
  if (norm.has_value()) {
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == K, "blocks_linear: norm is fp32 [in_features]");
    pro.norm = norm->data_ptr<float>();
    pro.eps = static_cast<float>(eps);
  }
  TORCH_CHECK(K <= Kp && K > Kp - kBlock, "blocks_linear: x has ", K, " features, the weight ", Kp, " (padded)");
  const at::Tensor rows = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t M = rows.size(0);

  at::Tensor qx = at::empty({M, planes * Kp}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({M, blocks}, x.options());
  at::Tensor sx = at::empty({M, blocks}, x.options());
  quantize_rows(rows.data_ptr<float>(), M, K, Kp, pro, planes, qx.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>());
  const Activations act{qx.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), Kp, blocks, planes * Kp};

  at::Tensor y = at::empty({M, Np}, x.options());
  float* out = y.data_ptr<float>();
  const uint8_t* wq = qweight.data_ptr<uint8_t>();
  const c10::Half* wd = d.data_ptr<c10::Half>();
  const c10::Half* wm = m.data_ptr<c10::Half>();
  // a few panels a chunk: enough chunks to balance two to a few threads, few enough to cost nothing
  supercluster_kernels::parallel_chunks(panels, std::max<int64_t>(1, panels / 32), [&](int64_t p0, int64_t p1) {
    // panel outside, row tiles inside: a panel's weights stay in L1 while every row of x meets them
    for (int64_t p = p0; p < p1; ++p) {
      const Panel w{wq + p * blocks * block_bytes, wd + p * blocks * kPanel, wm + p * blocks * kPanel, block_bytes};
      for (int64_t r0 = 0; r0 < M; r0 += kRowTile) {
        const int64_t tile = std::min(kRowTile, M - r0);
        float* o = out + p * kPanel;
        if (planes == 2) {
          if (bits == 4) panel_rows<4, 2>(w, act, r0, tile, o, Np);
          else panel_rows<8, 2>(w, act, r0, tile, o, Np);
        } else {
          if (bits == 4) panel_rows<4, 1>(w, act, r0, tile, o, Np);
          else panel_rows<8, 1>(w, act, r0, tile, o, Np);
        }
      }
    }
  });
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  if (out_features != Np) y = y.narrow(1, 0, out_features).contiguous();
  y = y.view(out_shape);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat, "blocks_linear: residual is fp32 shaped as the output");
    y.add_(*residual);
  }
  return y;
}

}  // namespace KERNELS_LIBRARY
}  // namespace supercluster_kernels

// The ops' namespace comes from the build (-DKERNELS_LIBRARY=...), so builds for other instruction
// sets (the tests load each code path) register side by side; a second macro level expands it.
#define REGISTER_BLOCKS(ns) TORCH_LIBRARY_FRAGMENT(ns, m)
REGISTER_BLOCKS(KERNELS_LIBRARY) {
  m.def("linear(Tensor x, Tensor qweight, Tensor d, Tensor m, int bits, int out_features, Tensor? norm=None, "
        "float eps=0., bool swiglu=False, Tensor? residual=None, int activation_bits=8) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(supercluster_kernels::blocks_linear));
}
