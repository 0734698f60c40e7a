// Shared device helpers for cuda/*.cu: typed loads/stores in float32, launch and error checks.
//
// The kernels also compile as plain C++ (RA_EMULATE, see emulate.hpp): a block's threads become
// fibers on one host thread, switched at __syncthreads and at every warp operation (shuffles, and
// cuda/mma.cuh's ldmatrix / mma.sync / cp.async), with shared memory poisoned before each block.
// Tests use that build to check the kernel logic on machines without a GPU; the real build is
// nvcc's. Kernels therefore use only what emulate.hpp provides: threadIdx/blockIdx, static and
// dynamic __shared__ memory, __syncthreads, atomicAdd, the full-mask warp operations above.
//
// RA_LAUNCH(kernel, grid, block, stream, args...) launches without dynamic shared memory; the
// emulator reports and counts it under the kernel's expression as written (e.g.
// "attn_fwd_kernel<DMAX>"). RA_POISON_SHARED(arrays...) after the static __shared__ arrays of a
// template kernel: the emulator poisons them per block (it cannot find them itself, emulate.hpp);
// nothing on the GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.hpp"

#ifdef RA_EMULATE
#include "emulate.hpp"
#define RA_LAUNCH(kernel, grid, block, stream, ...) ::ra_emu::launch_named(#kernel, kernel, grid, block, 0, __VA_ARGS__)
#define RA_POISON_SHARED(...) ::ra_emu::poison_statics(__VA_ARGS__)
#else
#include <cuda_runtime.h>
#define RA_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define RA_POISON_SHARED(...) ((void)0)
#endif

namespace ringattn {
namespace gpu {

constexpr float kInf = INFINITY;

// Load element i of a tensor of dtype t as float32 / store a float32 into it (round to nearest).
__host__ __device__ __forceinline__ float ld(const void* p, int64_t i, DType t) {
  if (t == DType::f16) return __half2float(static_cast<const __half*>(p)[i]);
  if (t == DType::bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__host__ __device__ __forceinline__ void st(void* p, int64_t i, DType t, float x) {
  if (t == DType::f16) static_cast<__half*>(p)[i] = __float2half_rn(x);
  else if (t == DType::bf16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  else static_cast<float*>(p)[i] = x;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Raises std::runtime_error (RuntimeError in Python) if the last launch failed.
void check_launch(const char* what);

}  // namespace gpu
}  // namespace ringattn
