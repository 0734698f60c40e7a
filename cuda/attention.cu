// Flash-style blockwise attention on the GPU: forward (with the running (out, lse) merge the ring
// needs), delta = rowsum(dout * out), and backward accumulating into float32 dq, dk, dv.
//
// Reads top-down: configuration, index math, forward kernel, delta kernel, backward kernel, host
// entry points. Simple SIMT kernels with float32 tiles in shared memory: the general path (float32,
// any head dim) and the reference for the tensor-core kernels of attention_mma.cu, which the host
// entry points try first (16-bit inputs at head dim 64 / 128). Checked in host emulation (common.cuh).
//
// Precision: inputs f16/bf16/f32 are converted to float32 when a tile is loaded; scores, running
// max, sums, the LSE and all accumulators are float32.
//
// Backward strategy (documented choice): one thread block per (key tile, kv head, batch) walks all
// query tiles of all query heads of its GQA group, keeping dK and dV for its keys in registers and
// adding them to dk, dv once at the end (no atomics: the block owns those rows). dq rows are shared
// by every key tile, so dq is accumulated with float32 atomicAdd, as FlashAttention-2 does.
#include "common.cuh"

namespace ringattn {
namespace gpu {
namespace {

// ---- configuration -----------------------------------------------------------------------------
// Kernels are instantiated for a maximum head dim DMAX in {64, 128, 256}; dim <= DMAX is handled by
// zero padding. Tile sizes shrink as DMAX grows so every block stays within 48 KiB of static
// shared memory (checked by static_assert below).
constexpr int kThreads = 128;
constexpr int kSmemLimit = 48 * 1024;

template <int DMAX> struct FwdCfg;
template <> struct FwdCfg<64>  { static constexpr int BQ = 64, BK = 32; };
template <> struct FwdCfg<128> { static constexpr int BQ = 32, BK = 16; };
template <> struct FwdCfg<256> { static constexpr int BQ = 16, BK = 8; };

template <int DMAX> struct BwdCfg;
template <> struct BwdCfg<64>  { static constexpr int BK = 32, BQ = 32; };
template <> struct BwdCfg<128> { static constexpr int BK = 16, BQ = 16; };
template <> struct BwdCfg<256> { static constexpr int BK = 8,  BQ = 8; };

template <int DMAX> constexpr int fwd_smem_bytes() {
  using C = FwdCfg<DMAX>;
  return 4 * (C::BQ * (DMAX + 1) + C::BK * (DMAX + 1) + C::BK * DMAX + C::BQ * (C::BK + 1));
}
template <int DMAX> constexpr int bwd_smem_bytes() {
  using C = BwdCfg<DMAX>;
  return 4 * (2 * C::BK * (DMAX + 1) + 2 * C::BQ * (DMAX + 1) + 2 * C::BK * (C::BQ + 1) + 2 * C::BQ);
}
static_assert(fwd_smem_bytes<64>() <= kSmemLimit && fwd_smem_bytes<128>() <= kSmemLimit &&
              fwd_smem_bytes<256>() <= kSmemLimit, "forward tiles exceed 48 KiB of shared memory");
static_assert(bwd_smem_bytes<64>() <= kSmemLimit && bwd_smem_bytes<128>() <= kSmemLimit &&
              bwd_smem_bytes<256>() <= kSmemLimit, "backward tiles exceed 48 KiB of shared memory");

// ---- index math (tiny pure functions) ------------------------------------------------------------
// Key j visible to query i: in range, and inside the mask (cpp/mask.hpp).
__device__ __forceinline__ bool visible(const AttnParams& p, int64_t i, int64_t j) {
  return i < p.seq_q && j < p.seq_k && mask::visible(p.mask, i, j);
}

// Query i sees at least one key of this call.
__device__ __forceinline__ bool row_sees_keys(const AttnParams& p, int64_t i) {
  return mask::row_sees_keys(p.mask, i, p.seq_k);
}

// Copy rows [r0, r0 + R) of one head of a (batch, seq, heads, dim) tensor into a float tile,
// zero-filling rows past n and columns past dim.
template <int R, int LD>
__device__ __forceinline__ void load_tile(float (*tile)[LD], const void* base, DType t, int64_t off,
                                          int64_t row_stride, int64_t r0, int64_t n, int64_t dim, int cols) {
  for (int e = threadIdx.x; e < R * cols; e += kThreads) {
    const int r = e / cols, c = e % cols;
    tile[r][c] = (r0 + r < n && c < dim) ? ld(base, off + (r0 + r) * row_stride + c, t) : 0.f;
  }
}

// ---- forward -----------------------------------------------------------------------------------
// Grid (query tiles, heads, batch). The BQ query rows of a block are split over kThreads threads,
// TPR threads per row; a thread keeps the running max m, sum l and DMAX / TPR output columns of its
// row in registers (the TPR threads of a row hold identical copies of m and l).
template <int DMAX>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const AttnParams p) {
  using C = FwdCfg<DMAX>;
  constexpr int BQ = C::BQ, BK = C::BK, TPR = kThreads / BQ, COLS = DMAX / TPR;
  static_assert(kThreads % BQ == 0 && BK % TPR == 0 && DMAX % TPR == 0, "tile shape");
  __shared__ float Qs[BQ][DMAX + 1];  // +1: rows land in different banks
  __shared__ float Ks[BK][DMAX + 1];
  __shared__ float Vs[BK][DMAX];
  __shared__ float Ps[BQ][BK + 1];    // scores, then probabilities
  RA_POISON_SHARED(Qs, Ks, Vs, Ps);

  const int64_t q0 = int64_t(blockIdx.x) * BQ, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.heads / p.heads_kv);
  const int r = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int64_t qi = q0 + r;
  const bool row_ok = qi < p.seq_q;
  const int64_t q1 = q0 + BQ < p.seq_q ? q0 + BQ : p.seq_q;
  const int64_t q_off = b * p.q_sb + h * p.q_sh, k_off = b * p.k_sb + hk * p.k_sh, v_off = b * p.v_sb + hk * p.v_sh;
  const int64_t o_row = b * p.o_sb + h * p.o_sh + qi * p.o_ss, l_at = b * p.l_sb + h * p.l_sh + qi;

