// pybind11 bindings of the CPU kernels. This file and attn_params.hpp (the checks shared with the
// CUDA bindings) are the one place that validates inputs: every array's dtype, rank, shape
// agreement, strides and writability is checked with an explicit message, then one plain params
// struct (kernels.hpp) is filled and the GIL released.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>
#include <vector>

#include "attn_params.hpp"
#include "kernels.hpp"

namespace py = pybind11;
using ringattn::AttnParams;
using ringattn::DType;
using ringattn::FfnParams;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// A validated view of a NumPy array: pointer, shape, element strides; innermost axis contiguous.
struct View {
  void* ptr = nullptr;
  std::vector<int64_t> shape, stride;
  int64_t s(int i) const { return stride[i]; }
  int64_t n(int i) const { return shape[i]; }
};

DType dtype_of(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::f32;
  if (a.dtype().is(py::dtype::of<double>())) return DType::f64;
  fail(std::string(name) + ": unsupported dtype " + std::string(py::str(a.dtype())) +
       " (the CPU kernels take float32 or float64)");
}

View view(const py::array& a, const char* name, int ndim, DType dt, bool writable) {
  if (a.ndim() != ndim)
    fail(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " + std::to_string(a.ndim()));
  if (dtype_of(a, name) != dt)
    fail(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) + " differs from the other inputs");
  if (writable && !a.writeable()) fail(std::string(name) + ": output array is read-only");
  View v;
  v.ptr = const_cast<void*>(a.data());
  const int64_t item = a.itemsize();
  for (int i = 0; i < ndim; ++i) {
    if (a.strides(i) % item) fail(std::string(name) + ": strides must be multiples of the item size");
    v.shape.push_back(a.shape(i));
    v.stride.push_back(a.strides(i) / item);
  }
  if (ndim && a.size() > 0 && v.shape[ndim - 1] > 1 && v.stride[ndim - 1] != 1)
    fail(std::string(name) + ": the last axis must be contiguous (use numpy.ascontiguousarray)");
  return v;
}

void expect_shape(const View& v, const char* name, std::vector<int64_t> want) {
  ringattn::expect_shape(name, v.shape, want);
}

// Checks for q, k, v, the positions and the window (the common part in attn_params.hpp).
AttnParams attn_params(const py::array& q, const py::array& k, const py::array& v, int64_t q_start,
                       int64_t q_stride, int64_t k_start, int64_t k_stride, bool causal, double scale,
                       int64_t window_left, int64_t window_right) {
  AttnParams p{};
  p.dtype = dtype_of(q, "q");
  View Q = view(q, "q", 4, p.dtype, false), K = view(k, "k", 4, p.dtype, false), V = view(v, "v", 4, p.dtype, false);
  ringattn::fill_attention(p, Q, K, V, q_start, q_stride, k_start, k_stride, causal, window_left, window_right, scale);
  return p;
}

void set_lse(AttnParams& p, const py::array& lse, const char* name, bool writable, void*& ptr, int64_t& sb, int64_t& sh) {
  View L = view(lse, name, 3, p.dtype, writable);
  expect_shape(L, name, {p.batch, p.heads, p.seq_q});
  ptr = L.ptr; sb = L.s(0); sh = L.s(1);
}

void attention_forward(py::array q, py::array k, py::array v, py::array out, py::array lse, int64_t q_start,
                       int64_t q_stride, int64_t k_start, int64_t k_stride, bool causal, double scale, bool accumulate,
                       int64_t window_left, int64_t window_right) {
  AttnParams p = attn_params(q, k, v, q_start, q_stride, k_start, k_stride, causal, scale, window_left, window_right);
  View O = view(out, "out", 4, p.dtype, true);
  expect_shape(O, "out", {p.batch, p.seq_q, p.heads, p.dim});
  p.out = O.ptr; p.o_sb = O.s(0); p.o_ss = O.s(1); p.o_sh = O.s(2);
  set_lse(p, lse, "lse", true, p.lse, p.l_sb, p.l_sh);
  p.accumulate = accumulate;
  py::gil_scoped_release nogil;
  ringattn::attention_forward(p);
}

