// ringattn CPU kernels: plain parameter structs and the entry points every ISA build provides.
//
// All tensors are described by a pointer plus element strides; the innermost axis (head dim or
// feature) is always contiguous. Bindings (bindings.cpp) validate every input and fill these
// structs; kernels trust them.
#pragma once
#include <cstdint>

#include "mask.hpp"

namespace ringattn {

enum class DType { f32, f64 };

// Blockwise attention on one (Q block, K/V block) pair.
//   q, out, dout, dq : (batch, seq_q, heads,    dim)
//   k, v, dk, dv     : (batch, seq_k, heads_kv, dim)    heads % heads_kv == 0 (GQA / MQA)
//   lse, delta       : (batch, heads, seq_q)            seq axis contiguous
// mask: global positions of the rows and the window (mask.hpp); position descriptors let one kernel
// serve contiguous, zigzag and striped layouts. Rows that see no key give out = 0, lse = -inf.
struct AttnParams {
  DType dtype;
  int64_t batch, seq_q, seq_k, heads, heads_kv, dim;

  const void* q;   int64_t q_sb, q_ss, q_sh;
  const void* k;   int64_t k_sb, k_ss, k_sh;
  const void* v;   int64_t v_sb, v_ss, v_sh;
  void* out;       int64_t o_sb, o_ss, o_sh;
  void* lse;       int64_t l_sb, l_sh;   // float32 for f32 inputs, float64 for f64 inputs

  // backward only
  const void* dout;  int64_t do_sb, do_ss, do_sh;
  const void* delta; int64_t d_sb, d_sh;  // rowsum(dout * out), same dtype as lse
  void* dq;  int64_t dq_sb, dq_ss, dq_sh;
  void* dk;  int64_t dk_sb, dk_ss, dk_sh;
  void* dv;  int64_t dv_sb, dv_ss, dv_sh;