  load_tile<BQ, DMAX + 1>(Qs, p.q, p.dtype, q_off, p.q_ss, q0, p.seq_q, p.dim, DMAX);

  // Running state. In accumulate mode the online softmax resumes from the previous (out, lse):
  // out_old = sum_old exp(s - lse_old) v, so (m, l, o) = (lse_old, 1, out_old) is exactly the state
  // after the old keys, expressed relative to m = lse_old. Only lse_old = -inf means "no old keys":
  // a NaN lse_old resumes as it is, so the bad value it stands for stays in the row (`> -kInf` is
  // false for NaN and would start the row afresh, dropping it).
  float m = -kInf, l = 0.f, o[COLS];
  const float lse_old = (p.accumulate && row_ok) ? p.lse[l_at] : -kInf;
  const bool resume = lse_old != -kInf;
  if (resume) { m = lse_old; l = 1.f; }
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    const int c = lane + j * TPR;
    o[j] = (resume && c < p.dim) ? ld(p.out, o_row + c, p.out_dtype) : 0.f;
  }

  // Keys any row of the tile sees (block-uniform): from the first row's begin to the last row's end.
  const int64_t kb = mask::key_begin(p.mask, q0, p.seq_k), ke = mask::key_end(p.mask, q1 - 1, p.seq_k);
  for (int64_t k0 = kb; k0 < ke; k0 += BK) {
    __syncthreads();  // the previous tile is fully consumed
    load_tile<BK, DMAX + 1>(Ks, p.k, p.dtype, k_off, p.k_ss, k0, p.seq_k, p.dim, DMAX);
    load_tile<BK, DMAX>(Vs, p.v, p.dtype, v_off, p.v_ss, k0, p.seq_k, p.dim, DMAX);
    __syncthreads();

    // Scores of this thread's keys j = lane + t * TPR; masked ones are -inf.
    float s[BK / TPR];
#pragma unroll
    for (int t = 0; t < BK / TPR; ++t) {
      const int j = lane + t * TPR;
      float acc = 0.f;
      for (int d = 0; d < p.dim; ++d) acc += Qs[r][d] * Ks[j][d];
      s[t] = visible(p, qi, k0 + j) ? acc * p.scale : -kInf;
      Ps[r][j] = s[t];
    }
    __syncthreads();
    float mx = m;
    for (int j = 0; j < BK; ++j) mx = fmaxf(mx, Ps[r][j]);
    __syncthreads();  // all reads of the scores are done before they become probabilities
    // NumPy of this step, for one row with scores s (1, BK) and values V (BK, dim):
    //   mx = max(m, s.max()); alpha = exp(m - mx); p = exp(s - mx)
    //   l = alpha * l + p.sum();   o = alpha * o + p @ V;   m = mx
    // Guards keep -inf - (-inf) = nan out while a row has seen no visible key (m or mx = -inf).
    // NaN: fmaxf drops a NaN score or a NaN m from mx, but not from l (a NaN score gives a NaN p,
    // a NaN m a NaN alpha), and the output is taken from l, so the row ends NaN. The alpha guard
    // therefore tests m, not mx: with m NaN and this tile masked for the row (mx = -inf), alpha
    // must be NaN, not 1.
    const float alpha = m == -kInf ? 0.f : expf(m - mx);
#pragma unroll
    for (int t = 0; t < BK / TPR; ++t) Ps[r][lane + t * TPR] = s[t] == -kInf ? 0.f : expf(s[t] - mx);
    __syncthreads();
    float rowsum = 0.f;
    for (int j = 0; j < BK; ++j) rowsum += Ps[r][j];
    l = alpha * l + rowsum;
    m = mx;
#pragma unroll
    for (int j = 0; j < COLS; ++j) o[j] *= alpha;
    for (int j = 0; j < BK; ++j) {
      const float pj = Ps[r][j];
#pragma unroll
      for (int c = 0; c < COLS; ++c) o[c] += pj * Vs[j][lane + c * TPR];
    }
  }