void attention_backward(py::array dout, py::array q, py::array k, py::array v, py::array lse, py::array delta,
                        py::array dq, py::array dk, py::array dv, int64_t q_start, int64_t q_stride,
                        int64_t k_start, int64_t k_stride, bool causal, double scale, int64_t window_left,
                        int64_t window_right) {
  AttnParams p = attn_params(q, k, v, q_start, q_stride, k_start, k_stride, causal, scale, window_left, window_right);
  View dO = view(dout, "dout", 4, p.dtype, false);
  expect_shape(dO, "dout", {p.batch, p.seq_q, p.heads, p.dim});
  p.dout = dO.ptr; p.do_sb = dO.s(0); p.do_ss = dO.s(1); p.do_sh = dO.s(2);
  set_lse(p, lse, "lse", false, p.lse, p.l_sb, p.l_sh);
  void* dptr = nullptr;
  set_lse(p, delta, "delta", false, dptr, p.d_sb, p.d_sh);
  p.delta = dptr;
  View dQ = view(dq, "dq", 4, p.dtype, true), dK = view(dk, "dk", 4, p.dtype, true), dV = view(dv, "dv", 4, p.dtype, true);
  expect_shape(dQ, "dq", {p.batch, p.seq_q, p.heads, p.dim});
  expect_shape(dK, "dk", {p.batch, p.seq_k, p.heads_kv, p.dim});
  expect_shape(dV, "dv", {p.batch, p.seq_k, p.heads_kv, p.dim});
  p.dq = dQ.ptr; p.dq_sb = dQ.s(0); p.dq_ss = dQ.s(1); p.dq_sh = dQ.s(2);
  p.dk = dK.ptr; p.dk_sb = dK.s(0); p.dk_ss = dK.s(1); p.dk_sh = dK.s(2);
  p.dv = dV.ptr; p.dv_sb = dV.s(0); p.dv_ss = dV.s(1); p.dv_sh = dV.s(2);
  py::gil_scoped_release nogil;
  ringattn::attention_backward(p);
}

void attention_delta(py::array dout, py::array out, py::array delta) {
  AttnParams p{};
  p.dtype = dtype_of(out, "out");
  View O = view(out, "out", 4, p.dtype, false), dO = view(dout, "dout", 4, p.dtype, false);
  expect_shape(dO, "dout", O.shape);
  p.batch = O.n(0); p.seq_q = O.n(1); p.heads = O.n(2); p.dim = O.n(3);
  p.out = O.ptr; p.o_sb = O.s(0); p.o_ss = O.s(1); p.o_sh = O.s(2);
  p.dout = dO.ptr; p.do_sb = dO.s(0); p.do_ss = dO.s(1); p.do_sh = dO.s(2);
  void* dptr = nullptr;
  set_lse(p, delta, "delta", true, dptr, p.d_sb, p.d_sh);
  p.delta = dptr;
  py::gil_scoped_release nogil;
  ringattn::attention_delta(p);
}

FfnParams ffn_params(const py::array& x, const py::array& w1, const py::array& b1, const py::array& w2,
                     const py::array& b2, int64_t chunk) {
  FfnParams p{};
  p.dtype = dtype_of(x, "x");
  View X = view(x, "x", 2, p.dtype, false), W1 = view(w1, "w1", 2, p.dtype, false);
  p.tokens = X.n(0); p.width = X.n(1); p.hidden = W1.n(1);
  expect_shape(W1, "w1", {p.width, p.hidden});
  View B1 = view(b1, "b1", 1, p.dtype, false), W2 = view(w2, "w2", 2, p.dtype, false), B2 = view(b2, "b2", 1, p.dtype, false);
  expect_shape(B1, "b1", {p.hidden});
  expect_shape(W2, "w2", {p.hidden, p.width});
  expect_shape(B2, "b2", {p.width});
  if (W1.s(0) != p.hidden || W2.s(0) != p.width) fail("w1, w2 must be C-contiguous");
  if (chunk < 1) fail("chunk must be >= 1, got " + std::to_string(chunk));
  p.chunk = chunk;
  p.x = X.ptr; p.x_s = X.s(0); p.w1 = W1.ptr; p.b1 = B1.ptr; p.w2 = W2.ptr; p.b2 = B2.ptr;
  return p;
}

void ffn_forward(py::array x, py::array w1, py::array b1, py::array w2, py::array b2, py::array y, int64_t chunk) {
  FfnParams p = ffn_params(x, w1, b1, w2, b2, chunk);
  View Y = view(y, "y", 2, p.dtype, true);
  expect_shape(Y, "y", {p.tokens, p.width});
  p.y = Y.ptr; p.y_s = Y.s(0);
  py::gil_scoped_release nogil;
  ringattn::ffn_forward(p);
}

