// pybind11 bindings of the CUDA kernels (module ringattn._cuda). Like cpp/bindings.cpp this file (with
// cpp/attn_params.hpp, the checks both bindings share) is the one place that validates kernel inputs: dtypes, ranks, shape agreement, strides, writability,
// then (only then) that a device exists and that the pointers are device memory. It fills one plain
// params struct (cuda/kernels.hpp) and launches on the given stream.
//
// Arrays arrive as descriptors built by src/ringattn/cuda.py from __cuda_array_interface__:
//   (data pointer: int, shape: tuple, strides in bytes: tuple, dtype name: str, read-only: bool)
// Streams are cudaStream_t handles as ints (0 = the legacy default stream).
// Plain C++: compiled by the host compiler; the module links the CUDA runtime statically, so it
// imports without a GPU or driver, and every kernel call there raises "no CUDA device available".
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../cpp/attn_params.hpp"
#include "kernels.hpp"

#ifndef RA_MODULE_NAME
#define RA_MODULE_NAME _cuda
#endif

namespace py = pybind11;
using ringattn::gpu::AttnParams;
using ringattn::gpu::DType;
using ringattn::gpu::FfnParams;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

const char* dtype_name(DType t) { return t == DType::f16 ? "float16" : t == DType::bf16 ? "bfloat16" : "float32"; }
int64_t itemsize(DType t) { return t == DType::f32 ? 4 : 2; }
std::string or_f32(DType t) { return t == DType::f32 ? "float32" : std::string(dtype_name(t)) + " or float32"; }

using ringattn::shape_str;

// A validated device array: pointer, shape, element strides; innermost axis contiguous.
struct Arr {
  std::string name;
  void* ptr = nullptr;
  DType t = DType::f32;
  std::vector<int64_t> shape, stride;
  int64_t n(int i) const { return shape[i]; }
  int64_t s(int i) const { return stride[i]; }
};

