// Tile configuration and dynamic shared memory of the tensor-core kernels (cuda/attention_mma.cu),
// plain C++ so that host code can read it too: tests/test_ptxas.py compiles a tiny host program
// (tests/ptxas/launch_smem.cpp) that prints kDynamicSmem, and adds those bytes to the static shared
// memory ptxas reports when it checks each kernel against the per-block limit of its architecture.
// The launch code takes its byte counts from the same functions, so the check cannot drift from it.
#pragma once

namespace ringattn {
namespace gpu {
namespace mma_cfg {

// Forward: 4 warps, query tiles of 16 rows per warp, key tiles of 64.
constexpr int kWarps = 4, kMmaThreads = 32 * kWarps, kBQ = 16 * kWarps, kBK = 64;

// 99 KiB: the most a block may opt in to on every sm_80+ card we build for (sm_86/89 allow 99).
constexpr int kMmaSmemLimit = 99 * 1024;

// Forward shared memory (bytes): the Q tile and two buffers of (K tile, V tile), all 16-bit.
template <int D> constexpr int fwd_mma_smem_bytes() { return 2 * (kBQ * D + 2 * 2 * kBK * D); }

// Backward, per head dim: the query tile and whether K / V fragments stay in registers for the
// whole block (D 64) or are re-read from shared memory (D 128, where dK and dV already take 128
// registers a lane).
template <int D> struct BwdMmaCfg;
template <> struct BwdMmaCfg<64> { static constexpr int BQ = 64; static constexpr bool kv_regs = true; };
template <> struct BwdMmaCfg<128> { static constexpr int BQ = 32; static constexpr bool kv_regs = false; };

// Backward shared memory (bytes): K and V tiles, the dS^T tile (keys x queries), two buffers of (Q, dO).
template <int D> constexpr int bwd_mma_smem_bytes() {
  return 2 * (2 * kBK * D + kBK * BwdMmaCfg<D>::BQ + 2 * 2 * BwdMmaCfg<D>::BQ * D);
}

static_assert(fwd_mma_smem_bytes<64>() <= kMmaSmemLimit && fwd_mma_smem_bytes<128>() <= kMmaSmemLimit,
              "tensor-core forward tiles exceed the shared memory budget");
static_assert(bwd_mma_smem_bytes<64>() <= kMmaSmemLimit && bwd_mma_smem_bytes<128>() <= kMmaSmemLimit,
              "tensor-core backward tiles exceed the shared memory budget");

// Every kernel launched with dynamic shared memory: its name, its first template argument (the
// head dim; the bytes do not depend on the element type) and the bytes it launches with.
struct DynamicSmem {
  const char* kernel;
  int dim;
  int bytes;
};
constexpr DynamicSmem kDynamicSmem[] = {
    {"attn_fwd_mma_kernel", 64, fwd_mma_smem_bytes<64>()},
    {"attn_fwd_mma_kernel", 128, fwd_mma_smem_bytes<128>()},
    {"attn_bwd_mma_kernel", 64, bwd_mma_smem_bytes<64>()},
    {"attn_bwd_mma_kernel", 128, bwd_mma_smem_bytes<128>()},
};

}  // namespace mma_cfg
}  // namespace gpu
}  // namespace ringattn
