// Behaviour of the warp emulation (cuda/emulate.hpp) that kernels rely on being caught or right.
// Built with g++ -x c++ -DRA_EMULATE by tests/test_mma_fragments.py; `warp_emu_checks MODE` prints
// one result line, or the emulator's error message and exits 3.
//   shfl      butterfly sums with __shfl_xor_sync and a broadcast with __shfl_sync, 2 warps
//   wait      cp.async, commit, wait_group 0, then read: the copied values
//   nowait    the same without the wait: the destination still holds the poison bytes
//   wait1     two groups, wait_group 1: the first group landed, the second is poison
//   deadlock  half of warp 1 waits in __syncwarp, the rest of the block at __syncthreads
//   diverge   lanes of one warp in different warp operations
//   poison    dynamic shared memory as a block finds it: poison bytes, in every block
//   static_poison  the same for a static __shared__ array of a kernel template (RA_POISON_SHARED)
//   named     a deadlock in a kernel launched with RA_LAUNCH: reported under its name
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../../cuda/mma.cuh"

using namespace ringattn::gpu;

__global__ void shfl_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = int(threadIdx.x);
  for (int m = 16; m >= 1; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  const int b = __shfl_sync(0xffffffffu, int(threadIdx.x) * 10, 3);
  out[threadIdx.x] = lane == 0 ? v * 1000 + b : -1;
}

template <int Mode>  // 0: wait 0, 1: no wait, 2: two groups, wait 1
__global__ void copy_kernel(const uint16_t* src, uint16_t* out) {
  uint16_t* s = mma::dynamic_smem<uint16_t>();
  const int t = threadIdx.x;
  mma::cp_async_16(s + 8 * t, src + 8 * t, 16);
  mma::cp_async_commit();
  if (Mode == 2) {
    mma::cp_async_16(s + 8 * (t + 32), src + 8 * (t + 32), 16);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
  }
  if (Mode == 0) mma::cp_async_wait<0>();
  out[t] = s[8 * t];
  if (Mode == 2) out[32 + t] = s[8 * (t + 32)];
}

__global__ void deadlock_kernel(int*) {
  if (threadIdx.x < 48) __syncthreads();  // half of warp 1 here, the other half in __syncwarp
  else __syncwarp();
}

__global__ void diverge_kernel(int*) {
  if (threadIdx.x % 2) __syncwarp();
  else (void)__shfl_sync(0xffffffffu, 1, 0);
}

__global__ void poison_kernel(uint32_t* out) {
  uint32_t* s = mma::dynamic_smem<uint32_t>();
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s[5];
    s[5] = 7;  // the next block must not see this
  }
}

template <int N>
__global__ void static_poison_kernel(uint32_t* out) {
  __shared__ uint32_t s[N];
  RA_POISON_SHARED(s);
  __syncthreads();  // every thread has passed the poisoning before thread 0 reads and writes
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s[5];
    s[5] = 7;  // the next block must not see this
  }
}

__global__ void named_deadlock_kernel(int*) {
  if (threadIdx.x > 0) __syncthreads();
  else __syncwarp();
}

int run(const std::string& mode) {
  if (mode == "shfl") {
    int out[64];
    RA_LAUNCH_SMEM("shfl_kernel", shfl_kernel, dim3(1), dim3(64), 0, nullptr, out);
    std::printf("%d %d\n", out[0], out[32]);
  } else if (mode == "wait" || mode == "nowait" || mode == "wait1") {
    uint16_t src[64 * 8], out[64];
    for (int i = 0; i < 64 * 8; ++i) src[i] = uint16_t(i);
    if (mode == "wait") RA_LAUNCH_SMEM("copy_kernel<0>", copy_kernel<0>, dim3(1), dim3(32), 1024, nullptr, src, out);
    if (mode == "nowait") RA_LAUNCH_SMEM("copy_kernel<1>", copy_kernel<1>, dim3(1), dim3(32), 1024, nullptr, src, out);
    if (mode == "wait1") RA_LAUNCH_SMEM("copy_kernel<2>", copy_kernel<2>, dim3(1), dim3(32), 1024, nullptr, src, out);
    std::printf("%u %u", out[0], out[31]);
    if (mode == "wait1") std::printf(" %u %u", out[32], out[63]);
    std::printf("\n");
  } else if (mode == "deadlock") {
    RA_LAUNCH_SMEM("deadlock_kernel", deadlock_kernel, dim3(2), dim3(64), 0, nullptr, nullptr);
  } else if (mode == "diverge") {
    RA_LAUNCH_SMEM("diverge_kernel", diverge_kernel, dim3(1), dim3(32), 0, nullptr, nullptr);
  } else if (mode == "poison") {
    uint32_t out[4];
    RA_LAUNCH_SMEM("poison_kernel", poison_kernel, dim3(4), dim3(32), 64, nullptr, out);
    std::printf("%x %x %x %x\n", out[0], out[1], out[2], out[3]);
  } else if (mode == "static_poison") {
    uint32_t out[4];
    RA_LAUNCH(static_poison_kernel<16>, dim3(4), dim3(32), nullptr, out);
    std::printf("%x %x %x %x\n", out[0], out[1], out[2], out[3]);
  } else if (mode == "named") {
    RA_LAUNCH(named_deadlock_kernel, dim3(1), dim3(32), nullptr, nullptr);
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  try {
    return run(argv[1]);
  } catch (const std::runtime_error& e) {
    std::printf("%s\n", e.what());
    return 3;
  }
}
