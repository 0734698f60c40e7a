// Small dense matrix product used by every blockwise kernel (attention and FFN):
//   C[m x n] (+)= A[m x k] * B[k x n]
// A element (i, p) is a[i * ars + p * acs] (any strides: lets callers use A or A^T without a copy);
// B rows are contiguous with row stride ldb; C rows are contiguous with row stride ldc.
// Included by the ISA-specific translation units, so it is compiled once per ISA.
#pragma once
#include <cstdint>

namespace ringattn {
namespace RA_ISA {

template <class T>
inline void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t ars, int64_t acs,
                 const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  // Reference form (the compiler vectorises the j loop); replaced by register-blocked tiles.
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < n; ++j) ci[j] = T(0);
    for (int64_t p = 0; p < k; ++p) {
      const T aip = a[i * ars + p * acs];
      const T* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

}  // namespace RA_ISA
}  // namespace ringattn
