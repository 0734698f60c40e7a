// Source of tests/ptxas/sample_spill.txt (captured: nvcc -O3 -gencode arch=compute_80,code=sm_80
// -gencode arch=compute_90,code=sm_90 -maxrregcount=24 -fatbin --resource-usage spill.cu): a kernel
// and a device function that spill, for the parser test of tests/test_ptxas.py. Not part of the build.
__device__ __noinline__ float helper(const float* x, int n) { float a[64]; for (int i = 0; i < 64; ++i) a[i] = x[i * n]; float s = 0; for (int i = 0; i < 64; ++i) s += a[(i * 7 + n) % 64] * a[i]; return s; }
__global__ void spilly(const float* x, float* y, int n) {
  float acc[96];
  for (int i = 0; i < 96; ++i) acc[i] = x[threadIdx.x + i * n];
  for (int r = 0; r < 8; ++r) for (int i = 0; i < 96; ++i) acc[i] = acc[i] * acc[(i + r) % 96] + 1.f;
  float s = helper(x, n);
  for (int i = 0; i < 96; ++i) s += acc[i];
  y[threadIdx.x] = s;
}
