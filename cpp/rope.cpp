// RoPE in place on the q and k heads of a QKV projection (compiled once per ISA, see
// CMakeLists.txt). Reference: backends/xp_fused.py rope (the layout and pairing of layers.Rope).
//
// qkv is (batch, seq, (heads + 2 kv_heads) dim): per token the q heads, then the k heads, then the
// v heads, each `dim` wide. The first heads + kv_heads heads of every token are rotated, pair
// (x[i], x[i + dim/2]) by the angle of (cos, sin)[s, i]:
//   forward: (x1 c - x2 s, x1 s + x2 c);   inverse (the backward): (x1 c + x2 s, x2 c - x1 s).
// Tokens are independent: threads take contiguous token ranges.
#include "kernels.hpp"
#include "parallel.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

template <class T>
void rotate(const RopeParams& p) {
  const int64_t half = p.dim / 2, rotated = p.heads + p.kv_heads;
  const int64_t row = (p.heads + 2 * p.kv_heads) * p.dim;  // one token
  const int64_t tokens = p.batch * p.seq;
  const T sign = p.inverse ? T(-1) : T(1);
  const int nt = threads_for(tokens * rotated * p.dim);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    share(tokens, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t s = t % p.seq;
      const T* c = static_cast<const T*>(p.cos) + s * half;
      const T* sn = static_cast<const T*>(p.sin) + s * half;
      T* x = static_cast<T*>(p.qkv) + t * row;
      for (int64_t h = 0; h < rotated; ++h, x += p.dim) {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const T x1 = x[i], x2 = x[i + half], si = sign * sn[i];
          x[i] = x1 * c[i] - x2 * si;
          x[i + half] = x1 * si + x2 * c[i];
        }
      }
    }
  }
}

}  // namespace

void rope(const RopeParams& p) {
  if (p.dtype == DType::f32) rotate<float>(p); else rotate<double>(p);
}

}  // namespace RA_ISA
}  // namespace ringattn
