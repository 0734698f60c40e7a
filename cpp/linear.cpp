// Linear layer y = x w + b on the project's GEMM (gemm.hpp), forward and backward (compiled once
// per ISA, see CMakeLists.txt). Reference: layers.Linear (x @ w + b; dx = dy w^T, dw = x^T dy,
// db = colsum dy).
//   x (rows, in), w (in, out), b (out,), y / dy (rows, out), dx (rows, in); all C-contiguous.
// Rows are split into chunks of kRows; threads take contiguous chunk ranges.
//   forward: y = b broadcast, then y += x w (per chunk).
//   backward: dx = dy w^T (w^T packed once, so the GEMM reads contiguous rows); dw, db summed per
//   thread over its rows into its own accumulators, then over threads in thread order (db in double).
#include <algorithm>
#include <vector>

#include "gemm.hpp"
#include "kernels.hpp"
#include "parallel.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

constexpr int64_t kRows = 256;

// Scratch of the calling thread that only grows: the backward runs every step with the same
// shapes, so after the first step it allocates (and page-faults) nothing.
template <class T>
T* scratch(int slot, size_t n) {
  thread_local std::vector<T> bufs[2];
  if (bufs[slot].size() < n) bufs[slot].resize(n);
  return bufs[slot].data();
}

template <class T>
void forward(const LinearParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* b = static_cast<const T*>(p.b);
  T* y = static_cast<T*>(p.y);
  const int64_t K = p.in, N = p.out;
  const int nt = threads_for(p.rows * (K + N) * 4);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    share(p.rows, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    for (int64_t r0 = lo; r0 < hi; r0 += kRows) {
      const int64_t n = std::min(kRows, hi - r0);
      for (int64_t r = r0; r < r0 + n; ++r) std::copy(b, b + N, y + r * N);
      gemm<T>(n, N, K, x + r0 * K, K, 1, w, N, y + r0 * N, N, true);
    }
  }
}

template <class T>
void backward(const LinearParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* dy = static_cast<const T*>(p.dy);
  const int64_t K = p.in, N = p.out;
  T* const wt = scratch<T>(0, size_t(N * K));  // w^T (out, in)
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < N; ++j) wt[j * K + i] = w[i * N + j];
  const int nt = threads_for(p.rows * (K + N) * 8);
  T* const dw_acc = scratch<T>(1, size_t(K * N) * size_t(nt));
  std::fill(dw_acc, dw_acc + size_t(K * N) * size_t(nt), T(0));
  std::vector<double> db_acc(size_t(N) * size_t(nt), 0.0);  // small: from the heap, no page faults
  int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    if (t == 0) used = omp_get_num_threads();
    int64_t lo, hi;
    share(p.rows, t, omp_get_num_threads(), lo, hi);
    T* dw = dw_acc + size_t(K * N) * size_t(t);
    double* db = db_acc.data() + size_t(N) * size_t(t);
    for (int64_t r0 = lo; r0 < hi; r0 += kRows) {
      const int64_t n = std::min(kRows, hi - r0);
      if (p.dx) gemm<T>(n, K, N, dy + r0 * N, N, 1, wt, K, static_cast<T*>(p.dx) + r0 * K, K, false);
      gemm<T>(K, N, n, x + r0 * K, 1, K, dy + r0 * N, N, dw, N, true);  // dw += x^T dy
      for (int64_t r = r0; r < r0 + n; ++r)
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) db[j] += double(dy[r * N + j]);
    }
  }
  T* dw = static_cast<T*>(p.dw);
  T* db = static_cast<T*>(p.db);
  for (int64_t i = 0; i < K * N; ++i) {
    T s = dw_acc[i];
    for (int t = 1; t < used; ++t) s += dw_acc[size_t(K * N) * size_t(t) + size_t(i)];
    dw[i] = s;
  }
  for (int64_t j = 0; j < N; ++j) {
    double s = 0;
    for (int t = 0; t < used; ++t) s += db_acc[size_t(N) * size_t(t) + size_t(j)];
    db[j] = T(s);
  }
}

}  // namespace

void linear_forward(const LinearParams& p) {
  if (p.dtype == DType::f32) forward<float>(p); else forward<double>(p);
}

void linear_backward(const LinearParams& p) {
  if (p.dtype == DType::f32) backward<float>(p); else backward<double>(p);
}

}  // namespace RA_ISA
}  // namespace ringattn
