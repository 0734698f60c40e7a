// Blockwise attention, forward and backward (compiled once per ISA, see CMakeLists.txt).
//
// Flash-style: the (seq_q x seq_k) score matrix never exists; a query block of kBr rows meets
// key blocks of kBc rows, with an online softmax in between. All scores are kept in base 2
// (Q is pre-scaled by scale * log2(e), so one exp2 per score); lse is converted back to natural
// log on output. Statistics (running max, running sum, lse) and the output accumulator are kept
// in T (float32 for float32 inputs, float64 for float64 inputs).
//
// Masking (mask.hpp) uses global positions and a window: for each query row the visible keys are a
// contiguous RANGE of the key rows, and for a query block the union of its rows' ranges runs from the
// first row's begin to the last row's end. Key blocks outside it are never visited; blocks fully
// visible to every row of the block need no per-element mask.
//
// Forward:  threads take (batch, head, query block) tasks, dynamic schedule (causal blocks differ
//   in cost). Per thread: Q^T block (dim x Br), S^T = K_j Q^T (Bc x Br: keys down, queries across,
//   so the per-query max / sum / exp are vector operations over queries), O accumulator (Br x dim),
//   K_j and V_j copied into contiguous blocks. Memory: O(block) per thread, nothing O(seq).
// Backward: for each (batch, head), threads take key blocks (dynamic): each owns its dK/dV rows
//   (no races; heads of one GQA group run one after another) and adds its dQ contribution into a
//   per-thread (seq_q x dim) scratch, summed into dq after the head (with one thread dq is written
//   directly). Recomputes P from lse. The dq summation order depends on which thread took which
//   key block, so with several threads dq may differ between runs in the last bits.
// All gemm operands are contiguous blocks (pack_rows / the transposes) or per-thread buffers.
//
// NaN / Inf: only lse = -inf (and l = 0) mean "no visible key yet"; every test for emptiness is an
// equality with -inf or 0, never `lse > -inf` / `l > 0`, which are false for NaN and would turn a
// row that saw a bad value into an empty one (and the next accumulate call would replace it).
// What a bad value may reach beyond the rows that see it is in docs/numerics.md.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gemm.hpp"
#include "kernels.hpp"
#include "simd.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---- index math ------------------------------------------------------------------------------
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Block sizes: kBr queries x kBc keys. Br a multiple of every vector width (columns of S^T).
// Measured (1 thread, CPU time, Zen 4, 8 heads, seq 4096, dim 64; +-5% noise): forward 64x128
// 85, 128x64 86-88, 128x128 82-88; backward 64x64 71-76, 128x64 75-80, 128x128 87-88 GFLOP/s.
// Per-thread buffers stay in L2 (backward: S and dP 64 KiB each).
constexpr int64_t kBr = 128;
constexpr int64_t kBc = 64;
constexpr int64_t kBwdBr = 128;
constexpr int64_t kBwdBc = 128;
static_assert(kBr % 16 == 0 && kBwdBc % 16 == 0, "vectorised axes must be multiples of the widest vector");

// Copies rows [0, n) of a row-strided block into a contiguous (n x dim) buffer. The kernels'
// gemm operands are read once per 6-row tile, and rows of a (batch, seq, heads, dim) array are
// heads*dim apart: with many heads the strided reads miss the TLB on every row (measured: 8 heads
// at seq 4096 ran 18% slower than 2 heads before the blocks were packed).
template <class T>
inline const T* pack_rows(const T* src, int64_t ld, int64_t n, int64_t dim, T* dst) {
  for (int64_t r = 0; r < n; ++r) std::copy(src + r * ld, src + r * ld + dim, dst + r * dim);
  return dst;
}

// ---- forward ---------------------------------------------------------------------------------
template <class T>
void forward(const AttnParams& p) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  const T inf = std::numeric_limits<T>::infinity();
  const mask::Mask& mk = p.mask;
  const int64_t D = p.dim, group = p.heads / p.heads_kv;
  const int64_t nqb = (p.seq_q + kBr - 1) / kBr;
  const T c2 = T(p.scale * kLog2e);
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* Vv = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.out);
  T* L = static_cast<T*>(p.lse);

  // Per-thread block buffers, O(block) memory whatever the sequence length: qt | st | acc | m | l |
  // alpha | kp | vp. Allocated before the parallel region, so that bad_alloc reaches Python as
  // MemoryError (thrown inside the region it would terminate the process).
  const int nt = omp_get_max_threads();
  const size_t per_thread = size_t(D * kBr + kBc * kBr + kBr * D + 3 * kBr + 2 * kBc * D);
  std::vector<T> scratch(per_thread * nt);