void ffn_backward(py::array x, py::array w1, py::array b1, py::array w2, py::array b2, py::array dy, py::array dx,
                  py::array dw1, py::array db1, py::array dw2, py::array db2, int64_t chunk, bool accumulate) {
  FfnParams p = ffn_params(x, w1, b1, w2, b2, chunk);
  View dY = view(dy, "dy", 2, p.dtype, false), dX = view(dx, "dx", 2, p.dtype, true);
  expect_shape(dY, "dy", {p.tokens, p.width});
  expect_shape(dX, "dx", {p.tokens, p.width});
  View dW1 = view(dw1, "dw1", 2, p.dtype, true), dB1 = view(db1, "db1", 1, p.dtype, true);
  View dW2 = view(dw2, "dw2", 2, p.dtype, true), dB2 = view(db2, "db2", 1, p.dtype, true);
  expect_shape(dW1, "dw1", {p.width, p.hidden});
  expect_shape(dB1, "db1", {p.hidden});
  expect_shape(dW2, "dw2", {p.hidden, p.width});
  expect_shape(dB2, "db2", {p.width});
  if (dW1.s(0) != p.hidden || dW2.s(0) != p.width) fail("dw1, dw2 must be C-contiguous");
  p.dy = dY.ptr; p.dy_s = dY.s(0); p.dx = dX.ptr; p.dx_s = dX.s(0);
  p.dw1 = dW1.ptr; p.db1 = dB1.ptr; p.dw2 = dW2.ptr; p.db2 = dB2.ptr;
  p.accumulate = accumulate;
  py::gil_scoped_release nogil;
  ringattn::ffn_backward(p);
}

// ---- the rest of a training step (issue 16): C-contiguous arrays only --------------------------
View dense(const py::array& a, const char* name, int ndim, DType dt, bool writable) {
  View v = view(a, name, ndim, dt, writable);
  if (!(a.flags() & py::array::c_style))
    fail(std::string(name) + ": must be C-contiguous (use numpy.ascontiguousarray)");
  return v;
}

using ringattn::AdamWParams;
using ringattn::LayerNormParams;
using ringattn::RopeParams;
using ringattn::SumSquaresParams;
using ringattn::XentParams;

// x (rows, width), g, b (width,), mean, rstd (rows,): the arrays forward and backward share.
LayerNormParams layernorm_params(const py::array& x, const py::array& g, const py::array& mean,
                                 const py::array& rstd, bool x_writable, bool stats_writable) {
  LayerNormParams p{};
  p.dtype = dtype_of(x, "x");
  View X = dense(x, "x", 2, p.dtype, x_writable), G = dense(g, "g", 1, p.dtype, false);
  p.rows = X.n(0); p.width = X.n(1);
  expect_shape(G, "g", {p.width});
  View M = dense(mean, "mean", 1, p.dtype, stats_writable), R = dense(rstd, "rstd", 1, p.dtype, stats_writable);
  expect_shape(M, "mean", {p.rows});
  expect_shape(R, "rstd", {p.rows});
  p.x = X.ptr; p.g = G.ptr; p.mean = M.ptr; p.rstd = R.ptr;
  return p;
}

void layernorm_forward(py::array x, py::array g, py::array b, py::array y, py::array mean, py::array rstd,
                       double eps, py::object add) {
  const bool residual = !add.is_none();
  LayerNormParams p = layernorm_params(x, g, mean, rstd, residual, true);
  if (!(eps >= 0)) fail("eps must be >= 0, got " + std::to_string(eps));
  p.eps = eps;
  View B = dense(b, "b", 1, p.dtype, false), Y = dense(y, "out", 2, p.dtype, true);
  expect_shape(B, "b", {p.width});
  expect_shape(Y, "out", {p.rows, p.width});
  p.b = B.ptr; p.y = Y.ptr;
  if (residual) {
    View A = dense(add.cast<py::array>(), "a", 2, p.dtype, false);
    expect_shape(A, "a", {p.rows, p.width});
    p.add = A.ptr;
  }
  py::gil_scoped_release nogil;
  ringattn::layernorm_forward(p);
}

