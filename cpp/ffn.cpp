// Blockwise feed-forward, forward and backward (compiled once per ISA, see CMakeLists.txt).
// PLACEHOLDER: serial chunk loop; being replaced by the threaded kernel.
#include <cmath>
#include <vector>

#include "gemm.hpp"
#include "kernels.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

template <class T>
T gelu(T x) {
  const T c = T(0.7978845608028654), a = T(0.044715);
  return T(0.5) * x * (T(1) + std::tanh(c * (x + a * x * x * x)));
}
template <class T>
T gelu_grad(T x) {
  const T c = T(0.7978845608028654), a = T(0.044715);
  const T t = std::tanh(c * (x + a * x * x * x));
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3) * a * x * x);
}

template <class T>
void forward(const FfnParams& p) {
  const T *X = static_cast<const T*>(p.x), *W1 = static_cast<const T*>(p.w1), *B1 = static_cast<const T*>(p.b1);
  const T *W2 = static_cast<const T*>(p.w2), *B2 = static_cast<const T*>(p.b2);
  T* Y = static_cast<T*>(p.y);
  std::vector<T> h(p.chunk * p.hidden);
  for (int64_t t0 = 0; t0 < p.tokens; t0 += p.chunk) {
    const int64_t n = std::min(p.chunk, p.tokens - t0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < p.hidden; ++j) h[i * p.hidden + j] = B1[j];
    gemm<T>(n, p.hidden, p.width, X + t0 * p.x_s, p.x_s, 1, W1, p.hidden, h.data(), p.hidden, true);
    for (int64_t e = 0; e < n * p.hidden; ++e) h[e] = gelu(h[e]);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < p.width; ++j) Y[(t0 + i) * p.y_s + j] = B2[j];
    gemm<T>(n, p.width, p.hidden, h.data(), p.hidden, 1, W2, p.width, Y + t0 * p.y_s, p.y_s, true);
  }
}

template <class T>
void backward(const FfnParams& p) {
  const T *X = static_cast<const T*>(p.x), *W1 = static_cast<const T*>(p.w1), *B1 = static_cast<const T*>(p.b1);
  const T *W2 = static_cast<const T*>(p.w2), *dY = static_cast<const T*>(p.dy);
  T *dX = static_cast<T*>(p.dx), *dW1 = static_cast<T*>(p.dw1), *dB1 = static_cast<T*>(p.db1);
  T *dW2 = static_cast<T*>(p.dw2), *dB2 = static_cast<T*>(p.db2);
  const int64_t H = p.hidden, C = p.width;
  std::vector<T> pre(p.chunk * H), h(p.chunk * H), dh(p.chunk * H);
  for (int64_t t0 = 0; t0 < p.tokens; t0 += p.chunk) {
    const int64_t n = std::min(p.chunk, p.tokens - t0);
    const T* x = X + t0 * p.x_s;
    const T* dy = dY + t0 * p.dy_s;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < H; ++j) pre[i * H + j] = B1[j];
    gemm<T>(n, H, C, x, p.x_s, 1, W1, H, pre.data(), H, true);
    for (int64_t e = 0; e < n * H; ++e) h[e] = gelu(pre[e]);
    // dh = dy @ w2^T : A = dy (n x C), B = w2^T is not row-contiguous -> loop form
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < H; ++j) {
        T s = 0;
        for (int64_t c = 0; c < C; ++c) s += dy[i * p.dy_s + c] * W2[j * C + c];
        dh[i * H + j] = s * gelu_grad(pre[i * H + j]);
      }
    gemm<T>(H, C, n, h.data(), 1, H, dy, p.dy_s, dW2, C, true);        // dw2 += h^T dy
    gemm<T>(C, H, n, x, 1, p.x_s, dh.data(), H, dW1, H, true);         // dw1 += x^T dpre
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < C; ++c) dB2[c] += dy[i * p.dy_s + c];
      for (int64_t j = 0; j < H; ++j) dB1[j] += dh[i * H + j];
    }
    for (int64_t i = 0; i < n; ++i)                                     // dx = dpre @ w1^T
      for (int64_t c = 0; c < C; ++c) {
        T s = 0;
        for (int64_t j = 0; j < H; ++j) s += dh[i * H + j] * W1[c * H + j];
        dX[(t0 + i) * p.dx_s + c] = s;
      }
  }
}

}  // namespace

void ffn_forward(const FfnParams& p) { p.dtype == DType::f32 ? forward<float>(p) : forward<double>(p); }
void ffn_backward(const FfnParams& p) { p.dtype == DType::f32 ? backward<float>(p) : backward<double>(p); }

}  // namespace RA_ISA
}  // namespace ringattn
