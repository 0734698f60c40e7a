// Prints the dynamic shared memory each tensor-core kernel launches with (cuda/mma_config.hpp), one
// "kernel dim bytes" line each, for tests/test_ptxas.py. Plain C++: built with the host compiler.
#include <cstdio>

#include "../../cuda/mma_config.hpp"

int main() {
  for (const auto& e : ringattn::gpu::mma_cfg::kDynamicSmem) std::printf("%s %d %d\n", e.kernel, e.dim, e.bytes);
  return 0;
}
