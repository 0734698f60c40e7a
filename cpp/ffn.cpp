// Blockwise feed-forward, forward and backward (compiled once per ISA, see CMakeLists.txt).
//
//   y = gelu(x @ w1 + b1) @ w2 + b2        gelu = tanh approximation
//
// Tokens are processed in chunks of at most p.chunk rows, so the (tokens x hidden) activation
// never exists for the whole input: scratch is O(chunk x hidden) per thread (+ weight-sized
// buffers in the backward: w^T and per-thread gradient accumulators).
//
// Forward: chunks are independent; threads take whole chunks, each with its own chunk x hidden
//   scratch. Every output row is computed by the same sequence of operations whatever the
//   thread count, so y does not depend on OMP_NUM_THREADS.
// Backward: the same chunking; each thread takes a contiguous range of chunks, recomputes the
//   chunk's pre-activation (pre = x w1 + b1), then dh = dy w2^T, dpre, dx, and adds the chunk's
//   weight gradients (h^T dy, x^T dpre) into its own weight-sized accumulators; one barrier at the
//   end, then a reduction over threads in thread order (no races, deterministic for a given thread
//   count; different thread counts only regroup the sums). No barrier per chunk: a barrier per chunk
//   costs a time slice whenever cores are oversubscribed (measured: 20x slower at load 20).
//   dx is overwritten; dw1, db1, dw2, db2 are accumulated (+=), or overwritten when
//   !p.accumulate (the thread reduction writes instead of adding); bias sums run in double.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.hpp"
#include "kernels.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

// ---- GELU without tanh -----------------------------------------------------------------------
// 0.5 * (1 + tanh(u)) = 1 / (1 + exp(-2u)) =: s, so gelu(x) = x * s with u = c (x + a x^3).
// This form has no cancellation (1 + tanh never subtracts), and exp below is a branch-free
// polynomial the compiler vectorises (std::tanh would be a scalar call per element, which costs
// more than the GEMMs at small widths).
//   d gelu / dx = s + x * 2 s (1 - s) du/dx,   1 - s = e s  with e = exp(-2u)   (again no cancellation)

template <class T>
struct Fp;
template <>
struct Fp<float> {
  using U = uint32_t;
  static constexpr int kMant = 23;
  static constexpr U kBias = 127;
  static constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kClamp = 80.0f;        // exp(+-80) is a normal float; s saturates long before
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
};
template <>
struct Fp<double> {
  using U = uint64_t;
  static constexpr int kMant = 52;
  static constexpr U kBias = 1023;
  static constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kClamp = 700.0;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
};

// exp(r) for |r| <= ln2/2 by its Taylor series (Horner). Truncation error r^(d+1)/(d+1)!:
// d = 8 -> 5e-10 (float), d = 13 -> 4e-18 (double); both below half an ulp.
template <class T>
inline T exp_reduced(T r) {
  constexpr int d = sizeof(T) == 4 ? 8 : 13;
  constexpr double inv_fact[14] = {1.0,
                                   1.0,
                                   1.0 / 2,
                                   1.0 / 6,
                                   1.0 / 24,
                                   1.0 / 120,
                                   1.0 / 720,
                                   1.0 / 5040,
                                   1.0 / 40320,
                                   1.0 / 362880,
                                   1.0 / 3628800,
                                   1.0 / 39916800,
                                   1.0 / 479001600,
                                   1.0 / 6227020800.0};
  T acc = T(inv_fact[d]);
  for (int i = d - 1; i >= 0; --i) acc = acc * r + T(inv_fact[i]);
  return acc;
}

// exp(z) for z clamped to [-kClamp, kClamp]: z = k ln2 + r, exp(z) = 2^k exp(r), 2^k built from bits.
template <class T>
inline T exp_clamped(T z) {
  using F = Fp<T>;
  using U = typename F::U;
  z = z < -F::kClamp ? -F::kClamp : z;
  z = z > F::kClamp ? F::kClamp : z;
  const T t = z * T(1.4426950408889634) + F::kShift;  // low mantissa bits of t hold k = round(z / ln2)
  const T k = t - F::kShift;
  const T r = (z - k * F::kLn2Hi) - k * F::kLn2Lo;  // two-part ln2: r is exact to an ulp
  U bits;
  std::memcpy(&bits, &t, sizeof(T));
  const U scale_bits = (bits + F::kBias) << F::kMant;  // the shift drops t's exponent: leaves (k + bias) << mant
  T scale;
  std::memcpy(&scale, &scale_bits, sizeof(T));
  return exp_reduced(r) * scale;
}

constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluA = 0.044715;

// v[i] = gelu(v[i])
template <class T>
void gelu_inplace(T* v, int64_t n) {
  const T c = T(kGeluC), a = T(kGeluA);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T x = v[i];
    const T e = exp_clamped(T(-2) * c * (x + a * x * x * x));
    v[i] = x / (T(1) + e);
  }
}

