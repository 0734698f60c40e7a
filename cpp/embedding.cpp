// Embedding gradient (compiled once per ISA, see CMakeLists.txt). Reference: backends/xp_fused.py
// (dw = 0, then np.add.at(dw, ids, dy)).
//
//   dw[v, :] = sum over tokens t with ids[t] == v of dy[t, :]   (overwritten; unseen ids give 0 rows)
//
// Threads split the WIDTH (in blocks of kCols columns), not the tokens or the vocabulary: every
// thread walks all tokens in order and adds its columns of each dy row into its columns of dw, so
// no two threads write the same element (no atomics, no per-thread copies of dw to reduce), the
// work is even however skewed the ids are, and each element is the same sum in the same token order
// for any thread count. Sums run in double (float32 inputs: in a per-thread scratch of
// vocab x its columns, converted once at the end), since a frequent id sums thousands of rows.
#include <algorithm>
#include <vector>

#include "kernels.hpp"
#include "parallel.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

constexpr int64_t kCols = 16;  // one 64-byte line of float32: threads never share a cache line of dw

// Scratch of the calling thread that only grows (same shapes every step: no allocation after the first).
double* scratch(size_t n) {
  thread_local std::vector<double> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Columns [c0, c1) of dw for all tokens. acc: vocab x (c1 - c0) doubles with row stride lda.
template <class T>
void columns(const EmbeddingParams& p, int64_t c0, int64_t c1, double* acc, int64_t lda) {
  const int64_t w = p.width, nc = c1 - c0;
  for (int64_t v = 0; v < p.vocab; ++v) std::fill(acc + v * lda, acc + v * lda + nc, 0.0);
  const T* dy = static_cast<const T*>(p.dy);
  for (int64_t t = 0; t < p.rows; ++t) {
    double* a = acc + p.ids[t] * lda;
    const T* d = dy + t * w + c0;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) a[j] += double(d[j]);
  }
}

template <class T>
void backward(const EmbeddingParams& p) {
  const int64_t w = p.width;
  const int64_t blocks = (w + kCols - 1) / kCols;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads_for(p.rows * w), blocks)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    share(blocks, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    const int64_t c0 = std::min(w, lo * kCols), c1 = std::min(w, hi * kCols);
    T* dw = static_cast<T*>(p.dw);
    if constexpr (sizeof(T) == sizeof(double)) {
      columns<T>(p, c0, c1, reinterpret_cast<double*>(dw) + c0, w);  // accumulate in dw itself
    } else if (c1 > c0) {
      const int64_t nc = c1 - c0;
      double* acc = scratch(size_t(p.vocab * nc));
      columns<T>(p, c0, c1, acc, nc);
      for (int64_t v = 0; v < p.vocab; ++v)
        for (int64_t j = 0; j < nc; ++j) dw[v * w + c0 + j] = T(acc[v * nc + j]);
    }
  }
}

}  // namespace

void embedding_backward(const EmbeddingParams& p) {
  if (p.dtype == DType::f32) backward<float>(p); else backward<double>(p);
}

}  // namespace RA_ISA
}  // namespace ringattn
