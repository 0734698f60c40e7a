// The optimizer's passes over the flat parameter buffers (compiled once per ISA, see
// CMakeLists.txt). Reference: backends/xp_fused.py adamw_update / sum_squares (optim.py's arithmetic).
//
// adamw_update: one pass over p, m, v, g (elementwise, in the parameters' dtype):
//   g' = g * grad_scale; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
//   p *= 1 - lr wd;  p -= (lr / c1) * m / (sqrt(v / c2) + eps)
//   Threads take contiguous ranges; every element's result is independent of the split.
// sum_squares: double sums over fixed blocks of kSumBlock elements (any thread may take a block),
//   then the block sums added in order: the same bits for any thread count.
#include <vector>

#include <cmath>

#include "kernels.hpp"
#include "parallel.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

template <class T>
void update(const AdamWParams& q) {
  T* p = static_cast<T*>(q.p);
  const T* g = static_cast<const T*>(q.g);
  T* m = static_cast<T*>(q.m);
  T* v = static_cast<T*>(q.v);
  const T gs = T(q.grad_scale), b1 = T(q.beta1), b2 = T(q.beta2), ob1 = T(1.0 - q.beta1), ob2 = T(1.0 - q.beta2);
  const T decay = T(1.0 - q.lr * q.weight_decay), step = T(q.lr / q.c1), inv_c2 = T(1.0 / q.c2), eps = T(q.eps);
  const int nt = threads_for(q.n * 4);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    share(q.n, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const T gi = g[i] * gs;
      const T mi = b1 * m[i] + ob1 * gi;
      const T vi = b2 * v[i] + ob2 * (gi * gi);
      m[i] = mi;
      v[i] = vi;
      p[i] = p[i] * decay - step * mi / (std::sqrt(vi * inv_c2) + eps);
    }
  }
}

constexpr int64_t kSumBlock = 8192;

template <class T>
void sumsq(SumSquaresParams& q) {
  const T* a = static_cast<const T*>(q.a);
  const int64_t blocks = (q.n + kSumBlock - 1) / kSumBlock;
  std::vector<double> part(size_t(blocks), 0.0);
  const int nt = threads_for(q.n);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t lo = k * kSumBlock, hi = std::min(q.n, lo + kSumBlock);
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = lo; i < hi; ++i) s += double(a[i]) * double(a[i]);
    part[size_t(k)] = s;
  }
  double s = 0;
  for (double x : part) s += x;
  q.result = s;
}

}  // namespace

void adamw_update(const AdamWParams& p) {
  if (p.dtype == DType::f32) update<float>(p); else update<double>(p);
}

void sum_squares(SumSquaresParams& p) {
  if (p.dtype == DType::f32) sumsq<float>(p); else sumsq<double>(p);
}

}  // namespace RA_ISA
}  // namespace ringattn