// On entry pre = x w1 + b1 and g = dL/dh; on exit pre = h = gelu(pre) and g = dL/dpre.
template <class T>
void gelu_backward_inplace(T* pre, T* g, int64_t n) {
  const T c = T(kGeluC), a = T(kGeluA);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T x = pre[i];
    const T e = exp_clamped(T(-2) * c * (x + a * x * x * x));
    const T s = T(1) / (T(1) + e);
    const T du = c * (T(1) + T(3) * a * x * x);
    pre[i] = x * s;
    g[i] *= s + T(2) * x * du * s * (e * s);  // e * s = 1 - s, kept as a product so it never underflows
  }
}

// ---- small helpers ---------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads worth using for `flops` of work between synchronisations: a barrier or a thread wake-up
// costs microseconds (milliseconds when cores are oversubscribed), so tiny pieces run on fewer threads.
inline int useful_threads(double flops) {
  constexpr double kMinFlopsPerThread = 2e6;
  const double t = std::max(1.0, flops / kMinFlopsPerThread);
  return static_cast<int>(std::min<double>(omp_get_max_threads(), t));
}

// rows x cols block with row stride ld, every row set to `bias`.
template <class T>
void fill_rows(T* dst, int64_t rows, int64_t cols, int64_t ld, const T* bias) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ld, bias, cols * sizeof(T));
}

// acc[j] += sum_i src[i * ld + j] for j < cols, in row order. Bias gradients are summed in double
// over all chunks and added to the output once: cheap next to the GEMMs, and a bias gradient is one
// long sum whose total can be much smaller than its terms.
template <class T>
void add_colsum(double* acc, const T* src, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<double>(s[j]);
  }
}

// dst (cols x rows) = src (rows x cols)^T, src row stride ld_src.
template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst) {
  constexpr int64_t B = 32;  // cache tile
#pragma omp for collapse(2) schedule(static)
  for (int64_t i0 = 0; i0 < rows; i0 += B)
    for (int64_t j0 = 0; j0 < cols; j0 += B)
      for (int64_t j = j0; j < std::min(cols, j0 + B); ++j)
        for (int64_t i = i0; i < std::min(rows, i0 + B); ++i) dst[j * rows + i] = src[i * ld_src + j];
}

