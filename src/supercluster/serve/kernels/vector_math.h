// Vector math for the kernels.
//
// - exp_approx: an exponential the compiler vectorizes (a loop over it runs in SIMD registers at
//   -O3, where std::exp is one scalar library call per element, the bulk of a softmax over a long
//   context or of SiLU over a feed-forward row).
// - Vec: one SIMD register of floats for the CPU the build targets (16 lanes with AVX-512, 8 with
//   AVX2, 1 in portable C++), loading and storing fp32 or fp16 (the KV cache's element types).
// - dot: a . b, with the lanes summed in a tree (the compiler's own vectorized sum ends in a
//   chain of scalar adds, which costs more than the products for a head's 64 or 128 dimensions).
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace supercluster_kernels {

// e^x within 2e-7 relative error for x in [-87, 88] (clamped outside): 2^(x log2 e) split into an
// integer power n, set in the exponent bits, and a fraction f in [-1/2, 1/2], a degree-6 Taylor
// polynomial of e^(f ln 2).
inline float exp_approx(float x) {
  const float t = std::min(std::max(x, -87.f), 88.f) * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23 drops the fraction
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // c10::Half converts in software
#else
  return static_cast<float>(h);
#endif
}

#if defined(__AVX512F__)

struct Vec {
  static constexpr int width = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(c10::Half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  float sum() const { return _mm512_reduce_add_ps(v); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
};

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

struct Vec {
  static constexpr int width = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(c10::Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  float sum() const {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
};

#else

struct Vec {
  static constexpr int width = 1;
  float v;
  static Vec zero() { return {0.f}; }
  static Vec broadcast(float x) { return {x}; }
  static Vec load(const float* p) { return {*p}; }
  static Vec load(const c10::Half* p) { return {static_cast<float>(*p)}; }
  void store(float* p) const { *p = v; }
  void store(c10::Half* p) const { *p = c10::Half(v); }
  float sum() const { return v; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  friend Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
};

#endif

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  constexpr int W = Vec::width;
  Vec sum0 = Vec::zero(), sum1 = Vec::zero();  // two chains, for the adds' latency
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    sum0 = fmadd(Vec::load(a + i), Vec::load(b + i), sum0);
    sum1 = fmadd(Vec::load(a + i + W), Vec::load(b + i + W), sum1);
  }
  for (; i + W <= n; i += W) sum0 = fmadd(Vec::load(a + i), Vec::load(b + i), sum0);
  float acc = (sum0 + sum1).sum();
  for (; i < n; ++i) acc += a[i] * to_float(b[i]);
  return acc;
}

// dst = src, converted to dst's element type
template <typename T>
inline void store(const float* src, T* dst, int64_t n) {
  constexpr int W = Vec::width;
  int64_t i = 0;
  for (; i + W <= n; i += W) Vec::load(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace supercluster_kernels