#pragma omp parallel num_threads(nt)
  {
    T* const qt = scratch.data() + per_thread * omp_get_thread_num();
    T* const st = qt + D * kBr;
    T* const acc = st + kBc * kBr;
    T* const m = acc + kBr * D;
    T* const l = m + kBr;
    T* const alpha = l + kBr;
    T* const kp = alpha + kBr;
    T* const vp = kp + kBc * D;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < p.batch * p.heads; ++bh)
      for (int64_t t = 0; t < nqb; ++t) {
        // Causal: the last query blocks see the most keys; handing them out first leaves only
        // light tasks for the end of the dynamic schedule (threads finish together).
        const int64_t qb = mk.right >= 0 ? nqb - 1 - t : t;
        const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / group;
        const int64_t i0 = qb * kBr, nq = std::min(kBr, p.seq_q - i0);
        // keys any row of the block sees: from the first row's begin to the last row's end
        const int64_t kbeg = mask::key_begin(mk, i0, p.seq_k), kend = mask::key_end(mk, i0 + nq - 1, p.seq_k);
        const T* q = Q + b * p.q_sb + h * p.q_sh + i0 * p.q_ss;
        T* o = O + b * p.o_sb + h * p.o_sh + i0 * p.o_ss;
        T* lse = L + b * p.l_sb + h * p.l_sh + i0;
        const T* k = K + b * p.k_sb + hk * p.k_sh;
        const T* v = Vv + b * p.v_sb + hk * p.v_sh;
        if (kbeg >= kend && p.accumulate) continue;  // nothing visible: (out, lse) stay as they are

        // Q^T, pre-scaled into base 2; padded query columns are zero (their results are dropped).
        // (Rows read one at a time, contiguously: column-wise reads would touch every row's page
        // once per d.)
        for (int64_t r = 0; r < nq; ++r)
          for (int64_t d = 0; d < D; ++d) qt[d * kBr + r] = q[r * p.q_ss + d] * c2;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t r = nq; r < kBr; ++r) qt[d * kBr + r] = 0;
        // Running state (base 2): empty, or resumed from (out, lse) as m = lse, l = 1, acc = out
        // for the rows this call will touch.
        // Only lse = -inf means "no keys yet": a NaN (or +inf) lse resumes as it is, so the bad
        // value it stands for stays in the row (`lse > -inf` would read NaN as empty and drop it).
        std::fill(m, m + kBr, -inf);
        std::fill(l, l + kBr, T(0));
        std::fill(acc, acc + nq * D, T(0));
        if (p.accumulate)
          for (int64_t r = 0; r < nq; ++r)
            if (lse[r] != -inf && mask::row_sees_keys(mk, i0 + r, p.seq_k)) {
              m[r] = T(lse[r] * kLog2e);
              l[r] = 1;
              for (int64_t d = 0; d < D; ++d) acc[r * D + d] = o[r * p.o_ss + d];
            }

        for (int64_t j0 = kbeg; j0 < kend; j0 += kBc) {
          const int64_t nk = std::min(kBc, kend - j0);
          // Query columns [0, r0) see no key of this block (causal, near the diagonal): they are
          // neither computed nor updated. r0 is rounded down to whole vectors.
          const int64_t r0 = std::max<int64_t>(0, mask::query_begin(mk, j0, p.seq_q) - i0) / W * W;
          // S^T[j, r] = k_j . (c2 q_r)
          const T* kj = pack_rows(k + j0 * p.k_ss, p.k_ss, nk, D, kp);
          gemm<T>(nk, kBr - r0, D, kj, D, 1, qt + r0, kBr, st + r0, kBr, false);
          // Mask, only where some pair of the tile is hidden: key j is seen by the query rows
          // [query_begin(j), query_end(j)), the other columns get -inf (a prefix and a suffix).
          if (!mask::tile_visible(mk, i0, i0 + nq - 1, j0, j0 + nk - 1))
            for (int64_t j = 0; j < nk; ++j) {
              const int64_t f = std::min(mask::query_begin(mk, j0 + j, p.seq_q) - i0, kBr);
              const int64_t g = std::max(mask::query_end(mk, j0 + j, p.seq_q) - i0, r0);
              for (int64_t r = r0; r < f; ++r) st[j * kBr + r] = -inf;
              for (int64_t r = g; r < kBr; ++r) st[j * kBr + r] = -inf;
            }
          // Online softmax, vectorised over the query columns:
          //   m' = max(m, max_j s)   alpha = 2^(m - m')   p = 2^(s - m')   l' = l alpha + sum_j p
          // NaN: vmax may drop a NaN in m or s, but l never does (a NaN s makes its p NaN, a NaN m
          // makes alpha NaN), and the output is taken from l: the row ends NaN.
          for (int64_t r = r0; r < kBr; r += W) {
            const V mold = load(m + r);
            V mx = mold;
            for (int64_t j = 0; j < nk; ++j) mx = vmax(mx, load(st + j * kBr + r));
            // Columns with nothing visible yet keep max -inf; shift by 0 there so p = 0, not NaN.
            const V msafe = mx == -inf ? V{} : mx;
            V sum = V{};
            for (int64_t j = 0; j < nk; ++j) {
              T* sj = st + j * kBr + r;
              const V e = exp2vec(load(sj) - msafe);
              store(sj, e);
              sum += e;
            }
            const V a = exp2vec(mold - msafe);
            store(alpha + r, a);
            store(l + r, load(l + r) * a + sum);
            store(m + r, mx);
          }
          for (int64_t r = r0; r < nq; ++r) {
            const T a = alpha[r];
            if (a != T(1))
              for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= a;
          }
          // acc += P V with P = (S^T)^T, read in place: A(r, j) = st[j * Br + r].
          const T* vj = pack_rows(v + j0 * p.v_ss, p.v_ss, nk, D, vp);
          gemm<T>(nq - r0, D, nk, st + r0, 1, kBr, vj, D, acc + r0 * D, D, true);
        }

        for (int64_t r = 0; r < nq; ++r) {
          T* orow = o + r * p.o_ss;
          if (l[r] != 0) {  // NaN too: a NaN score must give NaN, not an "empty" row
            const T inv = T(1) / l[r];
            for (int64_t d = 0; d < D; ++d) orow[d] = acc[r * D + d] * inv;
            lse[r] = T((double(m[r]) + std::log2(double(l[r]))) * kLn2);
          } else if (mask::row_sees_keys(mk, i0 + r, p.seq_k)) {
            // Visible keys whose scores are all -inf: IEEE gives out = 0/0 = NaN and lse = log 0 =
            // -inf; a later block with finite scores replaces the row (its -inf keys weigh 0).
            for (int64_t d = 0; d < D; ++d) orow[d] = std::numeric_limits<T>::quiet_NaN();
            lse[r] = -inf;
          } else if (!p.accumulate) {
            for (int64_t d = 0; d < D; ++d) orow[d] = 0;
            lse[r] = -inf;
          }
        }
      }
  }
}