Arr arr(const py::handle& h, const char* name, int ndim, bool writable) {
  Arr a;
  a.name = name;
  if (!py::isinstance<py::tuple>(h) || py::len(h) != 5)
    fail(std::string(name) + ": expected an array descriptor (ptr, shape, strides, dtype, readonly)");
  const auto d = py::reinterpret_borrow<py::tuple>(h);
  const auto ptr = d[0].cast<uintptr_t>();
  a.shape = d[1].cast<std::vector<int64_t>>();
  const auto bstride = d[2].cast<std::vector<int64_t>>();
  const auto dt = d[3].cast<std::string>();
  const bool readonly = d[4].cast<bool>();
  if (dt == "float16") a.t = DType::f16;
  else if (dt == "bfloat16") a.t = DType::bf16;
  else if (dt == "float32") a.t = DType::f32;
  else fail(std::string(name) + ": unsupported dtype " + dt + " (the CUDA kernels take float16, bfloat16 or float32)");
  if (int(a.shape.size()) != ndim)
    fail(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got shape " + shape_str(a.shape));
  if (bstride.size() != a.shape.size()) fail(std::string(name) + ": strides and shape have different lengths");
  int64_t count = 1;
  for (int i = 0; i < ndim; ++i) {
    if (a.shape[i] < 0) fail(std::string(name) + ": negative extent in shape " + shape_str(a.shape));
    if (bstride[i] % itemsize(a.t))
      fail(std::string(name) + ": stride " + std::to_string(bstride[i]) + " bytes is not a multiple of the item size");
    if (bstride[i] < 0) fail(std::string(name) + ": negative strides are not supported");
    a.stride.push_back(bstride[i] / itemsize(a.t));
    count *= a.shape[i];
  }
  if (ndim && a.shape[ndim - 1] > 1 && a.stride[ndim - 1] != 1)
    fail(std::string(name) + ": the last axis must be contiguous (use cupy.ascontiguousarray)");
  if (count > 0 && ptr == 0) fail(std::string(name) + ": null data pointer");
  if (writable && readonly) fail(std::string(name) + ": output array is read-only");
  a.ptr = reinterpret_cast<void*>(ptr);
  return a;
}

void expect_shape(const Arr& a, const std::vector<int64_t>& want) {
  if (a.shape != want) fail(a.name + ": shape " + shape_str(a.shape) + " but expected " + shape_str(want));
}
void expect_dtype(const Arr& a, DType t, const char* why) {
  if (a.t != t) fail(a.name + ": dtype " + dtype_name(a.t) + " but " + why + " " + dtype_name(t));
}

// Called after validation, before any launch: a clear error instead of a crash without a GPU, and
// host pointers (NumPy memory, fake device arrays) are refused before a kernel could touch them.
void require_device(std::initializer_list<const Arr*> arrays) {
  if (ringattn::gpu::device_count() == 0)
    throw std::runtime_error(std::string("no CUDA device available: ") + ringattn::gpu::device_error() +
                             " (ringattn._cuda needs an NVIDIA GPU and driver; pass NumPy arrays for the CPU kernels)");
  for (const Arr* a : arrays)
    if (a->ptr && !ringattn::gpu::is_device_pointer(a->ptr))
      fail(a->name + ": data pointer is not CUDA device memory (pass CuPy arrays)");
}

void* stream_of(uintptr_t s) { return reinterpret_cast<void*>(s); }

// Checks for q, k, v, the positions and the window (the common part in cpp/attn_params.hpp).
AttnParams attn_params(Arr& Q, Arr& K, Arr& V, int64_t q_start, int64_t q_stride, int64_t k_start,
                       int64_t k_stride, bool causal, double scale, int64_t window_left, int64_t window_right,
                       uintptr_t stream) {
  AttnParams p{};
  p.dtype = Q.t;
  expect_dtype(K, p.dtype, "q has");
  expect_dtype(V, p.dtype, "q has");
  ringattn::fill_attention(p, Q, K, V, q_start, q_stride, k_start, k_stride, causal, window_left, window_right, scale);
  if (p.batch > 65535 || p.heads > 65535) fail("batch and heads must be <= 65535 (CUDA grid limit)");
  p.stream = stream_of(stream);
  return p;
}

Arr stats(const py::handle& h, const char* name, const AttnParams& p, bool writable) {  // lse, delta
  Arr a = arr(h, name, 3, writable);
  expect_dtype(a, DType::f32, "the kernels keep it in");
  expect_shape(a, {p.batch, p.heads, p.seq_q});
  return a;
}

Arr grad(const py::handle& h, const char* name, std::vector<int64_t> shape) {  // dq, dk, dv
  Arr a = arr(h, name, 4, true);
  if (a.t != DType::f32)
    fail(a.name + ": the CUDA backward accumulates into float32 arrays (got " + dtype_name(a.t) +
         "); allocate dq, dk, dv as float32 and cast at the end");
  expect_shape(a, shape);
  return a;
}

void attention_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse, int64_t q_start,
                       int64_t q_stride, int64_t k_start, int64_t k_stride, bool causal, double scale,
                       bool accumulate, uintptr_t stream, int64_t window_left, int64_t window_right) {
  Arr Q = arr(q, "q", 4, false), K = arr(k, "k", 4, false), V = arr(v, "v", 4, false);
  AttnParams p = attn_params(Q, K, V, q_start, q_stride, k_start, k_stride, causal, scale, window_left, window_right,
                             stream);
  Arr O = arr(out, "out", 4, true);
  if (O.t != p.dtype && O.t != DType::f32)
    fail(std::string("out: dtype ") + dtype_name(O.t) + " but expected " + or_f32(p.dtype));
  expect_shape(O, {p.batch, p.seq_q, p.heads, p.dim});
  Arr L = stats(lse, "lse", p, true);
  p.out_dtype = O.t;
  p.out = O.ptr; p.o_sb = O.s(0); p.o_ss = O.s(1); p.o_sh = O.s(2);
  p.lse = static_cast<float*>(L.ptr); p.l_sb = L.s(0); p.l_sh = L.s(1);
  p.accumulate = accumulate;
  require_device({&Q, &K, &V, &O, &L});
  py::gil_scoped_release nogil;
  ringattn::gpu::attention_forward(p);
}

