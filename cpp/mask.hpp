// The attention mask of one kernel call, as one value, shared by the CPU kernels (cpp/) and the CUDA
// kernels (cuda/): plain functions that are __host__ __device__ under nvcc and ordinary inline
// functions in the CPU build and the CUDA emulation (RA_HD expands to nothing there).
//
// Global positions: query row i sits at q_start + i * q_stride, key row j at k_start + j * k_stride
// (strides >= 1, so positions increase with the row). Query at position pq sees the key at pk iff
//     pq - left <= pk <= pq + right,
// a negative bound meaning unbounded on that side; causal is right = 0 (mask_of folds it in). Every
// visible set below is therefore a contiguous range of rows, which is what lets the kernels skip
// whole tiles. ringattn.reference implements the same definition independently (the ground truth).
// A new mask (e.g. per-document blocks) changes this header, src/ringattn/mask.py, the reference and
// their tests; the kernels only call the functions below.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RA_HD __host__ __device__ __forceinline__
#else
#define RA_HD inline
#endif

namespace ringattn {
namespace mask {

struct Mask {
  int64_t q_start, q_stride, k_start, k_stride;
  int64_t left, right;  // window bounds in positions; < 0: unbounded
};

// The call's mask: causal forces right = 0 (flash-attn's convention: causal with a window keeps the
// window's left bound).
RA_HD Mask mask_of(int64_t q_start, int64_t q_stride, int64_t k_start, int64_t k_stride, bool causal,
                   int64_t left, int64_t right) {
  return {q_start, q_stride, k_start, k_stride, left < 0 ? -1 : left, causal ? 0 : (right < 0 ? -1 : right)};
}

RA_HD bool unmasked(const Mask& m) { return m.left < 0 && m.right < 0; }
RA_HD int64_t pos_q(const Mask& m, int64_t i) { return m.q_start + i * m.q_stride; }
RA_HD int64_t pos_k(const Mask& m, int64_t j) { return m.k_start + j * m.k_stride; }

RA_HD bool visible(const Mask& m, int64_t i, int64_t j) {
  const int64_t pq = pos_q(m, i), pk = pos_k(m, j);
  return (m.left < 0 || pk >= pq - m.left) && (m.right < 0 || pk <= pq + m.right);
}

RA_HD int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
RA_HD int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }
// First row index whose position start + idx * stride is >= p / > p (rows [0, n)).
RA_HD int64_t first_at_least(int64_t p, int64_t start, int64_t stride, int64_t n) {
  return clamp(-floordiv(start - p, stride), 0, n);  // ceil((p - start) / stride)
}
RA_HD int64_t first_above(int64_t p, int64_t start, int64_t stride, int64_t n) {
  return clamp(floordiv(p - start, stride) + 1, 0, n);
}

// Keys [key_begin, key_end) of [0, seq_k) visible to query row i (empty when begin >= end).
RA_HD int64_t key_begin(const Mask& m, int64_t i, int64_t seq_k) {
  return m.left < 0 ? 0 : first_at_least(pos_q(m, i) - m.left, m.k_start, m.k_stride, seq_k);
}
RA_HD int64_t key_end(const Mask& m, int64_t i, int64_t seq_k) {
  return m.right < 0 ? seq_k : first_above(pos_q(m, i) + m.right, m.k_start, m.k_stride, seq_k);
}
RA_HD bool row_sees_keys(const Mask& m, int64_t i, int64_t seq_k) { return key_begin(m, i, seq_k) < key_end(m, i, seq_k); }

// Query rows [query_begin, query_end) of [0, seq_q) that see key row j.
RA_HD int64_t query_begin(const Mask& m, int64_t j, int64_t seq_q) {
  return m.right < 0 ? 0 : first_at_least(pos_k(m, j) - m.right, m.q_start, m.q_stride, seq_q);
}
RA_HD int64_t query_end(const Mask& m, int64_t j, int64_t seq_q) {
  return m.left < 0 ? seq_q : first_above(pos_k(m, j) + m.left, m.q_start, m.q_stride, seq_q);
}

// A tile of query rows [i0, i1] and key rows [j0, j1] (inclusive): no pair visible / every pair visible.
RA_HD bool tile_masked(const Mask& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  return (m.right >= 0 && pos_k(m, j0) > pos_q(m, i1) + m.right) || (m.left >= 0 && pos_k(m, j1) < pos_q(m, i0) - m.left);
}
RA_HD bool tile_visible(const Mask& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  return (m.right < 0 || pos_k(m, j1) <= pos_q(m, i0) + m.right) && (m.left < 0 || pos_k(m, j0) >= pos_q(m, i1) - m.left);
}

}  // namespace mask
}  // namespace ringattn
