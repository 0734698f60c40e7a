// Tensor-core building blocks for cuda/attention_mma.cu: the register fragment layouts of
// mma.sync.m16n8k16 (bf16/fp16 in, float32 accumulate) and of ldmatrix, thin wrappers around the
// PTX instructions (ldmatrix, mma.sync, cp.async), and, under RA_EMULATE, the same wrappers
// computed on the host from the layout functions below (cuda/emulate.hpp runs the warp).
//
// Layouts, written from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "Warp-level matrix load instruction: ldmatrix"); tests/test_mma_fragments.py checks them
// against CuTe's MMA traits (SM80_16x8x16_F32BF16BF16F32_TN), an independent reading of the spec.
//   g = lane / 4 (groupID), t = lane % 4 (threadID_in_group)
//   A (16 x 16, row-major), 4 registers of 2 halves, element i = 2 * register + half:
//     row = g + 8 * ((i / 2) % 2), col = 2 t + i % 2 + 8 * (i / 4)
//   B (16 x 8, k x n, "col": element pairs run along k), 2 registers, element i:
//     k = 2 t + i % 2 + 8 * (i / 2), n = g
//   C, D (16 x 8 float32), 4 registers:  row = g + 8 * (i / 2), col = 2 t + i % 2
//   ldmatrix: matrix m of an .x1/.x2/.x4 load takes its 8 row addresses (16 bytes each) from lanes
//     8 m .. 8 m + 7 and lands in register m of every lane; lane holds (row g, cols 2 t, 2 t + 1),
//     or with .trans the transposed pair (rows 2 t, 2 t + 1 of column g).
#pragma once
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace ringattn {
namespace gpu {
namespace mma {

struct RC {
  int row, col;
};

__host__ __device__ constexpr RC a_elem(int lane, int i) {
  return {lane / 4 + 8 * ((i / 2) % 2), 2 * (lane % 4) + i % 2 + 8 * (i / 4)};
}
__host__ __device__ constexpr RC b_elem(int lane, int i) {  // {k, n}
  return {2 * (lane % 4) + i % 2 + 8 * (i / 2), lane / 4};
}
__host__ __device__ constexpr RC c_elem(int lane, int i) {
  return {lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2};
}
// Element j (0 = low half) of the register one 8 x 8 ldmatrix gives `lane`, in the stored matrix.
__host__ __device__ constexpr RC ldm_elem(int lane, int j, bool trans) {
  return trans ? RC{2 * (lane % 4) + j, lane / 4} : RC{lane / 4, 2 * (lane % 4) + j};
}

// Two 16-bit values in one register, low half first (the order of the fragment elements).
template <class T> __host__ __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __host__ __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat16 l = __float2bfloat16_rn(lo), h = __float2bfloat16_rn(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return uint32_t(a) | (uint32_t(b) << 16);
}
template <> __host__ __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half l = __float2half_rn(lo), h = __float2half_rn(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return uint32_t(a) | (uint32_t(b) << 16);
}

template <class T> __host__ __device__ __forceinline__ float half_to_float(uint16_t bits) {
  T v;
  memcpy(&v, &bits, 2);
  if constexpr (std::is_same<T, __half>::value) return __half2float(v);
  else return __bfloat162float(v);
}

#ifdef RA_EMULATE
// ---- emulated instructions (one warp, through ra_emu::warp_collective) ----------------------------
template <int N, bool Trans>
struct LdmOp {
  static void combine(const void* const* ins, void* const* outs, void*) {
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t* r = static_cast<uint32_t*>(outs[lane]);
      for (int m = 0; m < N; ++m) {
        uint16_t v[2];
        for (int j = 0; j < 2; ++j) {
          const RC e = ldm_elem(lane, j, Trans);
          const auto* row = *static_cast<const uint16_t* const*>(ins[8 * m + e.row]);
          v[j] = row[e.col];
        }
        r[m] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
      }
    }
  }
};

template <int N, bool Trans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const int lane = ::ra_emu::lane_id();
  if (lane < 8 * N) {  // lanes past 8 N give no address
    if (reinterpret_cast<uintptr_t>(smem_row) % 16) ::ra_emu::fail("ldmatrix: row address not 16-byte aligned");
    if (!::ra_emu::is_shared(smem_row, 16)) ::ra_emu::fail("ldmatrix: row address is not shared memory");
  }
  const void* in = smem_row;
  static const char* names[2][5] = {{"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
                                    {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  ::ra_emu::warp_collective(names[Trans][N], &in, r, LdmOp<N, Trans>::combine);
}

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

template <class T>
struct MmaOp {
  static void combine(const void* const* ins, void* const* outs, void*) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const MmaIn& in = *static_cast<const MmaIn*>(ins[lane]);
      for (int i = 0; i < 8; ++i) {
        const RC e = a_elem(lane, i);
        A[e.row][e.col] = half_to_float<T>(uint16_t(in.a[i / 2] >> (16 * (i % 2))));
      }
      for (int i = 0; i < 4; ++i) {
        const RC e = b_elem(lane, i);
        B[e.row][e.col] = half_to_float<T>(uint16_t(in.b[i / 2] >> (16 * (i % 2))));
        const RC c = c_elem(lane, i);
        C[c.row][c.col] = in.c[i];
      }
    }
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const RC e = c_elem(lane, i);
        float acc = C[e.row][e.col];
        for (int k = 0; k < 16; ++k) acc += A[e.row][k] * B[k][e.col];  // products of 16-bit values are exact
        static_cast<float*>(outs[lane])[i] = acc;
      }
  }
};

// d = a b + c (d may alias c).
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const float (&c)[4]) {
  MmaIn in;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = c[i];
  in.b[0] = b[0];
  in.b[1] = b[1];
  float out[4];
  ::ra_emu::warp_collective(std::is_same<T, __half>::value ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", &in, out,
                            MmaOp<T>::combine);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// 16 bytes global -> shared; bytes past src_bytes (0 or 16) are zero.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 || (src_bytes && reinterpret_cast<uintptr_t>(gmem) % 16))
    ::ra_emu::fail("cp.async: 16-byte copy with an unaligned address");
  if (!::ra_emu::is_shared(smem, 16)) ::ra_emu::fail("cp.async: destination is not shared memory");
  ::ra_emu::cp_async(smem, gmem, 16, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::ra_emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ::ra_emu::cp_async_wait(N); }

template <class T = unsigned char> __device__ __forceinline__ T* dynamic_smem() {
  return reinterpret_cast<T*>(::ra_emu::dynamic_smem());
}

// name: how the emulator reports the kernel (deadlocks, counts of launches per kernel).
#define RA_LAUNCH_SMEM(name, kernel, grid, block, smem, stream, ...) \
  ::ra_emu::launch_named(name, kernel, grid, block, smem, __VA_ARGS__)

#else
// ---- the PTX instructions -----------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int N, bool Trans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t a = smem_addr(smem_row);
  if constexpr (N == 1 && !Trans) asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  if constexpr (N == 1 && Trans) asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (N == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (N == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  if constexpr (N == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const float (&c)[4]) {
  if constexpr (std::is_same<T, __half>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <class T = unsigned char> __device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char ra_dynamic_smem[];
  return reinterpret_cast<T*>(ra_dynamic_smem);
}

#define RA_LAUNCH_SMEM(name, kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

}  // namespace mma
}  // namespace gpu
}  // namespace ringattn