void attention_delta(py::handle dout, py::handle out, py::handle delta, uintptr_t stream) {
  Arr dO = arr(dout, "dout", 4, false), O = arr(out, "out", 4, false);
  expect_shape(dO, O.shape);
  if (O.t != dO.t && O.t != DType::f32)
    fail(std::string("out: dtype ") + dtype_name(O.t) + " but expected " + or_f32(dO.t));
  AttnParams p{};
  p.dtype = dO.t; p.out_dtype = O.t;
  p.batch = O.n(0); p.seq_q = O.n(1); p.heads = O.n(2); p.dim = O.n(3);
  p.out = O.ptr; p.o_sb = O.s(0); p.o_ss = O.s(1); p.o_sh = O.s(2);
  p.dout = dO.ptr; p.do_sb = dO.s(0); p.do_ss = dO.s(1); p.do_sh = dO.s(2);
  Arr D = stats(delta, "delta", p, true);
  p.delta = static_cast<float*>(D.ptr); p.d_sb = D.s(0); p.d_sh = D.s(1);
  p.stream = stream_of(stream);
  require_device({&dO, &O, &D});
  py::gil_scoped_release nogil;
  ringattn::gpu::attention_delta(p);
}

void attention_backward(py::handle dout, py::handle q, py::handle k, py::handle v, py::handle lse, py::handle delta,
                        py::handle dq, py::handle dk, py::handle dv, int64_t q_start, int64_t q_stride,
                        int64_t k_start, int64_t k_stride, bool causal, double scale, uintptr_t stream,
                        int64_t window_left, int64_t window_right) {
  Arr Q = arr(q, "q", 4, false), K = arr(k, "k", 4, false), V = arr(v, "v", 4, false);
  AttnParams p = attn_params(Q, K, V, q_start, q_stride, k_start, k_stride, causal, scale, window_left, window_right,
                             stream);
  Arr dO = arr(dout, "dout", 4, false);
  expect_dtype(dO, p.dtype, "q has");
  expect_shape(dO, Q.shape);
  Arr L = stats(lse, "lse", p, false), D = stats(delta, "delta", p, false);
  Arr dQ = grad(dq, "dq", Q.shape), dK = grad(dk, "dk", K.shape), dV = grad(dv, "dv", K.shape);
  p.dout = dO.ptr; p.do_sb = dO.s(0); p.do_ss = dO.s(1); p.do_sh = dO.s(2);
  p.lse = static_cast<float*>(L.ptr); p.l_sb = L.s(0); p.l_sh = L.s(1);
  p.delta = static_cast<float*>(D.ptr); p.d_sb = D.s(0); p.d_sh = D.s(1);
  p.dq = static_cast<float*>(dQ.ptr); p.dq_sb = dQ.s(0); p.dq_ss = dQ.s(1); p.dq_sh = dQ.s(2);
  p.dk = static_cast<float*>(dK.ptr); p.dk_sb = dK.s(0); p.dk_ss = dK.s(1); p.dk_sh = dK.s(2);
  p.dv = static_cast<float*>(dV.ptr); p.dv_sb = dV.s(0); p.dv_ss = dV.s(1); p.dv_sh = dV.s(2);
  require_device({&Q, &K, &V, &dO, &L, &D, &dQ, &dK, &dV});
  py::gil_scoped_release nogil;
  ringattn::gpu::attention_backward(p);
}

// FFN: x (tokens, width), w1 (width, hidden), b1 (hidden), w2 (hidden, width), b2 (width), all one
// dtype; w1, w2 C-contiguous; work: float32, at least `need` elements.
struct Ffn {
  FfnParams p{};
  std::vector<Arr> arrays;
};