  if (!row_ok) return;
  // out = o / l and lse = m + log(l). l != 0, not l > 0: a NaN l is a row that saw a bad value and
  // must come out NaN. l = 0: a row that sees visible keys whose scores are all -inf gets IEEE's
  // out = 0/0 = NaN, lse = log 0 = -inf (a later block with finite scores replaces it: its -inf keys
  // weigh 0); a row that sees no key at all gives out 0, lse -inf (accumulate: left as it was).
  const bool seen = l != 0.f;
  const bool sees_keys = row_sees_keys(p, qi);
  if (!seen && !sees_keys && p.accumulate) return;
  const float inv = 1.f / l;
  const float empty = sees_keys ? nanf("") : 0.f;
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    const int c = lane + j * TPR;
    if (c < p.dim) st(p.out, o_row + c, p.out_dtype, seen ? o[j] * inv : empty);
  }
  if (lane == 0) p.lse[l_at] = seen ? m + logf(l) : -kInf;
}

// ---- delta = rowsum(dout * out) -----------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) attn_delta_kernel(const AttnParams p) {
  const int64_t row = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // over (batch, heads, seq_q)
  if (row >= p.batch * p.heads * p.seq_q) return;
  const int64_t i = row % p.seq_q, h = (row / p.seq_q) % p.heads, b = row / (p.seq_q * p.heads);
  const int64_t o = b * p.o_sb + h * p.o_sh + i * p.o_ss, g = b * p.do_sb + h * p.do_sh + i * p.do_ss;
  float acc = 0.f;
  for (int64_t d = 0; d < p.dim; ++d) acc += ld(p.dout, g + d, p.dtype) * ld(p.out, o + d, p.out_dtype);
  p.delta[b * p.d_sb + h * p.d_sh + i] = acc;
}

