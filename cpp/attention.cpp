// Blockwise attention, forward and backward (compiled once per ISA, see CMakeLists.txt).
// PLACEHOLDER: simple row-at-a-time version; being replaced by the tiled kernel.
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gemm.hpp"
#include "kernels.hpp"

namespace ringattn {
namespace RA_ISA {
namespace {

template <class T>
void forward(const AttnParams& p) {
  const int64_t group = p.heads / p.heads_kv;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.out);
  T* L = static_cast<T*>(p.lse);
#pragma omp parallel
  {
    std::vector<T> acc(p.dim), s(p.seq_k);
#pragma omp for collapse(3) schedule(static)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads; ++h)
        for (int64_t i = 0; i < p.seq_q; ++i) {
          const int64_t hk = h / group, qpos = p.q_start + i * p.q_stride;
          const T* q = Q + b * p.q_sb + i * p.q_ss + h * p.q_sh;
          T* o = O + b * p.o_sb + i * p.o_ss + h * p.o_sh;
          T& lse = L[b * p.l_sb + h * p.l_sh + i];
          T m = -std::numeric_limits<T>::infinity(), l = 0;
          for (int64_t d = 0; d < p.dim; ++d) acc[d] = 0;
          if (p.accumulate && lse > -std::numeric_limits<T>::infinity()) {
            m = lse; l = 1;
            for (int64_t d = 0; d < p.dim; ++d) acc[d] = o[d];
          }
          for (int64_t j = 0; j < p.seq_k; ++j) {
            if (p.causal && p.k_start + j * p.k_stride > qpos) continue;
            const T* k = K + b * p.k_sb + j * p.k_ss + hk * p.k_sh;
            const T* v = V + b * p.v_sb + j * p.v_ss + hk * p.v_sh;
            T x = 0;
            for (int64_t d = 0; d < p.dim; ++d) x += q[d] * k[d];
            x *= T(p.scale);
            const T mn = std::max(m, x);
            const T c = std::exp(m - mn), e = std::exp(x - mn);
            l = l * c + e;
            for (int64_t d = 0; d < p.dim; ++d) acc[d] = acc[d] * c + e * v[d];
            m = mn;
          }
          if (l > 0) {
            for (int64_t d = 0; d < p.dim; ++d) o[d] = acc[d] / l;
            lse = m + std::log(l);
          } else {
            for (int64_t d = 0; d < p.dim; ++d) o[d] = 0;
            lse = -std::numeric_limits<T>::infinity();
          }
        }
  }
}

template <class T>
void backward(const AttnParams& p) {
  // Serial placeholder (no races on dk/dv).
  const int64_t group = p.heads / p.heads_kv;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);
  const T* L = static_cast<const T*>(p.lse);
  const T* Dl = static_cast<const T*>(p.delta);
  T* dQ = static_cast<T*>(p.dq);
  T* dK = static_cast<T*>(p.dk);
  T* dV = static_cast<T*>(p.dv);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i = 0; i < p.seq_q; ++i) {
        const int64_t hk = h / group, qpos = p.q_start + i * p.q_stride;
        const T lse = L[b * p.l_sb + h * p.l_sh + i], delta = Dl[b * p.d_sb + h * p.d_sh + i];
        if (!(lse > -std::numeric_limits<T>::infinity())) continue;
        const T* q = Q + b * p.q_sb + i * p.q_ss + h * p.q_sh;
        const T* go = dO + b * p.do_sb + i * p.do_ss + h * p.do_sh;
        T* gq = dQ + b * p.dq_sb + i * p.dq_ss + h * p.dq_sh;
        for (int64_t j = 0; j < p.seq_k; ++j) {
          if (p.causal && p.k_start + j * p.k_stride > qpos) continue;
          const T* k = K + b * p.k_sb + j * p.k_ss + hk * p.k_sh;
          const T* v = V + b * p.v_sb + j * p.v_ss + hk * p.v_sh;
          T* gk = dK + b * p.dk_sb + j * p.dk_ss + hk * p.dk_sh;
          T* gv = dV + b * p.dv_sb + j * p.dv_ss + hk * p.dv_sh;
          T x = 0, dp = 0;
          for (int64_t d = 0; d < p.dim; ++d) { x += q[d] * k[d]; dp += go[d] * v[d]; }
          const T P = std::exp(x * T(p.scale) - lse);
          const T ds = P * (dp - delta) * T(p.scale);
          for (int64_t d = 0; d < p.dim; ++d) {
            gv[d] += P * go[d];
            gq[d] += ds * k[d];
            gk[d] += ds * q[d];
          }
        }
      }
}

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
