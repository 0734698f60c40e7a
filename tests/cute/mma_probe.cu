// Which lane holds which element after ldmatrix, and what mma.sync computes, through the wrappers
// of cuda/mma.cuh. One source for both machines:
//   g++ -x c++ -DRA_EMULATE ...  the emulated warp (tests/test_mma_fragments.py runs it here);
//   nvcc -arch=sm_80 ...         the real instructions (the GPU probe: its output is compared with
//                                the same CuTe tables by tests/test_mma_fragments.py::compare).
// Output lines (mma-layout and ldsm in the format of tests/cute/mma_layouts.cpp):
//   mma-layout <bf16|f16> <A|B|C> <lane> <value> <row> <col>   cuda/mma.cuh's a_elem, b_elem (as
//                                      (n, k), CuTe's order), c_elem; printed on the host
//   ldsm <x1|x2|x4>[.trans] <lane> <register> <half> <source lane> <source element>
//   mma <bf16|f16> <row> <col> <d>     D = A B for A[m][k] = ((3 m + 5 k) % 7 - 3) / 4,
//                                      B[k][n] = ((2 k + 3 n) % 5 - 2) / 2 (exact in 16 bits and in
//                                      float32), loaded with a_elem / b_elem, read with c_elem.
#include <cstdio>

#include "../../cuda/mma.cuh"

using namespace ringattn::gpu;

constexpr int kRows = 32;  // row r of the source holds the codes 256 r + e: lane r's row address

template <int N, bool Trans>
__device__ void probe_ldsm(const uint16_t* rows, uint32_t* out) {
  uint32_t r[N];
  const int lane = threadIdx.x;
  mma::ldmatrix<N, Trans>(r, rows + 8 * (lane % (8 * N)));
  for (int m = 0; m < N; ++m) out[lane * 4 + m] = r[m];
}

__device__ float a_val(int m, int k) { return float((3 * m + 5 * k) % 7 - 3) / 4; }
__device__ float b_val(int k, int n) { return float((2 * k + 3 * n) % 5 - 2) / 2; }

template <class T>
__device__ void probe_mma(float* out) {
  const int lane = threadIdx.x;
  uint32_t a[4], b[2];
  for (int r = 0; r < 4; ++r) {
    const mma::RC lo = mma::a_elem(lane, 2 * r), hi = mma::a_elem(lane, 2 * r + 1);
    a[r] = mma::pack2<T>(a_val(lo.row, lo.col), a_val(hi.row, hi.col));
  }
  for (int r = 0; r < 2; ++r) {
    const mma::RC lo = mma::b_elem(lane, 2 * r), hi = mma::b_elem(lane, 2 * r + 1);
    b[r] = mma::pack2<T>(b_val(lo.row, lo.col), b_val(hi.row, hi.col));
  }
  float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4];
  mma::mma_16816<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) {
    const mma::RC e = mma::c_elem(lane, i);
    out[e.row * 8 + e.col] = d[i];
  }
}

// out: 6 ldmatrix variants x 32 lanes x 4 registers, then 2 x 128 mma results.
__global__ void probe_kernel(uint32_t* ldsm_out, float* mma_out) {
  uint16_t* rows = mma::dynamic_smem<uint16_t>();
  for (int e = threadIdx.x; e < kRows * 8; e += 32) rows[e] = uint16_t(256 * (e / 8) + e % 8);
  __syncwarp();
  probe_ldsm<1, false>(rows, ldsm_out + 0 * 128);
  probe_ldsm<2, false>(rows, ldsm_out + 1 * 128);
  probe_ldsm<4, false>(rows, ldsm_out + 2 * 128);
  probe_ldsm<1, true>(rows, ldsm_out + 3 * 128);
  probe_ldsm<2, true>(rows, ldsm_out + 4 * 128);
  probe_ldsm<4, true>(rows, ldsm_out + 5 * 128);
  probe_mma<__nv_bfloat16>(mma_out);
  probe_mma<__half>(mma_out + 128);
}

int main() {
  const size_t ldsm_n = 6 * 128, mma_n = 256;
  uint32_t host_ldsm[6 * 128] = {};
  float host_mma[256];
#ifdef RA_EMULATE
  RA_LAUNCH_SMEM("probe_kernel", probe_kernel, dim3(1), dim3(32), kRows * 16, nullptr, host_ldsm, host_mma);
#else
  uint32_t* d_ldsm;
  float* d_mma;
  if (cudaMalloc(&d_ldsm, ldsm_n * 4) != cudaSuccess || cudaMalloc(&d_mma, mma_n * 4) != cudaSuccess) {
    std::fprintf(stderr, "mma_probe: cudaMalloc failed\n");
    return 1;
  }
  RA_LAUNCH_SMEM("probe_kernel", probe_kernel, dim3(1), dim3(32), kRows * 16, nullptr, d_ldsm, d_mma);
  if (cudaMemcpy(host_ldsm, d_ldsm, ldsm_n * 4, cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(host_mma, d_mma, mma_n * 4, cudaMemcpyDeviceToHost) != cudaSuccess) {
    std::fprintf(stderr, "mma_probe: kernel failed: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
#endif
  for (const char* atom : {"bf16", "f16"})
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 8; ++i) std::printf("mma-layout %s A %d %d %d %d\n", atom, lane, i, mma::a_elem(lane, i).row, mma::a_elem(lane, i).col);
      for (int i = 0; i < 4; ++i) std::printf("mma-layout %s B %d %d %d %d\n", atom, lane, i, mma::b_elem(lane, i).col, mma::b_elem(lane, i).row);
      for (int i = 0; i < 4; ++i) std::printf("mma-layout %s C %d %d %d %d\n", atom, lane, i, mma::c_elem(lane, i).row, mma::c_elem(lane, i).col);
    }
  const char* names[6] = {"x1", "x2", "x4", "x1.trans", "x2.trans", "x4.trans"};
  const int regs[6] = {1, 2, 4, 1, 2, 4};
  for (int v = 0; v < 6; ++v)
    for (int lane = 0; lane < 32; ++lane)
      for (int m = 0; m < regs[v]; ++m)
        for (int h = 0; h < 2; ++h) {
          const unsigned code = (host_ldsm[v * 128 + lane * 4 + m] >> (16 * h)) & 0xFFFF;
          std::printf("ldsm %s %d %d %d %u %u\n", names[v], lane, m, h, code / 256, code % 256);
        }
  for (int t = 0; t < 2; ++t)
    for (int e = 0; e < 128; ++e)
      std::printf("mma %s %d %d %.9g\n", t ? "f16" : "bf16", e / 8, e % 8, host_mma[t * 128 + e]);
  return 0;
}