// ---- backward ----------------------------------------------------------------------------------
// Grid (key tiles, kv heads, batch). For each query tile of each query head in the GQA group:
//   P  = exp(scale * K Q^T - lse)           (BK, BQ), 0 where masked
//   dP = V dO^T;  dS = scale * P * (dP - delta)
//   dV += P dO;   dK += dS Q;   dq += dS^T K   (atomicAdd)
// A thread owns key row kr = tid / TPR of the tile and DMAX / TPR columns of its dK, dV rows.
template <int DMAX>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const AttnParams p) {
  using C = BwdCfg<DMAX>;
  constexpr int BK = C::BK, BQ = C::BQ, TPR = kThreads / BK, COLS = DMAX / TPR;
  static_assert(kThreads % BK == 0 && DMAX % TPR == 0, "tile shape");
  __shared__ float Ks[BK][DMAX + 1];
  __shared__ float Vs[BK][DMAX + 1];
  __shared__ float Qs[BQ][DMAX + 1];
  __shared__ float dOs[BQ][DMAX + 1];
  __shared__ float Ps[BK][BQ + 1];
  __shared__ float dSs[BK][BQ + 1];
  __shared__ float lse_s[BQ], delta_s[BQ];
  RA_POISON_SHARED(Ks, Vs, Qs, dOs, Ps, dSs, lse_s, delta_s);

  const int64_t k0 = int64_t(blockIdx.x) * BK, hk = blockIdx.y, b = blockIdx.z;
  const int64_t group = p.heads / p.heads_kv;
  const int kr = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int64_t k_off = b * p.k_sb + hk * p.k_sh, v_off = b * p.v_sb + hk * p.v_sh;

  load_tile<BK, DMAX + 1>(Ks, p.k, p.dtype, k_off, p.k_ss, k0, p.seq_k, p.dim, DMAX);
  load_tile<BK, DMAX + 1>(Vs, p.v, p.dtype, v_off, p.v_ss, k0, p.seq_k, p.dim, DMAX);
  float dK[COLS], dV[COLS];
#pragma unroll
  for (int c = 0; c < COLS; ++c) dK[c] = dV[c] = 0.f;

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t q_off = b * p.q_sb + h * p.q_sh, g_off = b * p.do_sb + h * p.do_sh;
    for (int64_t q0 = 0; q0 < p.seq_q; q0 += BQ) {
      const int64_t q1 = q0 + BQ < p.seq_q ? q0 + BQ : p.seq_q;
      if (mask::tile_masked(p.mask, q0, q1 - 1, k0, (k0 + BK < p.seq_k ? k0 + BK : p.seq_k) - 1)) continue;  // block-uniform
      __syncthreads();                       // the previous query tile is fully consumed
      load_tile<BQ, DMAX + 1>(Qs, p.q, p.dtype, q_off, p.q_ss, q0, p.seq_q, p.dim, DMAX);
      load_tile<BQ, DMAX + 1>(dOs, p.dout, p.dtype, g_off, p.do_ss, q0, p.seq_q, p.dim, DMAX);
      for (int i = threadIdx.x; i < BQ; i += kThreads) {
        const bool ok = q0 + i < p.seq_q;
        lse_s[i] = ok ? p.lse[b * p.l_sb + h * p.l_sh + q0 + i] : -kInf;
        delta_s[i] = ok ? p.delta[b * p.d_sb + h * p.d_sh + q0 + i] : 0.f;
      }
      __syncthreads();

      for (int e = threadIdx.x; e < BK * BQ; e += kThreads) {
        const int j = e / BQ, i = e % BQ;
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < p.dim; ++d) {
          s += Ks[j][d] * Qs[i][d];
          dp += Vs[j][d] * dOs[i][d];
        }
        // IEEE p = exp(s - lse) for every visible pair: a row with lse = -inf that sees keys (all
        // its scores -inf) gets NaN probabilities, and a NaN lse NaN ones. Masked pairs are
        // selected to P = dS = 0, not multiplied (0 * (dp - delta) is NaN when the hidden key's v is).
        const bool use = visible(p, q0 + i, k0 + j);
        const float pr = use ? expf(s * p.scale - lse_s[i]) : 0.f;
        Ps[j][i] = pr;
        dSs[j][i] = use ? p.scale * pr * (dp - delta_s[i]) : 0.f;
      }
      __syncthreads();

#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        const int col = lane + c * TPR;
        float av = 0.f, ak = 0.f;
        for (int i = 0; i < BQ; ++i) {
          av += Ps[kr][i] * dOs[i][col];
          ak += dSs[kr][i] * Qs[i][col];
        }
        dV[c] += av;
        dK[c] += ak;
      }
      const int64_t dq_off = b * p.dq_sb + h * p.dq_sh;
      for (int e = threadIdx.x; e < BQ * p.dim; e += kThreads) {
        const int i = e / p.dim, col = e % p.dim;
        if (q0 + i >= p.seq_q) continue;
        float acc = 0.f;
        for (int j = 0; j < BK; ++j) acc += dSs[j][i] * Ks[j][col];
        atomicAdd(p.dq + dq_off + (q0 + i) * p.dq_ss + col, acc);
      }
    }
  }

  const int64_t kj = k0 + kr;
  if (kj >= p.seq_k) return;
  float* dk = p.dk + b * p.dk_sb + hk * p.dk_sh + kj * p.dk_ss;
  float* dv = p.dv + b * p.dv_sb + hk * p.dv_sh + kj * p.dv_ss;
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    const int col = lane + c * TPR;
    if (col < p.dim) {
      dk[col] += dK[c];
      dv[col] += dV[c];
    }
  }
}

