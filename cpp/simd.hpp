// Portable SIMD vectors (GCC/Clang vector extensions) whose width follows the ISA build:
//   RA_ISA_avx512 -> 64 bytes, RA_ISA_avx2 -> 32 bytes, generic -> 16 bytes (SSE2 / NEON baseline).
// The same source is compiled once per ISA (CMakeLists.txt), so the helpers below become
// AVX-512, AVX2 or SSE code without intrinsics.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ringattn {
namespace RA_ISA {

#if defined(RA_ISA_avx512)
constexpr int kVecBytes = 64;
constexpr int kRegs = 32;  // vector registers: decides the micro-kernel shape in gemm.hpp
#elif defined(RA_ISA_avx2)
constexpr int kVecBytes = 32;
constexpr int kRegs = 16;
#else
constexpr int kVecBytes = 16;
constexpr int kRegs = 16;
#endif

template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 4;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
};

// Unaligned load / store / broadcast (memcpy compiles to one vmovups).
template <class T>
inline typename Vec<T>::V load(const T* p) {
  typename Vec<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class T>
inline void store(T* p, typename Vec<T>::V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <class T>
inline typename Vec<T>::V splat(T x) {
  // x - 0 is exactly x for every x (also -0.0), so this folds to one vbroadcastss/sd; V{} + x
  // would keep a scalar add (0 + -0 = +0), and a lane-by-lane fill compiles to masked inserts.
  return x - typename Vec<T>::V{};
}

template <class V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// 2^x for float vectors: x = n + f, n = round(x), |f| <= 1/2; 2^f by its Taylor polynomial of
// degree 7 in f*ln2 (relative error < 1e-8, below float rounding); 2^n built in the exponent bits.
// x < -126 (including -inf, the masked scores) gives exactly 0; the result is never subnormal.
inline Vec<float>::V exp2v(Vec<float>::V x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const V lo = splat(-126.0f), hi = splat(127.0f);
  const I dead = x < lo;                           // lanes that underflow (or are -inf)
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V n = (xc + 12582912.0f) - 12582912.0f;    // round to nearest integer (1.5 * 2^23 trick)
  const V f = xc - n;
  V p = splat(1.525273380405984e-05f);             // ln2^k / k!, k = 7 .. 0
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const V r = p * scale;
  I ri;
  std::memcpy(&ri, &r, sizeof(ri));
  ri &= ~dead;
  V out;
  std::memcpy(&out, &ri, sizeof(out));
  return out;
}

// x[i] = 2^x[i] for i < n, n a multiple of the vector width (float: vector; double: std::exp2,
// because float64 is the exactness path and 1e-12 needs the library's accuracy).
inline void exp2_inplace(float* x, int64_t n) {
  constexpr int W = Vec<float>::W;
  for (int64_t i = 0; i < n; i += W) store(x + i, exp2v(load(x + i)));
}
inline void exp2_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp2(x[i]);
}

// 2^x lane by lane: float uses the polynomial above, double calls std::exp2 per lane.
inline Vec<float>::V exp2vec(Vec<float>::V x) { return exp2v(x); }
inline Vec<double>::V exp2vec(Vec<double>::V x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = std::exp2(x[i]);
  return x;
}

}  // namespace RA_ISA
}  // namespace ringattn