void layernorm_backward(py::array dy, py::array x, py::array g, py::array mean, py::array rstd, py::array dg,
                        py::array db, py::array dx, bool accumulate) {
  LayerNormParams p = layernorm_params(x, g, mean, rstd, false, false);
  View dY = dense(dy, "dy", 2, p.dtype, false), dX = dense(dx, accumulate ? "residual" : "dx", 2, p.dtype, true);
  expect_shape(dY, "dy", {p.rows, p.width});
  expect_shape(dX, accumulate ? "residual" : "dx", {p.rows, p.width});
  View dG = dense(dg, "dg", 1, p.dtype, true), dB = dense(db, "db", 1, p.dtype, true);
  expect_shape(dG, "dg", {p.width});
  expect_shape(dB, "db", {p.width});
  p.dy = dY.ptr; p.dx = dX.ptr; p.accumulate = accumulate; p.dg = dG.ptr; p.db = dB.ptr;
  py::gil_scoped_release nogil;
  ringattn::layernorm_backward(p);
}

void rope(py::array qkv, py::array cos, py::array sin, int64_t heads, int64_t kv_heads, int64_t head_dim,
          bool inverse) {
  RopeParams p{};
  p.dtype = dtype_of(qkv, "qkv");
  View Q = dense(qkv, "qkv", 3, p.dtype, true);
  if (heads < 1 || kv_heads < 1) fail("heads and kv_heads must be >= 1, got " + std::to_string(heads) + ", " +
                                      std::to_string(kv_heads));
  if (head_dim < 2 || head_dim % 2) fail("RoPE needs an even head_dim >= 2, got " + std::to_string(head_dim));
  p.batch = Q.n(0); p.seq = Q.n(1); p.heads = heads; p.kv_heads = kv_heads; p.dim = head_dim;
  expect_shape(Q, "qkv", {p.batch, p.seq, (heads + 2 * kv_heads) * head_dim});
  View C = dense(cos, "cos", 2, p.dtype, false), S = dense(sin, "sin", 2, p.dtype, false);
  expect_shape(C, "cos", {p.seq, head_dim / 2});
  expect_shape(S, "sin", {p.seq, head_dim / 2});
  p.qkv = Q.ptr; p.cos = C.ptr; p.sin = S.ptr; p.inverse = inverse;
  py::gil_scoped_release nogil;
  ringattn::rope(p);
}

py::tuple softmax_xent(py::array logits, py::array labels, double scale, py::array dlogits) {
  XentParams p{};
  p.dtype = dtype_of(logits, "logits");
  View Z = dense(logits, "logits", 2, p.dtype, false), D = dense(dlogits, "out", 2, p.dtype, true);
  p.rows = Z.n(0); p.classes = Z.n(1);
  expect_shape(D, "out", {p.rows, p.classes});
  const char kind = labels.dtype().kind();
  if (kind != 'i' && kind != 'u')
    fail("labels: expected an integer dtype, got " + std::string(py::str(labels.dtype())));
  if (labels.ndim() != 1 || labels.shape(0) != p.rows)
    fail("labels: expected shape (" + std::to_string(p.rows) + ",) to match logits " +
         ringattn::shape_str({p.rows, p.classes}));
  auto lab = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(labels);
  const int64_t* l = lab.data();
  if (p.classes < 1 && p.rows > 0) fail("logits: need at least one class");
  for (int64_t i = 0; i < p.rows; ++i)
    if (l[i] < 0 || l[i] >= p.classes)
      fail("labels must be in [0, " + std::to_string(p.classes) + "), got " + std::to_string(l[i]) + " at row " +
           std::to_string(i));
  p.logits = Z.ptr; p.labels = l; p.scale = scale; p.dlogits = D.ptr;
  {
    py::gil_scoped_release nogil;
    ringattn::softmax_xent(p);
  }
  return py::make_tuple(p.loss_sum, p.correct);
}