template <int DMAX>
void launch_forward(const AttnParams& p) {
  const dim3 grid(unsigned(ceil_div(p.seq_q, FwdCfg<DMAX>::BQ)), unsigned(p.heads), unsigned(p.batch));
  RA_LAUNCH(attn_fwd_kernel<DMAX>, grid, dim3(kThreads), p.stream, p);
}

template <int DMAX>
void launch_backward(const AttnParams& p) {
  const dim3 grid(unsigned(ceil_div(p.seq_k, BwdCfg<DMAX>::BK)), unsigned(p.heads_kv), unsigned(p.batch));
  RA_LAUNCH(attn_bwd_kernel<DMAX>, grid, dim3(kThreads), p.stream, p);
}

}  // namespace

// ---- host entry points -------------------------------------------------------------------------
// Grid limits: y and z are at most 65535 (heads, batch); the bindings check them.
void attention_forward(const AttnParams& p) {
  if (p.batch == 0 || p.seq_q == 0 || p.heads == 0) return;  // nothing to write (seq_k == 0 is handled)
  if (attention_forward_mma(p)) return check_launch("attention_forward (tensor cores)");  // attention_mma.cu
  if (p.dim <= 64) launch_forward<64>(p);
  else if (p.dim <= 128) launch_forward<128>(p);
  else launch_forward<256>(p);
  check_launch("attention_forward");
}

void attention_delta(const AttnParams& p) {
  if (p.batch * p.heads * p.seq_q == 0) return;
  const dim3 grid(unsigned(ceil_div(p.batch * p.heads * p.seq_q, kThreads)));
  RA_LAUNCH(attn_delta_kernel, grid, dim3(kThreads), p.stream, p);
  check_launch("attention_delta");
}

void attention_backward(const AttnParams& p) {
  if (p.batch == 0 || p.seq_q == 0 || p.seq_k == 0 || p.heads == 0) return;  // no gradient to add
  if (attention_backward_mma(p)) return check_launch("attention_backward (tensor cores)");  // attention_mma.cu
  if (p.dim <= 64) launch_backward<64>(p);
  else if (p.dim <= 128) launch_backward<128>(p);
  else launch_backward<256>(p);
  check_launch("attention_backward");
}

}  // namespace gpu
}  // namespace ringattn
