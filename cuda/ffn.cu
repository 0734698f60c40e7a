// Blockwise feed-forward on the GPU: y = gelu_tanh(x @ w1 + b1) @ w2 + b2, forward and backward,
// over chunks of `chunk` tokens like the CPU version (cpp/ffn.cpp), so the (tokens, hidden)
// activation never exists for the whole input: one chunk of it lives in a float32 workspace.
//
// One small tiled GEMM kernel with strided operands (a transpose is a swap of strides) and a fused
// epilogue (bias, GELU, GELU gradient, accumulate) does all the matrix products; correctness first,
// no cuBLAS dependency (keeps the module light and emulatable, see common.cuh).
#include "common.cuh"

namespace ringattn {
namespace gpu {
namespace {

// ---- configuration -----------------------------------------------------------------------------
constexpr int kTile = 64;         // output tile (kTile x kTile) per block
constexpr int kDepth = 16;        // reduction slice per step
constexpr int kGemmThreads = 256; // each thread computes 4 x 4 outputs
static_assert(kTile * kTile == kGemmThreads * 16, "4 x 4 outputs per thread");
static_assert(2 * kDepth * (kTile + 4) * 4 <= 48 * 1024, "GEMM tiles exceed 48 KiB of shared memory");

// GELU, tanh approximation, in the sigmoid form of cpp/ffn.cpp: 0.5 (1 + tanh u) = 1 / (1 + e^{-2u}).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
__device__ __forceinline__ float gelu(float x) {
  const float u = kGeluC * (x + kGeluA * x * x * x);
  return x / (1.f + expf(-2.f * u));
}
__device__ __forceinline__ float gelu_grad(float x) {  // d gelu / dx
  const float u = kGeluC * (x + kGeluA * x * x * x);
  const float e = expf(-2.f * u), s = 1.f / (1.f + e);
  return s + x * 2.f * s * (e * s) * kGeluC * (1.f + 3.f * kGeluA * x * x);
}

// A strided matrix operand: element (i, j) at ptr[i * rs + j * cs]; optionally gelu() on load.
struct Mat {
  const void* ptr;
  DType t;
  int64_t rs, cs;
  bool gelu;
};

enum class Epi : int {
  kStore,      // C = acc (+ bias)
  kBiasGelu,   // C = gelu(acc + bias)
  kGeluGrad,   // C = acc * gelu'(aux)      aux: float32 with C's row stride
  kAccumulate  // C += acc
};

struct Gemm {
  int64_t M, N, K;
  Mat A, B;            // A (M, K), B (K, N)
  void* C; DType ct; int64_t c_rs;  // C (M, N), columns contiguous
  const void* bias;    // (N,) of dtype bias_t, or null
  DType bias_t;
  const float* aux;
  Epi epi;
};

// ---- device phases -----------------------------------------------------------------------------
__device__ __forceinline__ float ld_mat(const Mat& m, int64_t i, int64_t j) {
  const float x = ld(m.ptr, i * m.rs + j * m.cs, m.t);
  return m.gelu ? gelu(x) : x;
}

// Grid (N tiles, M tiles). Thread (ty, tx) of a 16 x 16 layout computes rows ty + 16 a and
// columns tx + 16 c (a, c < 4) of the tile: strided so shared-memory reads are conflict free.
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const Gemm g) {
  __shared__ float As[kDepth][kTile + 4];  // As[k][i] = A(m0 + i, k0 + k)
  __shared__ float Bs[kDepth][kTile + 4];  // Bs[k][j] = B(k0 + k, n0 + j)
  const int64_t m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < g.K; k0 += kDepth) {
    for (int e = threadIdx.x; e < kTile * kDepth; e += kGemmThreads) {
      const int i = e / kDepth, k = e % kDepth;  // A: consecutive threads walk k
      As[k][i] = (m0 + i < g.M && k0 + k < g.K) ? ld_mat(g.A, m0 + i, k0 + k) : 0.f;
      const int kb = e / kTile, j = e % kTile;   // B: consecutive threads walk j
      Bs[kb][j] = (k0 + kb < g.K && n0 + j < g.N) ? ld_mat(g.B, k0 + kb, n0 + j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      float a[4], bv[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        a[t] = As[k][ty + 16 * t];
        bv[t] = Bs[k][tx + 16 * t];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * bv[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = m0 + ty + 16 * r, j = n0 + tx + 16 * c;
      if (i >= g.M || j >= g.N) continue;
      const int64_t at = i * g.c_rs + j;
      float x = acc[r][c];
      if (g.bias) x += ld(g.bias, j, g.bias_t);
      switch (g.epi) {
        case Epi::kStore: break;
        case Epi::kBiasGelu: x = gelu(x); break;
        case Epi::kGeluGrad: x *= gelu_grad(g.aux[at]); break;
        case Epi::kAccumulate: x += ld(g.C, at, g.ct); break;
      }
      st(g.C, at, g.ct, x);
    }
}

// out[j] += sum_i A(i, j): one thread per column; consecutive threads read consecutive columns.
__global__ void __launch_bounds__(kGemmThreads) colsum_kernel(Mat a, int64_t rows, int64_t cols, void* out, DType ot) {
  const int64_t j = int64_t(blockIdx.x) * kGemmThreads + threadIdx.x;
  if (j >= cols) return;
  float s = 0.f;
  for (int64_t i = 0; i < rows; ++i) s += ld_mat(a, i, j);
  st(out, j, ot, ld(out, j, ot) + s);
}

// ---- host helpers ------------------------------------------------------------------------------
void gemm(const Gemm& g, void* stream) {
  const dim3 grid(unsigned(ceil_div(g.N, kTile)), unsigned(ceil_div(g.M, kTile)));
  RA_LAUNCH(gemm_kernel, grid, dim3(kGemmThreads), stream, g);
}

void colsum(const Mat& a, int64_t rows, int64_t cols, void* out, DType ot, void* stream) {
  RA_LAUNCH(colsum_kernel, dim3(unsigned(ceil_div(cols, kGemmThreads))), dim3(kGemmThreads), stream, a, rows, cols, out, ot);
}

Mat rows_of(const void* base, DType t, int64_t row0, int64_t rs) {  // a row-major block starting at row0
  return Mat{static_cast<const char*>(base) + (t == DType::f32 ? 4 : 2) * row0 * rs, t, rs, 1, false};
}
Mat transposed(Mat m) { return Mat{m.ptr, m.t, m.cs, m.rs, m.gelu}; }
void* row_ptr(void* base, DType t, int64_t row0, int64_t rs) {
  return static_cast<char*>(base) + (t == DType::f32 ? 4 : 2) * row0 * rs;
}

}  // namespace

// ---- host entry points -------------------------------------------------------------------------
void ffn_forward(const FfnParams& p) {
  const int64_t H = p.hidden, W = p.width;
  for (int64_t t0 = 0; t0 < p.tokens; t0 += p.chunk) {
    const int64_t n = p.tokens - t0 < p.chunk ? p.tokens - t0 : p.chunk;
    // h = gelu(x w1 + b1)   (n, H), float32 workspace
    gemm(Gemm{n, H, W, rows_of(p.x, p.dtype, t0, p.x_s), Mat{p.w1, p.dtype, H, 1, false},
              p.work, DType::f32, H, p.b1, p.dtype, nullptr, Epi::kBiasGelu}, p.stream);
    // y = h w2 + b2
    gemm(Gemm{n, W, H, Mat{p.work, DType::f32, H, 1, false}, Mat{p.w2, p.dtype, W, 1, false},
              row_ptr(p.y, p.dtype, t0, p.y_s), p.dtype, p.y_s, p.b2, p.dtype, nullptr, Epi::kStore}, p.stream);
  }
  check_launch("ffn_forward");
}

void ffn_backward(const FfnParams& p) {
  const int64_t H = p.hidden, W = p.width;
  float* pre = p.work;               // (n, H): x w1 + b1, recomputed per chunk
  float* dpre = p.work + p.chunk * H;  // (n, H): dL/dpre
  for (int64_t t0 = 0; t0 < p.tokens; t0 += p.chunk) {
    const int64_t n = p.tokens - t0 < p.chunk ? p.tokens - t0 : p.chunk;
    const Mat x = rows_of(p.x, p.dtype, t0, p.x_s), dy = rows_of(p.dy, p.dtype, t0, p.dy_s);
    const Mat w1{p.w1, p.dtype, H, 1, false}, w2{p.w2, p.dtype, W, 1, false};
    const Mat pre_m{pre, DType::f32, H, 1, false}, dpre_m{dpre, DType::f32, H, 1, false};
    // pre = x w1 + b1
    gemm(Gemm{n, H, W, x, w1, pre, DType::f32, H, p.b1, p.dtype, nullptr, Epi::kStore}, p.stream);
    // dw2 += gelu(pre)^T dy;  db2 += colsum(dy)
    Mat h_t = transposed(pre_m);
    h_t.gelu = true;
    gemm(Gemm{H, W, n, h_t, dy, p.dw2, p.grad_dtype, W, nullptr, p.dtype, nullptr, Epi::kAccumulate}, p.stream);
    colsum(dy, n, W, p.db2, p.grad_dtype, p.stream);
    // dpre = (dy w2^T) * gelu'(pre)
    gemm(Gemm{n, H, W, dy, transposed(w2), dpre, DType::f32, H, nullptr, p.dtype, pre, Epi::kGeluGrad}, p.stream);
    // dw1 += x^T dpre;  db1 += colsum(dpre)
    gemm(Gemm{W, H, n, transposed(x), dpre_m, p.dw1, p.grad_dtype, H, nullptr, p.dtype, nullptr, Epi::kAccumulate},
         p.stream);
    colsum(dpre_m, n, H, p.db1, p.grad_dtype, p.stream);
    // dx = dpre w1^T
    gemm(Gemm{n, W, H, dpre_m, transposed(w1), row_ptr(p.dx, p.dtype, t0, p.dx_s), p.dtype, p.dx_s, nullptr,
              p.dtype, nullptr, Epi::kStore}, p.stream);
  }
  check_launch("ffn_backward");
}

}  // namespace gpu
}  // namespace ringattn
