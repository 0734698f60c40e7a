// Softmax cross-entropy of the loss heads with its gradient (compiled once per ISA, see
// CMakeLists.txt). Reference: backends/xp_fused.py softmax_xent.
//
// Per row z (classes wide), label l: m = max z, e_j = exp(z_j - m) (written into dlogits),
//   S = sum e_j, loss += log S - (z_l - m), dlogits_j = e_j * (scale / S), dlogits_l -= scale;
//   correct += (first index of the maximum == l), as numpy's argmax.
// Rows are independent: threads take contiguous row ranges; loss (double) and correct are
// summed per thread and then in thread order.
#include <cmath>
#include <vector>

#include "kernels.hpp"
#include "parallel.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

template <class T>
void rows(XentParams& p, int64_t r0, int64_t r1, double& loss, int64_t& correct) {
  const int64_t c = p.classes;
  for (int64_t r = r0; r < r1; ++r) {
    const T* z = static_cast<const T*>(p.logits) + r * c;
    T* d = static_cast<T*>(p.dlogits) + r * c;
    const int64_t l = p.labels[r];
    int64_t arg = 0;
    for (int64_t j = 1; j < c; ++j)
      if (z[j] > z[arg]) arg = j;
    const T m = z[arg];
    double s = 0;
    for (int64_t j = 0; j < c; ++j) {
      d[j] = std::exp(z[j] - m);
      s += double(d[j]);
    }
    loss += std::log(s) - double(z[l] - m);
    correct += arg == l;
    const T f = T(p.scale / s);
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) d[j] *= f;
    d[l] -= T(p.scale);
  }
}

template <class T>
void xent(XentParams& p) {
  const int nt = threads_for(p.rows * p.classes * 8);  // exp per element: heavier than a copy
  std::vector<double> loss(size_t(nt), 0.0);
  std::vector<int64_t> correct(size_t(nt), 0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    int64_t lo, hi;
    share(p.rows, t, omp_get_num_threads(), lo, hi);
    rows<T>(p, lo, hi, loss[size_t(t)], correct[size_t(t)]);
  }
  p.loss_sum = 0;
  p.correct = 0;
  for (int t = 0; t < nt; ++t) {
    p.loss_sum += loss[size_t(t)];
    p.correct += correct[size_t(t)];
  }
}

}  // namespace

void softmax_xent(XentParams& p) {
  if (p.dtype == DType::f32) xent<float>(p); else xent<double>(p);
}

}  // namespace RA_ISA
}  // namespace ringattn