// ---- backward --------------------------------------------------------------------------------
// For one key block j (Bc keys) and query block i (Br rows):
//   S = Q_i K_j^T          P = 2^(c2 S - log2e lse)  (0 where masked; NaN for a visible key of a
//                          row with lse = -inf, whose scores are all -inf)
//   dP = dO_i V_j^T        dS = scale * P * (dP - delta)
//   dV_j += P^T dO_i       dK_j += dS^T Q_i          dQ_i += dS K_j
template <class T>
void backward(const AttnParams& p) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  constexpr int64_t Br = kBwdBr, Bc = kBwdBc;
  const T inf = std::numeric_limits<T>::infinity();
  const mask::Mask& mk = p.mask;
  const int64_t D = p.dim, group = p.heads / p.heads_kv;
  const int64_t nkb = (p.seq_k + Bc - 1) / Bc;
  const T c2 = T(p.scale * kLog2e), scale = T(p.scale);
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* Vv = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);
  const T* Lse = static_cast<const T*>(p.lse);
  const T* Dl = static_cast<const T*>(p.delta);
  T* dQ = static_cast<T*>(p.dq);
  T* dK = static_cast<T*>(p.dk);
  T* dV = static_cast<T*>(p.dv);
  // Per-thread buffers: kt | vt (K_j^T, V_j^T) | s | dp | dk_acc | dv_acc | kp | qp | gp (packed
  // K_j, Q_i, dO_i rows), and, with several threads, a (seq_q x dim) dQ scratch per thread: dQ rows
  // get contributions from every key block, so each thread sums its share there and the shares
  // are added into dq after each head. Allocated before the parallel region, so that bad_alloc
  // reaches Python as MemoryError (thrown inside the region it would terminate the process).
  const int max_nt = omp_get_max_threads();
  const size_t per_thread = size_t(4 * D * Bc + 2 * Br * Bc + D * Bc + 2 * Br * D);
  const size_t dq_size = max_nt > 1 ? size_t(p.seq_q * D) : 0;
  std::vector<T> scratch(per_thread * max_nt), dq_scratch(dq_size * max_nt);