Ffn ffn_params(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2, py::handle work,
               int64_t chunk, int64_t work_chunks, uintptr_t stream) {
  Ffn f;
  FfnParams& p = f.p;
  Arr X = arr(x, "x", 2, false), W1 = arr(w1, "w1", 2, false), B1 = arr(b1, "b1", 1, false);
  Arr W2 = arr(w2, "w2", 2, false), B2 = arr(b2, "b2", 1, false), Wk = arr(work, "work", 1, true);
  p.dtype = X.t;
  for (const Arr* a : {&W1, &B1, &W2, &B2}) expect_dtype(*a, p.dtype, "x has");
  p.tokens = X.n(0); p.width = X.n(1); p.hidden = W1.n(1);
  if (p.width < 1 || p.hidden < 1) fail("width and hidden must be >= 1");
  expect_shape(W1, {p.width, p.hidden});
  expect_shape(B1, {p.hidden});
  expect_shape(W2, {p.hidden, p.width});
  expect_shape(B2, {p.width});
  if (W1.s(0) != p.hidden || W2.s(0) != p.width) fail("w1, w2 must be C-contiguous");
  if (chunk < 1) fail("chunk must be >= 1, got " + std::to_string(chunk));
  expect_dtype(Wk, DType::f32, "the workspace must be");
  if (Wk.n(0) < work_chunks * chunk * p.hidden)
    fail("work: " + std::to_string(Wk.n(0)) + " elements but the kernels need " +
         std::to_string(work_chunks * chunk * p.hidden) + " (" + std::to_string(work_chunks) + " x chunk x hidden)");
  p.chunk = chunk;
  p.x = X.ptr; p.x_s = X.s(0); p.w1 = W1.ptr; p.b1 = B1.ptr; p.w2 = W2.ptr; p.b2 = B2.ptr;
  p.work = static_cast<float*>(Wk.ptr);
  p.stream = stream_of(stream);
  f.arrays = {X, W1, B1, W2, B2, Wk};
  return f;
}

void require_all(const std::vector<Arr>& arrays) {
  if (ringattn::gpu::device_count() == 0) require_device({});
  for (const Arr& a : arrays) require_device({&a});
}

void ffn_forward(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2, py::handle y,
                 py::handle work, int64_t chunk, uintptr_t stream) {
  Ffn f = ffn_params(x, w1, b1, w2, b2, work, chunk, 1, stream);
  Arr Y = arr(y, "y", 2, true);
  expect_dtype(Y, f.p.dtype, "x has");
  expect_shape(Y, {f.p.tokens, f.p.width});
  f.p.y = Y.ptr; f.p.y_s = Y.s(0);
  f.arrays.push_back(Y);
  require_all(f.arrays);
  py::gil_scoped_release nogil;
  ringattn::gpu::ffn_forward(f.p);
}

void ffn_backward(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2, py::handle dy,
                  py::handle dx, py::handle dw1, py::handle db1, py::handle dw2, py::handle db2, py::handle work,
                  int64_t chunk, uintptr_t stream) {
  Ffn f = ffn_params(x, w1, b1, w2, b2, work, chunk, 2, stream);
  FfnParams& p = f.p;
  Arr dY = arr(dy, "dy", 2, false), dX = arr(dx, "dx", 2, true);
  expect_dtype(dY, p.dtype, "x has");
  expect_dtype(dX, p.dtype, "x has");
  expect_shape(dY, {p.tokens, p.width});
  expect_shape(dX, {p.tokens, p.width});
  Arr dW1 = arr(dw1, "dw1", 2, true), dB1 = arr(db1, "db1", 1, true);
  Arr dW2 = arr(dw2, "dw2", 2, true), dB2 = arr(db2, "db2", 1, true);
  p.grad_dtype = dW1.t;
  if (p.grad_dtype != p.dtype && p.grad_dtype != DType::f32)
    fail(std::string("dw1: dtype ") + dtype_name(dW1.t) + " but expected " + or_f32(p.dtype));
  for (const Arr* a : {&dB1, &dW2, &dB2}) expect_dtype(*a, p.grad_dtype, "dw1 has");
  expect_shape(dW1, {p.width, p.hidden});
  expect_shape(dB1, {p.hidden});
  expect_shape(dW2, {p.hidden, p.width});
  expect_shape(dB2, {p.width});
  if (dW1.s(0) != p.hidden || dW2.s(0) != p.width) fail("dw1, dw2 must be C-contiguous");
  p.dy = dY.ptr; p.dy_s = dY.s(0); p.dx = dX.ptr; p.dx_s = dX.s(0);
  p.dw1 = dW1.ptr; p.db1 = dB1.ptr; p.dw2 = dW2.ptr; p.db2 = dB2.ptr;
  for (const Arr& a : {dY, dX, dW1, dB1, dW2, dB2}) f.arrays.push_back(a);
  require_all(f.arrays);
  py::gil_scoped_release nogil;
  ringattn::gpu::ffn_backward(p);
}

}  // namespace

