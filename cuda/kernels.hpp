// ringattn CUDA kernels: plain parameter structs and host entry points (cuda/attention.cu, cuda/ffn.cu).
//
// The same contracts as the CPU kernels (cpp/kernels.hpp): every tensor is a device pointer plus
// element strides, the innermost axis contiguous; bindings.cpp validates and fills these structs,
// the kernels trust them. Differences from the CPU structs, all because of low precision:
//   - inputs are float16, bfloat16 or float32; all arithmetic and every softmax statistic is float32;
//   - lse and delta are always float32;
//   - `out` may be float32 while q is 16-bit (a float32 running accumulator for the ring);
//   - the backward accumulates (+=) into float32 dq, dk, dv (the caller casts at the end).
// This header is plain C++ (no CUDA types) so the bindings compile with the host compiler.
#pragma once
#include <cstdint>

#include "../cpp/mask.hpp"
#ifdef RA_EMULATE
#include <string>
#include <utility>
#include <vector>
#endif

namespace ringattn {
namespace gpu {

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2 };

struct AttnParams {
  DType dtype;      // q, k, v, dout
  DType out_dtype;  // out: dtype, or f32
  int64_t batch, seq_q, seq_k, heads, heads_kv, dim;

  const void* q;   int64_t q_sb, q_ss, q_sh;
  const void* k;   int64_t k_sb, k_ss, k_sh;
  const void* v;   int64_t v_sb, v_ss, v_sh;
  void* out;       int64_t o_sb, o_ss, o_sh;
  float* lse;      int64_t l_sb, l_sh;   // (batch, heads, seq_q), seq axis contiguous

  // backward only
  const void* dout;    int64_t do_sb, do_ss, do_sh;
  float* delta;        int64_t d_sb, d_sh;   // rowsum(dout * out), float32
  float* dq;  int64_t dq_sb, dq_ss, dq_sh;   // float32, accumulated (+=)
  float* dk;  int64_t dk_sb, dk_ss, dk_sh;
  float* dv;  int64_t dv_sb, dv_ss, dv_sh;

  // Global positions and window (cpp/mask.hpp, shared with the CPU kernels). Rows that see no key:
  // out 0, lse -inf.
  mask::Mask mask;
  float scale;
  // forward: false -> (out, lse) overwritten; true -> merged into the running (out, lse).
  bool accumulate;
  void* stream;  // cudaStream_t
};

// y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over chunks of `chunk` tokens; the hidden activation of one
// chunk lives in a float32 workspace (chunk * hidden floats forward, twice that backward).
struct FfnParams {
  DType dtype;       // x, w1, b1, w2, b2, y, dy, dx
  DType grad_dtype;  // dw1, db1, dw2, db2: dtype or f32 (accumulated +=)
  int64_t tokens, width, hidden, chunk;
  const void* x;  int64_t x_s;
  const void* w1; const void* b1;   // w1 (width, hidden) and w2 (hidden, width) C-contiguous
  const void* w2; const void* b2;
  void* y;        int64_t y_s;
  const void* dy; int64_t dy_s;
  void* dx;       int64_t dx_s;     // overwritten
  void* dw1; void* db1; void* dw2; void* db2;
  float* work;
  void* stream;
};

void attention_forward(const AttnParams& p);
// Tensor-core forward (cuda/attention_mma.cu): launches and returns true when the call is eligible
// (16-bit inputs, head dim 64 or 128, rows 16-byte aligned); false leaves it to the SIMT kernel.
bool attention_forward_mma(const AttnParams& p);
// Tensor-core backward (cuda/attention_mma.cu), the same rule (and dout 16-byte aligned rows).
bool attention_backward_mma(const AttnParams& p);
#ifdef RA_EMULATE
// Launches so far per kernel name (emulated build only: tests ask which kernel a call used).
std::vector<std::pair<std::string, long>> emulated_launches();
#endif
void attention_delta(const AttnParams& p);     // delta = rowsum(dout * out) (out has out_dtype)
void attention_backward(const AttnParams& p);  // += dq, dk, dv
void ffn_forward(const FfnParams& p);
void ffn_backward(const FfnParams& p);

// Device/runtime queries that never throw (0 devices when there is no driver), and helpers.
int device_count();
const char* device_error();   // why device_count() is 0, or ""
bool is_device_pointer(const void* p);
void stream_wait(void* consumer, void* producer);  // consumer waits for work queued on producer
void synchronize(void* stream);
const char* compiled_archs();

}  // namespace gpu
}  // namespace ringattn