void adamw_update(py::array p_, py::array g, py::array m, py::array v, double lr, double beta1, double beta2,
                  double eps, double weight_decay, int64_t step, double grad_scale) {
  AdamWParams p{};
  p.dtype = dtype_of(p_, "p");
  View P = dense(p_, "p", 1, p.dtype, true), G = dense(g, "g", 1, p.dtype, false);
  View M = dense(m, "m", 1, p.dtype, true), V = dense(v, "v", 1, p.dtype, true);
  p.n = P.n(0);
  expect_shape(G, "g", {p.n});
  expect_shape(M, "m", {p.n});
  expect_shape(V, "v", {p.n});
  if (step < 1) fail("step must be >= 1 (the 1-based step), got " + std::to_string(step));
  p.p = P.ptr; p.g = G.ptr; p.m = M.ptr; p.v = V.ptr;
  p.lr = lr; p.beta1 = beta1; p.beta2 = beta2; p.eps = eps; p.weight_decay = weight_decay; p.grad_scale = grad_scale;
  p.c1 = 1.0 - std::pow(beta1, double(step));  // bias corrections
  p.c2 = 1.0 - std::pow(beta2, double(step));
  py::gil_scoped_release nogil;
  ringattn::adamw_update(p);
}

double sum_squares(py::array a) {
  SumSquaresParams p{};
  p.dtype = dtype_of(a, "a");
  View A = dense(a, "a", int(a.ndim()), p.dtype, false);
  p.n = a.size();
  p.a = A.ptr;
  py::gil_scoped_release nogil;
  ringattn::sum_squares(p);
  return p.result;
}

using ringattn::LinearParams;

LinearParams linear_params(const py::array& x, const py::array& w) {
  LinearParams p{};
  p.dtype = dtype_of(x, "x");
  View X = dense(x, "x", 2, p.dtype, false), W = dense(w, "w", 2, p.dtype, false);
  p.rows = X.n(0); p.in = X.n(1); p.out = W.n(1);
  expect_shape(W, "w", {p.in, p.out});
  p.x = X.ptr; p.w = W.ptr;
  return p;
}

void linear_forward(py::array x, py::array w, py::array b, py::array y) {
  LinearParams p = linear_params(x, w);
  View B = dense(b, "b", 1, p.dtype, false), Y = dense(y, "out", 2, p.dtype, true);
  expect_shape(B, "b", {p.out});
  expect_shape(Y, "out", {p.rows, p.out});
  p.b = B.ptr; p.y = Y.ptr;
  py::gil_scoped_release nogil;
  ringattn::linear_forward(p);
}

void linear_backward(py::array dy, py::array x, py::array w, py::object dx, py::array dw, py::array db) {
  LinearParams p = linear_params(x, w);
  View dY = dense(dy, "dy", 2, p.dtype, false);
  expect_shape(dY, "dy", {p.rows, p.out});
  View dW = dense(dw, "dw", 2, p.dtype, true), dB = dense(db, "db", 1, p.dtype, true);
  expect_shape(dW, "dw", {p.in, p.out});
  expect_shape(dB, "db", {p.out});
  p.dy = dY.ptr; p.dw = dW.ptr; p.db = dB.ptr;
  if (!dx.is_none()) {
    View dX = dense(dx.cast<py::array>(), "dx", 2, p.dtype, true);
    expect_shape(dX, "dx", {p.rows, p.in});
    p.dx = dX.ptr;
  }
  py::gil_scoped_release nogil;
  ringattn::linear_backward(p);
}

using ringattn::EmbeddingParams;