  mask::Mask mask;
  double scale;
  // forward: false -> (out, lse) are overwritten; true -> (out, lse) hold a running result over
  // other keys and this block is merged into it (online softmax resumed from lse; float32 or wider).
  bool accumulate;
};

// Blockwise feed-forward: y = gelu(x @ w1 + b1) @ w2 + b2, over chunks of `chunk` tokens so the
// (tokens, hidden) activation never exists for the whole input. gelu is the tanh approximation.
//   x, y, dy, dx : (tokens, width) row stride given; w1: (width, hidden); w2: (hidden, width)
struct FfnParams {
  DType dtype;
  int64_t tokens, width, hidden, chunk;
  const void* x;  int64_t x_s;
  const void* w1; const void* b1;
  const void* w2; const void* b2;
  void* y;        int64_t y_s;
  // backward only: dx is overwritten; dw1, db1, dw2, db2 are accumulated (+=) when accumulate,
  // else overwritten
  const void* dy; int64_t dy_s;
  void* dx;       int64_t dx_s;
  void* dw1; void* db1; void* dw2; void* db2;
  bool accumulate;
};

// ---- the rest of a training step (issue 16); every array C-contiguous --------------------------
// Readable reference of each: src/ringattn/backends/xp_fused.py (the same arithmetic in NumPy/CuPy).

// LayerNorm over rows of (rows, width): y = (x - mean) * rstd * g + b.
//   forward: add != nullptr -> x += add first, in place (the residual add); writes y, mean, rstd.
//   backward: dx = d LN / dx (overwritten, or added into dx when accumulate: the residual);
//             dg, db overwritten with this call's sums. mean, rstd as the forward wrote them.
struct LayerNormParams {
  DType dtype;
  int64_t rows, width;
  double eps;
  void* x; const void* add;      // forward: x is written only when add is given
  const void* g; const void* b;
  void* y; void* mean; void* rstd;
  const void* dy; void* dx; bool accumulate; void* dg; void* db;
};

// RoPE in place on the q and k heads of qkv (batch, seq, (heads + 2 * kv_heads) * dim); the v
// heads are untouched. Pair (x[i], x[i + dim/2]) of the head at sequence index s is rotated by the
// angle with cos[s, i], sin[s, i] ((seq, dim/2) tables); inverse rotates by minus the angle.
struct RopeParams {
  DType dtype;
  int64_t batch, seq, heads, kv_heads, dim;
  void* qkv;
  const void* cos; const void* sin;
  bool inverse;
};

// Softmax cross-entropy of logits (rows, classes) against labels (rows,) in [0, classes):
//   dlogits = (softmax - onehot) * scale; loss_sum = -sum log softmax[label] (double);
//   correct = rows whose first maximum is at the label.
struct XentParams {
  DType dtype;
  int64_t rows, classes;
  const void* logits; const int64_t* labels;
  double scale;
  void* dlogits;
  double loss_sum; int64_t correct;  // outputs
};

// AdamW in place on p, m, v (n elements each); g * grad_scale is the gradient (g is not written).
//   m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p *= 1 - lr wd; p -= lr / c1 * m / (sqrt(v / c2) + eps)
struct AdamWParams {
  DType dtype;
  int64_t n;
  void* p; const void* g; void* m; void* v;
  double lr, beta1, beta2, eps, weight_decay, grad_scale, c1, c2;
};

// sum of a[i]^2 over n elements, accumulated in double in fixed blocks summed in order, so the
// result does not depend on the thread count (every rank then clips by the same norm).
struct SumSquaresParams {
  DType dtype;
  int64_t n;
  const void* a;
  double result;  // output
};

// Linear layer on gemm.hpp: forward y = x w + b; backward dx = dy w^T (skipped when dx is null),
// dw = x^T dy, db = colsum dy (dw, db overwritten). x (rows, in), w (in, out), y / dy (rows, out).
struct LinearParams {
  DType dtype;
  int64_t rows, in, out;
  const void* x; const void* w; const void* b;
  void* y;
  const void* dy; void* dx; void* dw; void* db;
};

// Embedding gradient: dw (vocab, width) OVERWRITTEN with dw[v] = sum of the rows dy[t] (rows, width)
// whose ids[t] == v (zero rows for ids that never occur). ids in [0, vocab) (the binding checks).
struct EmbeddingParams {
  DType dtype;
  int64_t rows, vocab, width;
  const int64_t* ids; const void* dy;
  void* dw;
};

// Each ISA build (attention.cpp, ffn.cpp, layernorm.cpp, rope.cpp, xent.cpp, adamw.cpp, linear.cpp, embedding.cpp compiled with RA_ISA = avx512 | avx2 | generic)
// defines these in namespace ringattn::<isa>; dispatch.cpp picks one at run time.
#define RA_DECLARE_KERNELS(isa)                                      \
  namespace isa {                                                    \
  void attention_forward(const AttnParams& p);                       \
  void attention_backward(const AttnParams& p); /* += dq, dk, dv */  \
  void attention_delta(const AttnParams& p);    /* delta = rowsum(dout*out) */ \
  void ffn_forward(const FfnParams& p);                              \
  void ffn_backward(const FfnParams& p);                             \
  void layernorm_forward(const LayerNormParams& p);                  \
  void layernorm_backward(const LayerNormParams& p);                 \
  void rope(const RopeParams& p);                                    \
  void softmax_xent(XentParams& p);                                  \
  void adamw_update(const AdamWParams& p);                           \
  void sum_squares(SumSquaresParams& p);                             \
  void linear_forward(const LinearParams& p);                        \
  void linear_backward(const LinearParams& p);                       \
  void embedding_backward(const EmbeddingParams& p);                 \
  }

RA_DECLARE_KERNELS(avx512)
RA_DECLARE_KERNELS(avx2)
RA_DECLARE_KERNELS(generic)

// Run-time dispatch (dispatch.cpp).
void attention_forward(const AttnParams& p);
void attention_backward(const AttnParams& p);
void attention_delta(const AttnParams& p);
void ffn_forward(const FfnParams& p);
void ffn_backward(const FfnParams& p);
void layernorm_forward(const LayerNormParams& p);
void layernorm_backward(const LayerNormParams& p);
void rope(const RopeParams& p);
void softmax_xent(XentParams& p);
void adamw_update(const AdamWParams& p);
void sum_squares(SumSquaresParams& p);
void linear_forward(const LinearParams& p);
void linear_backward(const LinearParams& p);
void embedding_backward(const EmbeddingParams& p);
const char* active_isa();   // "avx512" | "avx2" | "generic"
const char* built_isas();   // comma-separated list compiled into this module

}  // namespace ringattn
