// Host emulation of the small CUDA subset the kernels use (built only with -DRA_EMULATE, by tests).
//
// A launch runs the blocks one after another; each block runs blockDim host threads that meet at a
// std::barrier for __syncthreads. Static __shared__ arrays become function statics, which is right
// because only one block runs at a time. Threads that return early drop out of the barrier, as on
// the hardware. This checks indexing, masking and synchronisation logic, not speed.
#pragma once
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(n)

namespace ra_emu {
inline thread_local uint3 threadIdx_, blockIdx_;
inline dim3 blockDim_, gridDim_;
inline std::barrier<>* barrier_ = nullptr;

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  gridDim_ = grid;
  blockDim_ = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        barrier_ = &bar;
        std::vector<std::thread> ts;
        ts.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            blockIdx_ = uint3{bx, by, bz};
            threadIdx_ = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            kernel(args...);
            bar.arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}

inline float atomic_add(float* p, float v) {
  float old, desired;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do desired = old + v;  // on failure `old` is refreshed with the current value
  while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
}  // namespace ra_emu

#define threadIdx ::ra_emu::threadIdx_
#define blockIdx ::ra_emu::blockIdx_
#define blockDim ::ra_emu::blockDim_
#define gridDim ::ra_emu::gridDim_
#define __syncthreads() ::ra_emu::barrier_->arrive_and_wait()
#define atomicAdd(p, v) ::ra_emu::atomic_add((p), (v))
