// Picks the widest instruction set this CPU supports, once, for every kernel call.
// RINGATTN_ISA=avx512|avx2|generic overrides (for benchmarks and tests of the other paths).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.hpp"

namespace ringattn {
namespace {

enum class Isa { avx512, avx2, generic };

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (!std::strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return !std::strcmp(isa, "generic");
}

bool built(const char* isa) {
  std::string list = "," + std::string(RA_ISA_LIST) + ",";
  return list.find("," + std::string(isa) + ",") != std::string::npos;
}

Isa choose() {
  if (const char* env = std::getenv("RINGATTN_ISA"); env && *env) {
    if (!built(env)) throw std::runtime_error(std::string("RINGATTN_ISA=") + env + " is not built (built: " RA_ISA_LIST ")");
    if (!cpu_has(env)) throw std::runtime_error(std::string("RINGATTN_ISA=") + env + " is not supported by this CPU");
    if (!std::strcmp(env, "avx512")) return Isa::avx512;
    if (!std::strcmp(env, "avx2")) return Isa::avx2;
    return Isa::generic;
  }
  if (built("avx512") && cpu_has("avx512")) return Isa::avx512;
  if (built("avx2") && cpu_has("avx2")) return Isa::avx2;
  return Isa::generic;
}

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

}  // namespace

#if defined(RA_HAVE_avx512) && defined(RA_HAVE_avx2)
#define RA_DISPATCH(fn, arg)                            \
  switch (isa()) {                                      \
    case Isa::avx512: return avx512::fn(arg);           \
    case Isa::avx2: return avx2::fn(arg);               \
    default: return generic::fn(arg);                   \
  }
#else
#define RA_DISPATCH(fn, arg) return generic::fn(arg);
#endif

void attention_forward(const AttnParams& p) { RA_DISPATCH(attention_forward, p) }
void attention_backward(const AttnParams& p) { RA_DISPATCH(attention_backward, p) }
void attention_delta(const AttnParams& p) { RA_DISPATCH(attention_delta, p) }
void ffn_forward(const FfnParams& p) { RA_DISPATCH(ffn_forward, p) }
void ffn_backward(const FfnParams& p) { RA_DISPATCH(ffn_backward, p) }
void layernorm_forward(const LayerNormParams& p) { RA_DISPATCH(layernorm_forward, p) }
void layernorm_backward(const LayerNormParams& p) { RA_DISPATCH(layernorm_backward, p) }
void rope(const RopeParams& p) { RA_DISPATCH(rope, p) }
void softmax_xent(XentParams& p) { RA_DISPATCH(softmax_xent, p) }
void adamw_update(const AdamWParams& p) { RA_DISPATCH(adamw_update, p) }
void sum_squares(SumSquaresParams& p) { RA_DISPATCH(sum_squares, p) }
void linear_forward(const LinearParams& p) { RA_DISPATCH(linear_forward, p) }
void linear_backward(const LinearParams& p) { RA_DISPATCH(linear_backward, p) }
void embedding_backward(const EmbeddingParams& p) { RA_DISPATCH(embedding_backward, p) }

const char* active_isa() {
  switch (isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}
const char* built_isas() { return RA_ISA_LIST; }

}  // namespace ringattn