// ---- forward ---------------------------------------------------------------------------------------
template <class T>
void forward(const FfnParams& p) {
  const int64_t N = p.tokens, C = p.width, H = p.hidden;
  if (N == 0) return;
  const T *X = static_cast<const T*>(p.x), *W1 = static_cast<const T*>(p.w1), *B1 = static_cast<const T*>(p.b1);
  const T *W2 = static_cast<const T*>(p.w2), *B2 = static_cast<const T*>(p.b2);
  T* Y = static_cast<T*>(p.y);

  // Fewer chunks than threads: use smaller chunks so every thread has work (p.chunk stays the cap).
  const int threads = useful_threads(4.0 * N * C * H);
  int64_t chunk = std::min(p.chunk, N);
  if (ceil_div(N, chunk) < threads) chunk = ceil_div(N, threads);
  const int64_t nchunks = ceil_div(N, chunk);
  const int team = static_cast<int>(std::min<int64_t>(threads, nchunks));
  std::vector<T> scratch(static_cast<size_t>(team) * chunk * H);  // allocated here so bad_alloc reaches Python

#pragma omp parallel num_threads(team)
  {
    T* h = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * chunk * H;
#pragma omp for schedule(dynamic, 1)
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const int64_t t0 = ci * chunk, n = std::min(chunk, N - t0);
      T* y = Y + t0 * p.y_s;
      fill_rows(h, n, H, H, B1);
      gemm<T>(n, H, C, X + t0 * p.x_s, p.x_s, 1, W1, H, h, H, true);  // pre = x w1 + b1
      gelu_inplace(h, n * H);                                          // h = gelu(pre)
      fill_rows(y, n, C, p.y_s, B2);
      gemm<T>(n, C, H, h, H, 1, W2, C, y, p.y_s, true);                // y = h w2 + b2
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------
template <class T>
void backward(const FfnParams& p) {
  const int64_t N = p.tokens, C = p.width, H = p.hidden;
  const T *X = static_cast<const T*>(p.x), *W1 = static_cast<const T*>(p.w1), *B1 = static_cast<const T*>(p.b1);
  const T *W2 = static_cast<const T*>(p.w2), *dY = static_cast<const T*>(p.dy);
  T *dX = static_cast<T*>(p.dx), *dW1 = static_cast<T*>(p.dw1), *dB1 = static_cast<T*>(p.db1);
  T *dW2 = static_cast<T*>(p.dw2), *dB2 = static_cast<T*>(p.db2);
  if (N == 0) {
    if (!p.accumulate) {  // no tokens: the overwritten gradients are zero
      std::fill(dW1, dW1 + C * H, T(0)); std::fill(dW2, dW2 + C * H, T(0));
      std::fill(dB1, dB1 + H, T(0)); std::fill(dB2, dB2 + C, T(0));
    }
    return;
  }

  // Same chunking rule as the forward: fewer chunks than threads -> smaller chunks.
  const int threads = useful_threads(12.0 * N * C * H);
  int64_t chunk = std::min(p.chunk, N);
  if (ceil_div(N, chunk) < threads) chunk = ceil_div(N, threads);
  const int64_t nchunks = ceil_div(N, chunk);
  const int team = static_cast<int>(std::min<int64_t>(threads, nchunks));

  // Allocated before the parallel region so bad_alloc reaches Python.
  const size_t wsize = static_cast<size_t>(C) * H;
  std::vector<T> w1t(wsize), w2t(wsize);  // w^T packed once: dh = dy w2^T, dx = dpre w1^T on the row-contiguous GEMM
  std::vector<T> act(team * static_cast<size_t>(chunk) * H), grad(team * static_cast<size_t>(chunk) * H);
  std::vector<T> acc_w(team * 2 * wsize, T(0));                 // per thread: dw1 | dw2 partial sums
  std::vector<double> acc_b(team * static_cast<size_t>(H + C), 0.0);  // per thread: db1 | db2 partial sums

#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    T* a = act.data() + static_cast<size_t>(t) * chunk * H;   // pre -> h
    T* g = grad.data() + static_cast<size_t>(t) * chunk * H;  // dh -> dpre
    T* dw1 = acc_w.data() + static_cast<size_t>(t) * 2 * wsize;
    T* dw2 = dw1 + wsize;
    double* db = acc_b.data() + static_cast<size_t>(t) * (H + C);
    transpose(W1, C, H, H, w1t.data());  // (H, C)
    transpose(W2, H, C, C, w2t.data());  // (C, H); omp for ends with a barrier

    // Contiguous static ranges of chunks: deterministic for a given thread count, one barrier in all.
    const int64_t cbeg = nchunks * t / nt, cend = nchunks * (t + 1) / nt;
    for (int64_t ci = cbeg; ci < cend; ++ci) {
      const int64_t t0 = ci * chunk, n = std::min(chunk, N - t0);
      const T* x = X + t0 * p.x_s;
      const T* dy = dY + t0 * p.dy_s;
      fill_rows(a, n, H, H, B1);
      gemm<T>(n, H, C, x, p.x_s, 1, W1, H, a, H, true);                    // pre = x w1 + b1
      gemm<T>(n, H, C, dy, p.dy_s, 1, w2t.data(), H, g, H, false);         // dh = dy w2^T
      gelu_backward_inplace(a, g, n * H);                                  // a = h, g = dpre
      gemm<T>(n, C, H, g, H, 1, w1t.data(), C, dX + t0 * p.dx_s, p.dx_s, false);  // dx = dpre w1^T
      gemm<T>(H, C, n, a, 1, H, dy, p.dy_s, dw2, C, true);                 // dw2 += h^T dy
      gemm<T>(C, H, n, x, 1, p.x_s, g, H, dw1, H, true);                   // dw1 += x^T dpre
      add_colsum(db, g, n, H, H);                                          // db1 += sum dpre
      add_colsum(db + H, dy, n, C, p.dy_s);                                // db2 += sum dy
    }
#pragma omp barrier
    // Reduction over threads in thread order, split over elements.
#pragma omp for schedule(static)
    for (int64_t e = 0; e < static_cast<int64_t>(wsize); ++e) {
      T s1 = T(0), s2 = T(0);
      for (int u = 0; u < nt; ++u) {
        s1 += acc_w[static_cast<size_t>(u) * 2 * wsize + e];
        s2 += acc_w[static_cast<size_t>(u) * 2 * wsize + wsize + e];
      }
      dW1[e] = p.accumulate ? dW1[e] + s1 : s1;
      dW2[e] = p.accumulate ? dW2[e] + s2 : s2;
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < H + C; ++j) {
      double s = 0.0;
      for (int u = 0; u < nt; ++u) s += acc_b[static_cast<size_t>(u) * (H + C) + j];
      T* out = j < H ? dB1 + j : dB2 + (j - H);
      *out = static_cast<T>(p.accumulate ? static_cast<double>(*out) + s : s);
    }
  }
}

}  // namespace

void ffn_forward(const FfnParams& p) { p.dtype == DType::f32 ? forward<float>(p) : forward<double>(p); }
void ffn_backward(const FfnParams& p) { p.dtype == DType::f32 ? backward<float>(p) : backward<double>(p); }

}  // namespace RA_ISA
}  // namespace ringattn
