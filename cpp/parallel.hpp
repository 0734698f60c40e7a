// Thread count and work split of the step kernels (layernorm.cpp, rope.cpp, xent.cpp, adamw.cpp).
// They use the attention kernels' setting (omp_get_max_threads: ringattn.threads sets it), but a
// call too small to pay for waking a team runs on the calling thread alone: each wake-up and the
// closing barrier cost a time slice when ranks x threads exceed the cores, and these kernels are
// called many times per step on small arrays.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace ringattn {
namespace RA_ISA {

constexpr int64_t kMinWorkPerThread = int64_t(1) << 16;  // elements touched per thread, at least

// Threads for a call touching `work` elements: 1 .. omp_get_max_threads().
inline int threads_for(int64_t work) {
  const int64_t want = work / kMinWorkPerThread;
  return int(std::max<int64_t>(1, std::min<int64_t>(want, omp_get_max_threads())));
}

// Thread t's contiguous share [lo, hi) of n items split over nt threads.
inline void share(int64_t n, int t, int nt, int64_t& lo, int64_t& hi) {
  lo = n * t / nt;
  hi = n * (t + 1) / nt;
}

}  // namespace RA_ISA
}  // namespace ringattn
