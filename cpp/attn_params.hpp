// The attention checks both bindings share (cpp/bindings.cpp for the CPU kernels, cuda/bindings.cpp
// for the CUDA kernels): each binding validates its arrays' dtypes, ranks and strides in its own
// terms, then calls fill_attention, which checks what the two have in common (q/k/v shape
// agreement, head dim, scale, positions, window) and fills the common fields of the binding's params
// struct (the two structs share these field names). Errors are std::invalid_argument, which
// pybind11 raises as ValueError.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mask.hpp"

namespace ringattn {

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += std::to_string(s[i]) + (s.size() == 1 || i + 1 < s.size() ? ", " : "");
  if (s.size() == 1) out.resize(out.size() - 1);
  return out + ")";
}

[[noreturn]] inline void invalid(const std::string& msg) { throw std::invalid_argument(msg); }

inline void expect_shape(const std::string& name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (got != want) invalid(name + ": shape " + shape_str(got) + " but expected " + shape_str(want));
}

// View: the binding's validated array (4-d), with shape, n(i), s(i) and ptr.
template <class Params, class View>
void fill_attention(Params& p, const View& Q, const View& K, const View& V, int64_t q_start, int64_t q_stride,
                    int64_t k_start, int64_t k_stride, bool causal, int64_t window_left, int64_t window_right,
                    double scale) {
  p.batch = Q.n(0); p.seq_q = Q.n(1); p.heads = Q.n(2); p.dim = Q.n(3);
  p.seq_k = K.n(1); p.heads_kv = K.n(2);
  if (K.n(0) != p.batch) invalid("k: batch " + std::to_string(K.n(0)) + " differs from q's " + std::to_string(p.batch));
  if (K.n(3) != p.dim) invalid("k: head dim " + std::to_string(K.n(3)) + " differs from q's " + std::to_string(p.dim));
  expect_shape("v", V.shape, K.shape);
  if (p.heads_kv < 1 || p.heads % p.heads_kv)
    invalid("heads (" + std::to_string(p.heads) + ") must be a multiple of heads_kv (" + std::to_string(p.heads_kv) + ")");
  if (p.dim < 1 || p.dim > 256) invalid("head dim must be in 1..256, got " + std::to_string(p.dim));
  if (!std::isfinite(scale)) invalid("softmax_scale must be finite");
  if (q_stride < 1 || k_stride < 1) invalid("position strides must be >= 1");
  if (window_left < -1 || window_right < -1)
    invalid("window bounds must be >= 0, or -1 for unbounded; got (" + std::to_string(window_left) + ", " +
            std::to_string(window_right) + ")");
  p.q = Q.ptr; p.q_sb = Q.s(0); p.q_ss = Q.s(1); p.q_sh = Q.s(2);
  p.k = K.ptr; p.k_sb = K.s(0); p.k_ss = K.s(1); p.k_sh = K.s(2);
  p.v = V.ptr; p.v_sb = V.s(0); p.v_ss = V.s(1); p.v_sh = V.s(2);
  p.mask = mask::mask_of(q_start, q_stride, k_start, k_stride, causal, window_left, window_right);
  p.scale = decltype(p.scale)(scale);
}

}  // namespace ringattn