#pragma omp parallel num_threads(max_nt)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    T* const kt = scratch.data() + per_thread * tid;
    T* const vt = kt + D * Bc;
    T* const s = vt + D * Bc;
    T* const dp = s + Br * Bc;
    T* const dk_acc = dp + Br * Bc;
    T* const dv_acc = dk_acc + Bc * D;
    T* const kp = dv_acc + Bc * D;
    T* const qp = kp + Bc * D;
    T* const gp = qp + Br * D;
    T* const dq_part = dq_scratch.data() + dq_size * tid;  // used only when nt > 1 (then dq_size > 0)

    for (int64_t bh = 0; bh < p.batch * p.heads; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / group;
      const T* q = Q + b * p.q_sb + h * p.q_sh;
      const T* go = dO + b * p.do_sb + h * p.do_sh;
      const T* lse = Lse + b * p.l_sb + h * p.l_sh;
      const T* dlt = Dl + b * p.d_sb + h * p.d_sh;
      const T* k = K + b * p.k_sb + hk * p.k_sh;
      const T* v = Vv + b * p.v_sb + hk * p.v_sh;
      T* gq = dQ + b * p.dq_sb + h * p.dq_sh;
      T* gk = dK + b * p.dk_sb + hk * p.dk_sh;
      T* gv = dV + b * p.dv_sb + hk * p.dv_sh;
      T* dq_out = nt > 1 ? dq_part : gq;
      const int64_t dq_ld = nt > 1 ? D : p.dq_ss;
      if (nt > 1) std::fill(dq_part, dq_part + dq_size, T(0));

#pragma omp for schedule(dynamic, 1)
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t j0 = kb * Bc, nk = std::min(Bc, p.seq_k - j0);
        // query rows that see any of these keys: from the first key's begin to the last key's end
        const int64_t iq0 = mask::query_begin(mk, j0, p.seq_q), iq1 = mask::query_end(mk, j0 + nk - 1, p.seq_q);
        if (iq0 >= iq1) continue;
        for (int64_t j = 0; j < nk; ++j)  // K_j^T, V_j^T (row by row, as for Q^T in the forward)
          for (int64_t d = 0; d < D; ++d) {
            kt[d * Bc + j] = k[(j0 + j) * p.k_ss + d];
            vt[d * Bc + j] = v[(j0 + j) * p.v_ss + d];
          }
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = nk; j < Bc; ++j) kt[d * Bc + j] = vt[d * Bc + j] = 0;
        const T* kj = pack_rows(k + j0 * p.k_ss, p.k_ss, nk, D, kp);
        std::fill(dk_acc, dk_acc + nk * D, T(0));
        std::fill(dv_acc, dv_acc + nk * D, T(0));

        for (int64_t i0 = iq0; i0 < iq1; i0 += Br) {
          const int64_t nq = std::min(Br, iq1 - i0);
          // Keys of this block that the query block sees at all, [kb, ke), kb rounded down to whole
          // vectors: the rest is neither computed nor read (also keeps a NaN in a hidden key out of
          // dq: 0 * NaN is NaN).
          const int64_t kb = std::clamp<int64_t>(mask::key_begin(mk, i0, p.seq_k) - j0, 0, nk) / W * W;
          const int64_t ke = std::clamp<int64_t>(mask::key_end(mk, i0 + nq - 1, p.seq_k) - j0, 0, nk);
          if (kb >= ke) continue;
          const int64_t nkw = round_up(ke, W), nki = ke - kb;
          const T* qi = pack_rows(q + i0 * p.q_ss, p.q_ss, nq, D, qp);
          const T* goi = pack_rows(go + i0 * p.do_ss, p.do_ss, nq, D, gp);
          gemm<T>(nq, nkw - kb, D, qi, D, 1, kt + kb, Bc, s + kb, Bc, false);     // S
          gemm<T>(nq, nkw - kb, D, goi, D, 1, vt + kb, Bc, dp + kb, Bc, false);  // dP
          for (int64_t r = 0; r < nq; ++r) {
            T* sr = s + r * Bc;
            T* dr = dp + r * Bc;
            const T lr = lse[i0 + r];
            // Every visible key gets p = 2^(s - lse), IEEE: a row with lse = -inf that sees keys
            // (all its scores -inf) gets p = NaN there; masked keys are set to 0 below (a select).
            const int64_t a = std::clamp<int64_t>(mask::key_begin(mk, i0 + r, p.seq_k) - j0, kb, ke);
            const int64_t e = std::clamp<int64_t>(mask::key_end(mk, i0 + r, p.seq_k) - j0, a, ke);
            const V sh = splat(T(lr * kLog2e)), dl = splat(dlt[i0 + r]), cv = splat(c2), sc = splat(scale);
            for (int64_t c = a / W * W; c < round_up(e, W); c += W) {
              const V pr = exp2vec(load(sr + c) * cv - sh);
              store(sr + c, pr);
              store(dr + c, pr * (load(dr + c) - dl) * sc);
            }
            for (int64_t c = kb; c < a; ++c) sr[c] = dr[c] = 0;   // masked keys before the row's range
            for (int64_t c = e; c < nkw; ++c) sr[c] = dr[c] = 0;  // masked keys after it (and padding)
          }
          gemm<T>(nki, D, nq, s + kb, 1, Bc, goi, D, dv_acc + kb * D, D, true);   // dV += P^T dO
          gemm<T>(nki, D, nq, dp + kb, 1, Bc, qi, D, dk_acc + kb * D, D, true);   // dK += dS^T Q
          gemm<T>(nq, D, nki, dp + kb, Bc, 1, kj + kb * D, D, dq_out + i0 * dq_ld, dq_ld, true);  // dQ += dS K
        }
        for (int64_t j = 0; j < nk; ++j) {
          T* gkr = gk + (j0 + j) * p.dk_ss;
          T* gvr = gv + (j0 + j) * p.dv_ss;
          for (int64_t d = 0; d < D; ++d) { gkr[d] += dk_acc[j * D + d]; gvr[d] += dv_acc[j * D + d]; }
        }
      }  // implicit barrier: every thread's dQ share for this head is complete

      if (nt > 1) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < p.seq_q; ++i) {
          T* row = gq + i * p.dq_ss;
          for (int t = 0; t < nt; ++t) {
            const T* part = dq_scratch.data() + dq_size * t + i * D;
            for (int64_t d = 0; d < D; ++d) row[d] += part[d];
          }
        }  // implicit barrier before the scratch is cleared for the next head
      }
    }
  }
}

// delta[b, h, i] = sum_d dout * out (float32 accumulation for float32).
template <class T>
void delta(const AttnParams& p) {
  const T* O = static_cast<const T*>(p.out);
  const T* dO = static_cast<const T*>(p.dout);
  T* D = static_cast<T*>(const_cast<void*>(p.delta));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < p.seq_q; ++i)
      for (int64_t h = 0; h < p.heads; ++h) {
        const T* o = O + b * p.o_sb + i * p.o_ss + h * p.o_sh;
        const T* g = dO + b * p.do_sb + i * p.do_ss + h * p.do_sh;
        T s = 0;
        for (int64_t d = 0; d < p.dim; ++d) s += o[d] * g[d];
        D[b * p.d_sb + h * p.d_sh + i] = s;
      }
}

}  // namespace

void attention_forward(const AttnParams& p) { p.dtype == DType::f32 ? forward<float>(p) : forward<double>(p); }
void attention_backward(const AttnParams& p) { p.dtype == DType::f32 ? backward<float>(p) : backward<double>(p); }
void attention_delta(const AttnParams& p) { p.dtype == DType::f32 ? delta<float>(p) : delta<double>(p); }

}  // namespace RA_ISA
}  // namespace ringattn
