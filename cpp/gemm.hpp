// Small dense matrix product used by every blockwise kernel (attention and FFN):
//   C[m x n] (+)= A[m x k] * B[k x n]
// A element (i, p) is a[i * ars + p * acs] (any strides: lets callers use A or A^T without a copy);
// B rows are contiguous with row stride ldb; C rows are contiguous with row stride ldc.
// Included by the ISA-specific translation units, so it is compiled once per ISA.
//
// Register-blocked: a micro-kernel keeps an MR x (NV vectors) tile of C in registers and, for each
// p, loads NV vectors of B's row p and broadcasts MR elements of A's column p (MR * NV FMAs per
// MR + NV loads). AVX-512 (32 registers): 6 x 4 vectors = 24 accumulators; 16-register ISAs:
// 6 x 2. Edges: fewer rows -> the same kernel with smaller MR; fewer whole vectors -> smaller NV;
// the last n % W columns -> a scalar loop. No packing: the blocks the attention kernel passes are
// small enough to stay in L1/L2, and B rows are already contiguous.
#pragma once
#include <cstdint>

#include "simd.hpp"

namespace ringattn {
namespace RA_ISA {

constexpr int kGemmMR = 6;
constexpr int kGemmNV = kRegs >= 32 ? 4 : 2;

template <class T, int MR, int NV>
inline void gemm_tile(int64_t k, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c,
                      int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? load(c + i * ldc + v * W) : V{};
  for (int64_t p = 0; p < k; ++p) {
    const T* bp = b + p * ldb;
    const T* ap = a + p * acs;
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load(bp + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V ai = splat(ap[i * ars]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(c + i * ldc + v * W, acc[i][v]);
}

// All rows of one column panel of NV vectors.
template <class T, int NV>
inline void gemm_panel(int64_t m, int64_t k, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb,
                       T* c, int64_t ldc, bool accumulate) {
  constexpr int MR = kGemmMR;
  int64_t i = 0;
  for (; i + MR <= m; i += MR) gemm_tile<T, MR, NV>(k, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
  const T* ai = a + i * ars;
  T* ci = c + i * ldc;
  switch (m - i) {
    case 5: gemm_tile<T, 5, NV>(k, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;
    case 4: gemm_tile<T, 4, NV>(k, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;
    case 3: gemm_tile<T, 3, NV>(k, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;
    case 2: gemm_tile<T, 2, NV>(k, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;
    case 1: gemm_tile<T, 1, NV>(k, ai, ars, acs, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
  static_assert(kGemmMR == 6, "the switch above covers remainders of 6-row tiles");
}

template <class T>
inline void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t ars, int64_t acs,
                 const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::W;
  constexpr int NV = kGemmNV;
  int64_t j = 0;
  for (; j + NV * W <= n; j += NV * W) gemm_panel<T, NV>(m, k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  // Remaining whole vectors (fewer than NV).
  const int64_t nv = (n - j) / W;
  if (nv >= 3 && NV > 3) {
    gemm_panel<T, 3>(m, k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
    j += 3 * W;
  } else if (nv == 2 && NV > 2) {
    gemm_panel<T, 2>(m, k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
    j += 2 * W;
  } else if (nv >= 1) {
    gemm_panel<T, 1>(m, k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
    j += W;
  }
  // nv == 3 with NV == 4 is handled above; with NV == 2 at most one vector is left (nv < 2).
  if (j == n) return;
  // Scalar columns (n % W of them).
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t jj = j; jj < n; ++jj) {
      T s = accumulate ? ci[jj] : T(0);
      for (int64_t p = 0; p < k; ++p) s += a[i * ars + p * acs] * b[p * ldb + jj];
      ci[jj] = s;
    }
  }
}

}  // namespace RA_ISA
}  // namespace ringattn