// ids (rows,) any integer dtype, checked in [0, vocab); dy (rows, width); dw (vocab, width) written.
void embedding_backward(py::array ids, py::array dy, py::array dw) {
  EmbeddingParams p{};
  p.dtype = dtype_of(dy, "dy");
  View dY = dense(dy, "dy", 2, p.dtype, false), dW = dense(dw, "dw", 2, p.dtype, true);
  p.rows = dY.n(0); p.width = dY.n(1); p.vocab = dW.n(0);
  expect_shape(dW, "dw", {p.vocab, p.width});
  const char kind = ids.dtype().kind();
  if (kind != 'i' && kind != 'u') fail("ids: expected an integer dtype, got " + std::string(py::str(ids.dtype())));
  if (ids.ndim() != 1 || ids.shape(0) != p.rows)
    fail("ids: expected shape (" + std::to_string(p.rows) + ",) to match dy " + ringattn::shape_str({p.rows, p.width}));
  auto idv = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(ids);
  const int64_t* id = idv.data();
  for (int64_t i = 0; i < p.rows; ++i)
    if (id[i] < 0 || id[i] >= p.vocab)
      fail("ids must be in [0, " + std::to_string(p.vocab) + ") (the rows of dw), got " + std::to_string(id[i]) +
           " at position " + std::to_string(i));
  p.ids = id; p.dy = dY.ptr; p.dw = dW.ptr;
  py::gil_scoped_release nogil;
  ringattn::embedding_backward(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "ringattn CPU kernels (blockwise attention, feed-forward and the step's LayerNorm, RoPE, "
          "cross-entropy, AdamW, Linear, embedding gradient); see cpp/kernels.hpp";
  using namespace py::literals;
  m.def("attention_forward", &attention_forward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "q_start"_a, "q_stride"_a,
        "k_start"_a, "k_stride"_a, "causal"_a, "scale"_a, "accumulate"_a, "window_left"_a = -1, "window_right"_a = -1,
        "Blockwise attention of one Q block against one K/V block; writes or merges into (out, lse).");
  m.def("attention_backward", &attention_backward, "dout"_a, "q"_a, "k"_a, "v"_a, "lse"_a, "delta"_a, "dq"_a, "dk"_a,
        "dv"_a, "q_start"_a, "q_stride"_a, "k_start"_a, "k_stride"_a, "causal"_a, "scale"_a,
        "window_left"_a = -1, "window_right"_a = -1,
        "Accumulates (+=) the gradients of one (Q block, K/V block) pair into dq, dk, dv.");
  m.def("attention_delta", &attention_delta, "dout"_a, "out"_a, "delta"_a, "delta[b, h, i] = sum_d dout * out");
  m.def("ffn_forward", &ffn_forward, "x"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a, "y"_a, "chunk"_a);
  m.def("ffn_backward", &ffn_backward, "x"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a, "dy"_a, "dx"_a, "dw1"_a, "db1"_a,
        "dw2"_a, "db2"_a, "chunk"_a, "accumulate"_a = true,
        "dx is overwritten; dw1, db1, dw2, db2 are accumulated (+=), or overwritten when not accumulate.");
  m.def("layernorm_forward", &layernorm_forward, "x"_a, "g"_a, "b"_a, "out"_a, "mean"_a, "rstd"_a, "eps"_a,
        "add"_a = py::none(), "LayerNorm of the rows of x into out, mean, rstd; add given: x += add first.");
  m.def("layernorm_backward", &layernorm_backward, "dy"_a, "x"_a, "g"_a, "mean"_a, "rstd"_a, "dg"_a, "db"_a, "dx"_a,
        "accumulate"_a, "dx overwritten (or += when accumulate); dg, db overwritten.");
  m.def("rope", &rope, "qkv"_a, "cos"_a, "sin"_a, "heads"_a, "kv_heads"_a, "head_dim"_a, "inverse"_a,
        "RoPE in place on the q and k heads of qkv (batch, seq, (heads + 2 kv_heads) head_dim).");
  m.def("softmax_xent", &softmax_xent, "logits"_a, "labels"_a, "scale"_a, "out"_a,
        "out = (softmax - onehot) * scale; returns (loss_sum, correct).");
  m.def("adamw_update", &adamw_update, "p"_a, "g"_a, "m"_a, "v"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a,
        "weight_decay"_a, "step"_a, "grad_scale"_a, "One AdamW step in place on p, m, v.");
  m.def("sum_squares", &sum_squares, "a"_a, "sum of a*a in double (independent of the thread count).");
  m.def("linear_forward", &linear_forward, "x"_a, "w"_a, "b"_a, "out"_a, "out = x @ w + b.");
  m.def("linear_backward", &linear_backward, "dy"_a, "x"_a, "w"_a, "dx"_a, "dw"_a, "db"_a,
        "dx = dy @ w.T (dx None: skipped), dw = x.T @ dy, db = dy.sum(0); all overwritten.");
  m.def("embedding_backward", &embedding_backward, "ids"_a, "dy"_a, "dw"_a,
        "dw[v] = sum of the rows dy[t] with ids[t] == v (dw overwritten; unseen ids give zero rows).");
  m.def("active_isa", &ringattn::active_isa, "Instruction set the kernels run with on this CPU.");
  m.def("built_isas", &ringattn::built_isas, "Instruction sets compiled into this module.");
  m.def("max_threads", [] { return omp_get_max_threads(); }, "OpenMP threads the kernels use (OMP_NUM_THREADS).");
}
