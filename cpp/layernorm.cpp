// LayerNorm forward (with the residual add fused) and backward, over rows of a (rows, width)
// array (compiled once per ISA, see CMakeLists.txt). Reference: backends/xp_fused.py.
//
// Forward, per row: x += add (when given, in place), mean = sum x / w, var = sum (x - mean)^2 / w
//   (two passes: no cancellation), rstd = 1 / sqrt(var + eps), y = (x - mean) * rstd * g + b.
//   Sums run in double; rows are independent, so threads take contiguous row ranges and the result
//   does not depend on the thread count.
// Backward, per row: xhat = (x - mean) rstd, dxhat = dy g,
//   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))   (overwritten, or += into the residual)
//   dg = sum_rows dy xhat, db = sum_rows dy: per-thread double accumulators over the thread's rows,
//   summed in thread order after the parallel region (no atomics, no barrier per row).
#include <cmath>
#include <vector>

#include "kernels.hpp"
#include "parallel.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

template <class T>
void forward_rows(const LayerNormParams& p, int64_t r0, int64_t r1) {
  const int64_t w = p.width;
  const T* g = static_cast<const T*>(p.g);
  const T* b = static_cast<const T*>(p.b);
  for (int64_t r = r0; r < r1; ++r) {
    T* x = static_cast<T*>(p.x) + r * w;
    if (p.add) {
      const T* a = static_cast<const T*>(p.add) + r * w;
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) x[i] += a[i];
    }
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < w; ++i) s += double(x[i]);
    const double mu = s / double(w);
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < w; ++i) {
      const double d = double(x[i]) - mu;
      ss += d * d;
    }
    const T rstd = T(1.0 / std::sqrt(ss / double(w) + p.eps));
    const T mean = T(mu);
    T* y = static_cast<T*>(p.y) + r * w;
#pragma omp simd
    for (int64_t i = 0; i < w; ++i) y[i] = (x[i] - mean) * rstd * g[i] + b[i];
    static_cast<T*>(p.mean)[r] = mean;
    static_cast<T*>(p.rstd)[r] = rstd;
  }
}

template <class T>
void forward(const LayerNormParams& p) {
  const int nt = threads_for(p.rows * p.width);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    share(p.rows, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    forward_rows<T>(p, lo, hi);
  }
}

// Rows [r0, r1): dx, and dy * xhat, dy added into the (w) double accumulators dg, db.
template <class T>
void backward_rows(const LayerNormParams& p, int64_t r0, int64_t r1, double* dg, double* db) {
  const int64_t w = p.width;
  const T* g = static_cast<const T*>(p.g);
  const T inv_w = T(1.0 / double(w));
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * w;
    const T* dy = static_cast<const T*>(p.dy) + r * w;
    const T mean = static_cast<const T*>(p.mean)[r], rstd = static_cast<const T*>(p.rstd)[r];
    double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < w; ++i) {
      const T xhat = (x[i] - mean) * rstd;
      const T dxhat = dy[i] * g[i];
      s1 += double(dxhat);
      s2 += double(dxhat * xhat);
      dg[i] += double(dy[i] * xhat);
      db[i] += double(dy[i]);
    }
    const T m1 = T(s1) * inv_w, m2 = T(s2) * inv_w;
    T* dx = static_cast<T*>(p.dx) + r * w;
    if (p.accumulate) {
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) dx[i] += rstd * (dy[i] * g[i] - m1 - (x[i] - mean) * rstd * m2);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) dx[i] = rstd * (dy[i] * g[i] - m1 - (x[i] - mean) * rstd * m2);
    }
  }
}

template <class T>
void backward(const LayerNormParams& p) {
  const int64_t w = p.width;
  const int nt = threads_for(p.rows * w);
  std::vector<double> acc(size_t(2 * w * nt), 0.0);  // per thread: dg | db
  int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    if (t == 0) used = omp_get_num_threads();  // no `single`: its barrier costs a time slice when oversubscribed
    int64_t lo, hi;
    share(p.rows, t, omp_get_num_threads(), lo, hi);
    double* mine = acc.data() + 2 * w * t;
    backward_rows<T>(p, lo, hi, mine, mine + w);
  }
  T* dg = static_cast<T*>(p.dg);
  T* db = static_cast<T*>(p.db);
  for (int64_t i = 0; i < w; ++i) {
    double sg = 0, sb = 0;
    for (int t = 0; t < used; ++t) {
      sg += acc[size_t(2 * w * t + i)];
      sb += acc[size_t(2 * w * t + w + i)];
    }
    dg[i] = T(sg);
    db[i] = T(sb);
  }
}

}  // namespace

void layernorm_forward(const LayerNormParams& p) {
  if (p.dtype == DType::f32) forward<float>(p); else forward<double>(p);
}

void layernorm_backward(const LayerNormParams& p) {
  if (p.dtype == DType::f32) backward<float>(p); else backward<double>(p);
}

}  // namespace RA_ISA
}  // namespace ringattn