PYBIND11_MODULE(RA_MODULE_NAME, m) {
  m.doc() = "ringattn CUDA kernels (blockwise attention and feed-forward); see cuda/kernels.hpp. "
            "Arrays are (ptr, shape, byte strides, dtype name, readonly) descriptors; use ringattn.cuda.";
  using namespace py::literals;
  m.def("attention_forward", &attention_forward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "q_start"_a, "q_stride"_a,
        "k_start"_a, "k_stride"_a, "causal"_a, "scale"_a, "accumulate"_a, "stream"_a, "window_left"_a = -1,
        "window_right"_a = -1,
        "Attention of one Q block against one K/V block; writes or merges into (out, lse).");
  m.def("attention_delta", &attention_delta, "dout"_a, "out"_a, "delta"_a, "stream"_a,
        "delta[b, h, i] = sum_d dout * out (float32).");
  m.def("attention_backward", &attention_backward, "dout"_a, "q"_a, "k"_a, "v"_a, "lse"_a, "delta"_a, "dq"_a, "dk"_a,
        "dv"_a, "q_start"_a, "q_stride"_a, "k_start"_a, "k_stride"_a, "causal"_a, "scale"_a, "stream"_a,
        "window_left"_a = -1, "window_right"_a = -1,
        "Accumulates (+=) the gradients of one (Q block, K/V block) pair into float32 dq, dk, dv.");
  m.def("ffn_forward", &ffn_forward, "x"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a, "y"_a, "work"_a, "chunk"_a, "stream"_a);
  m.def("ffn_backward", &ffn_backward, "x"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a, "dy"_a, "dx"_a, "dw1"_a, "db1"_a,
        "dw2"_a, "db2"_a, "work"_a, "chunk"_a, "stream"_a, "dx is overwritten; dw1, db1, dw2, db2 are accumulated.");
  m.def("device_count", &ringattn::gpu::device_count, "CUDA devices visible (0 without a GPU or driver; never raises).");
  m.def("device_error", &ringattn::gpu::device_error, "Why device_count() is 0, or ''.");
  m.def("archs", [] {
    std::vector<std::string> out;
    std::string s = ringattn::gpu::compiled_archs();
    size_t at = 0;
    while (at <= s.size()) {
      size_t end = s.find_first_of(";,", at);
      if (end == std::string::npos) end = s.size();
      if (end > at) out.push_back(s.substr(at, end - at));
      at = end + 1;
    }
    return out;
  }, "GPU architectures compiled into this module, e.g. ['80', '90'].");
  m.def("stream_wait", [](uintptr_t consumer, uintptr_t producer) {
    if (ringattn::gpu::device_count() == 0) require_device({});
    ringattn::gpu::stream_wait(stream_of(consumer), stream_of(producer));
  }, "consumer"_a, "producer"_a, "Make `consumer` wait for the work queued so far on `producer`.");
  m.def("synchronize", [](uintptr_t s) {
    if (ringattn::gpu::device_count() == 0) require_device({});
    py::gil_scoped_release nogil;
    ringattn::gpu::synchronize(stream_of(s));
  }, "stream"_a);
#ifdef RA_EMULATE
  m.attr("emulated") = true;
  m.def("emulated_launches", [] {  // tensor-core dispatch tests: which kernels ran
    py::dict d;
    for (const auto& [name, n] : ringattn::gpu::emulated_launches()) d[py::str(name)] = n;
    return d;
  }, "Launches so far per kernel name (emulated build only).");
#else
  m.attr("emulated") = false;
#endif
}
