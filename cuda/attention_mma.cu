// Flash attention forward on tensor cores: mma.sync m16n8k16 (bf16 or fp16 in, float32 accumulate),
// ldmatrix from swizzled shared memory, K/V tiles double-buffered with cp.async. The same contract as
// attn_fwd_kernel in cuda/attention.cu (which stays the general path and the reference): the mask of
// cpp/mask.hpp ((start, stride) positions, causal, sliding windows) with key tiles outside every
// row's visible range skipped, GQA, float32 LSE,
// the ring's accumulate-merge into a running (out, lse) where only lse = -inf means "nothing yet".
//
// Reads top-down: configuration and shared-memory budget, eligibility (the one place that decides
// whether a call takes this path), tile loads, the forward kernel, the backward kernel, the host entry points.
//
// Work split (as FlashAttention-2): grid (query tiles of BQ = 64 rows, heads, batch), 4 warps; warp w
// owns query rows 16 w .. 16 w + 15 of the tile for the whole key loop, so the online softmax needs
// only the 4 lanes of a quad (the lanes that share a row in the mma accumulator layout). Per key
// tile: S = Q K^T (Q fragments stay in registers), P = exp(S - m) in float32, P is re-packed from
// the accumulator layout straight into the A-operand layout (no shared memory round trip), O += P V.
// Precision: P is rounded to the input type before the P V product (as FlashAttention does); the
// scores, the running max and sum, the LSE and O are float32.
#include "mma.cuh"
#include "mma_config.hpp"

namespace ringattn {
namespace gpu {
namespace {

// ---- configuration -----------------------------------------------------------------------------
// Tile sizes and shared-memory budget (static_asserted there) live in cuda/mma_config.hpp, where the
// ptxas check (tests/test_ptxas.py) reads the dynamic shared memory each kernel launches with.
using namespace mma_cfg;

// A tile is rows x D elements; row r's 16-byte chunk c is stored at chunk c ^ (r % 8), so the 8 rows
// one ldmatrix reads (same chunk, consecutive rows) fall in 8 different bank groups.
// Rows of 4 chunks (64 bytes, two rows per 128) take chunk c ^ ((r / 2) % 4) instead: the same 8 rows
// again cover the 8 bank groups.
template <int D> __device__ __forceinline__ int swz(int r, int chunk) {
  static_assert(D % 32 == 0 && D >= 32, "swizzled rows of 4 or more 16-byte chunks");
  if constexpr (D / 8 >= 8) return r * D + ((chunk ^ (r % 8)) * 8);
  else return r * D + ((chunk ^ ((r / 2) % 4)) * 8);
}

// The mask is cpp/mask.hpp's, as in the SIMT kernels. Its visible sets are ranges of rows, so each
// lane computes, once, the range of keys its query rows see (forward) or of queries its key rows
// are seen by (backward), empty for rows past the end; the test per score is then whether the
// column falls in that range shifted to the tile: two int compares, no 64-bit position math.
struct Range {
  int64_t begin, end;
};
__device__ __forceinline__ Range keys_seen(const AttnParams& p, int64_t i) {
  if (i >= p.seq_q) return {0, 0};
  return {mask::key_begin(p.mask, i, p.seq_k), mask::key_end(p.mask, i, p.seq_k)};
}
__device__ __forceinline__ Range queries_seeing(const AttnParams& p, int64_t j) {
  if (j >= p.seq_k) return {0, 0};
  return {mask::query_begin(p.mask, j, p.seq_q), mask::query_end(p.mask, j, p.seq_q)};
}
// Columns [lo, hi) of a tile starting at row t0 with n columns that fall in r.
struct Cols {
  int lo, hi;
  __device__ __forceinline__ bool has(int c) const { return c >= lo && c < hi; }
};
__device__ __forceinline__ Cols in_tile(Range r, int64_t t0, int n) {
  return {int(mask::clamp(r.begin - t0, 0, n)), int(mask::clamp(r.end - t0, 0, n))};
}

// ---- eligibility -----------------------------------------------------------------------------------
// 16-bit inputs, head dim 64 or 128, and every row of q, k, v starting on 16 bytes (cp.async moves
// 16-byte chunks): 16-byte aligned bases and strides that are multiples of 8 elements.
bool aligned16(const void* ptr, int64_t sb, int64_t ss, int64_t sh) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && sb % 8 == 0 && ss % 8 == 0 && sh % 8 == 0;
}

// backward: dout too (it is loaded like q); dq, dk, dv are float32 and written element by element.
bool mma_eligible(const AttnParams& p, bool backward) {
  return (p.dtype == DType::bf16 || p.dtype == DType::f16) && (p.dim == 64 || p.dim == 128) &&
         aligned16(p.q, p.q_sb, p.q_ss, p.q_sh) && aligned16(p.k, p.k_sb, p.k_ss, p.k_sh) &&
         aligned16(p.v, p.v_sb, p.v_ss, p.v_sh) && (!backward || aligned16(p.dout, p.do_sb, p.do_ss, p.do_sh));
}

// ---- tile loads ------------------------------------------------------------------------------------
// Rows [r0, r0 + R) of one head into a swizzled tile with cp.async; rows past n are zero-filled.
template <int D, int R, class T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t row_stride, int64_t r0, int64_t n) {
  constexpr int C = D / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < R * C; e += kMmaThreads) {
    const int r = e / C, c = e % C;
    const bool ok = r0 + r < n;
    mma::cp_async_16(tile + swz<D>(r, c), ok ? base + (r0 + r) * row_stride + c * 8 : base, ok ? 16 : 0);
  }
}

// ---- the kernel ------------------------------------------------------------------------------------
template <int D, class T>
__global__ void __launch_bounds__(kMmaThreads) attn_fwd_mma_kernel(const AttnParams p) {
  constexpr int KS = D / 16;    // k-steps of the Q K^T product
  constexpr int NS = kBK / 8;   // 8-key column tiles of S
  constexpr int NO = D / 8;     // 8-wide column tiles of O
  // Shared memory: Q, then buffer 0 (K, V), then buffer 1 (K, V); pointers computed, not indexed
  // from an array (an array indexed by the buffer number would live in local memory).
  T* Qs = mma::dynamic_smem<T>();
  auto Ks = [&](int buf) { return Qs + kBQ * D + buf * 2 * kBK * D; };
  auto Vs = [&](int buf) { return Ks(buf) + kBK * D; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = int64_t(blockIdx.x) * kBQ, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.heads / p.heads_kv);
  const int64_t q1 = q0 + kBQ < p.seq_q ? q0 + kBQ : p.seq_q;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  // Query rows of this lane: r[0] = g and r[1] = g + 8 of the warp's 16 (accumulator rows).
  int64_t qi[2];
  Range row_keys[2];  // the keys each of those rows sees
  for (int x = 0; x < 2; ++x) {
    qi[x] = q0 + 16 * warp + lane / 4 + 8 * x;
    row_keys[x] = keys_seen(p, qi[x]);
  }

  // Prologue: Q (group 0) and the first K/V tile (group 1).
  load_tile_async<D, kBQ>(Qs, q, p.q_ss, q0, p.seq_q);
  mma::cp_async_commit();
  // Keys any row of the tile sees (block-uniform; positions grow with the row): from the first
  // row's begin to the last row's end. Key tiles start there, not on multiples of kBK.
  const int64_t kb = mask::key_begin(p.mask, q0, p.seq_k), ke = mask::key_end(p.mask, q1 - 1, p.seq_k);
  if (kb < ke) {
    load_tile_async<D, kBK>(Ks(0), k, p.k_ss, kb, p.seq_k);
    load_tile_async<D, kBK>(Vs(0), v, p.v_ss, kb, p.seq_k);
  }
  mma::cp_async_commit();

  // Running state; in accumulate mode resumed from (out, lse) exactly as attn_fwd_kernel does:
  // (m, l, o) = (lse_old, 1, out_old), and only lse_old = -inf starts a row afresh (a NaN stays).
  float m[2], l[2], o[NO][4];
  for (int x = 0; x < 2; ++x) {
    const float lse_old = (p.accumulate && qi[x] < p.seq_q) ? p.lse[b * p.l_sb + h * p.l_sh + qi[x]] : -kInf;
    m[x] = lse_old;
    l[x] = lse_old != -kInf ? 1.f : 0.f;
  }
  for (int j = 0; j < NO; ++j)
    for (int i = 0; i < 4; ++i) {
      const mma::RC e = mma::c_elem(lane, i);
      const int x = i / 2;
      o[j][i] = (l[x] != 0.f) ? ld(p.out, b * p.o_sb + h * p.o_sh + qi[x] * p.o_ss + 8 * j + e.col, p.out_dtype) : 0.f;
    }

  mma::cp_async_wait<1>();  // Q has landed
  __syncthreads();
  uint32_t qf[KS][4];
  for (int s = 0; s < KS; ++s) {
    const int mtx = lane / 8;  // matrices: (rows 0-7 | 8-15) x (chunk 2 s | 2 s + 1)
    mma::ldmatrix<4, false>(qf[s], Qs + swz<D>(16 * warp + 8 * (mtx % 2) + lane % 8, 2 * s + mtx / 2));
  }

  for (int64_t k0 = kb, t = 0; k0 < ke; k0 += kBK, ++t) {
    const int buf = int(t % 2);
    // Prefetch the next tile into the other buffer (its last readers passed the barrier at the end
    // of the previous iteration); an empty group keeps "wait for all but the newest" uniform.
    const int64_t kn = k0 + kBK;
    if (kn < ke) {
      load_tile_async<D, kBK>(Ks(1 - buf), k, p.k_ss, kn, p.seq_k);
      load_tile_async<D, kBK>(Vs(1 - buf), v, p.v_ss, kn, p.seq_k);
    }
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // this tile has landed (for this thread's copies) ...
    __syncthreads();          // ... and for every thread's

    // S = Q K^T for the warp's 16 rows and the tile's 64 keys.
    float s[NS][4];
    for (int j = 0; j < NS; ++j)
      for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
    for (int ks = 0; ks < KS; ++ks)
      for (int j = 0; j < NS; j += 2) {
        const int mtx = lane / 8;  // matrices: (keys 8 j | 8 j + 8) x (chunk 2 ks | 2 ks + 1)
        uint32_t kb[4];
        mma::ldmatrix<4, false>(kb, Ks(buf) + swz<D>(8 * j + 8 * (mtx / 2) + lane % 8, 2 * ks + mtx % 2));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma::mma_16816<T>(s[j], qf[ks], b0, s[j]);
        mma::mma_16816<T>(s[j + 1], qf[ks], b1, s[j + 1]);
      }

    // Online softmax, NumPy of one row with scores s (1, 64) and values V (64, D):
    //   mx = max(m, s.max()); alpha = exp(m - mx); p = exp(s - mx)
    //   l = alpha * l + p.sum();   o = alpha * o + p @ V;   m = mx
    // The guards and the NaN behaviour are those of attn_fwd_kernel (see there): fmaxf drops a NaN
    // from mx but not from l, and alpha tests m, not mx.
    float mx[2] = {m[0], m[1]};
    const Cols vis[2] = {in_tile(row_keys[0], k0, kBK), in_tile(row_keys[1], k0, kBK)};
    for (int j = 0; j < NS; ++j)
      for (int i = 0; i < 4; ++i) {
        const mma::RC e = mma::c_elem(lane, i);
        const int x = i / 2;
        s[j][i] = vis[x].has(8 * j + e.col) ? s[j][i] * p.scale : -kInf;
        mx[x] = fmaxf(mx[x], s[j][i]);
      }
    for (int x = 0; x < 2; ++x)  // the 4 lanes of a quad hold one row
      for (int w = 1; w < 4; w *= 2) mx[x] = fmaxf(mx[x], __shfl_xor_sync(0xffffffffu, mx[x], w));
    float alpha[2], rowsum[2] = {0.f, 0.f};
    for (int x = 0; x < 2; ++x) alpha[x] = m[x] == -kInf ? 0.f : expf(m[x] - mx[x]);
    for (int j = 0; j < NS; ++j)
      for (int i = 0; i < 4; ++i) {
        const int x = i / 2;
        s[j][i] = s[j][i] == -kInf ? 0.f : expf(s[j][i] - mx[x]);
        rowsum[x] += s[j][i];
      }
    for (int x = 0; x < 2; ++x) {
      for (int w = 1; w < 4; w *= 2) rowsum[x] += __shfl_xor_sync(0xffffffffu, rowsum[x], w);
      l[x] = alpha[x] * l[x] + rowsum[x];
      m[x] = mx[x];
    }
    for (int j = 0; j < NO; ++j)
      for (int i = 0; i < 4; ++i) o[j][i] *= alpha[i / 2];

    // O += P V: P's accumulator tiles 2 kk and 2 kk + 1 are the A operand of k-step kk (same
    // lanes, same rows); V comes in with ldmatrix.trans.
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const uint32_t pa[4] = {mma::pack2<T>(s[2 * kk][0], s[2 * kk][1]), mma::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              mma::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              mma::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int j = 0; j < NO; j += 2) {
        const int mtx = lane / 8;  // matrices: (keys 16 kk | 16 kk + 8) x (chunk j | j + 1)
        uint32_t vb[4];
        mma::ldmatrix<4, true>(vb, Vs(buf) + swz<D>(16 * kk + 8 * (mtx % 2) + lane % 8, j + mtx / 2));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma::mma_16816<T>(o[j], pa, b0, o[j]);
        mma::mma_16816<T>(o[j + 1], pa, b1, o[j + 1]);
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next prefetch overwrites it
  }
  mma::cp_async_wait<0>();

  // out = o / l and lse = m + log(l), with attn_fwd_kernel's rules: a NaN l stays NaN; l = 0 with
  // visible keys (all their scores -inf) gives out NaN (0/0), lse -inf; a row that sees no key at
  // all gives out 0, lse -inf, or in accumulate mode is left as it was.
  for (int x = 0; x < 2; ++x) {
    if (qi[x] >= p.seq_q) continue;
    const bool seen = l[x] != 0.f, sees_keys = row_keys[x].begin < row_keys[x].end;
    if (!seen && !sees_keys && p.accumulate) continue;
    const float inv = 1.f / l[x], empty = sees_keys ? nanf("") : 0.f;
    for (int j = 0; j < NO; ++j)
      for (int i = 2 * x; i < 2 * x + 2; ++i) {
        const int col = 8 * j + mma::c_elem(lane, i).col;
        st(p.out, b * p.o_sb + h * p.o_sh + qi[x] * p.o_ss + col, p.out_dtype, seen ? o[j][i] * inv : empty);
      }
    if (lane % 4 == 0) p.lse[b * p.l_sb + h * p.l_sh + qi[x]] = seen ? m[x] + logf(l[x]) : -kInf;
  }
}

template <int D, class T>
void launch_fwd_mma(const AttnParams& p) {
  constexpr int smem = fwd_mma_smem_bytes<D>();
  const dim3 grid(unsigned(ceil_div(p.seq_q, kBQ)), unsigned(p.heads), unsigned(p.batch));
  void (*kernel)(const AttnParams) = attn_fwd_mma_kernel<D, T>;
#ifndef RA_EMULATE
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);  // above 48 KiB: opt in
#endif
  RA_LAUNCH_SMEM("attn_fwd_mma_kernel", kernel, grid, dim3(kMmaThreads), smem, p.stream, p);
}


// ---- the backward kernel ---------------------------------------------------------------------------
// FlashAttention-2's backward split: grid (key tiles of kBK = 64 keys, kv heads, batch), 4 warps;
// warp w owns keys 16 w .. 16 w + 15 of the tile, and the block walks every query tile of every
// query head of its GQA group. Per query tile (NumPy, for the warp's keys K (16, D)):
//   S^T = K Q^T;  P^T = exp(scale S^T - lse)       0 where masked or lse = -inf
//   dP^T = V dO^T; dS^T = scale P^T (dP^T - delta)  0 there too
//   dV += P^T dO;  dK += dS^T Q                     float32, in registers, written once at the end
//   dq += dS K                                      float32 atomicAdd (every key tile adds to it)
// S^T and dP^T come out of mma.sync in the accumulator layout, which is the A-operand layout of the
// dV / dK products once packed (as P in the forward); dQ needs dS with queries as rows, so dS^T
// goes through shared memory and comes back with ldmatrix.trans. P^T and dS^T are rounded to the
// input type before their products, as FlashAttention does; everything else is float32.
// The guards are attn_bwd_kernel's (cuda/attention.cu): IEEE exp(s - lse) for every visible pair
// (lse = -inf with visible keys, i.e. all their scores -inf, or a NaN lse: NaN probabilities); a
// masked pair is selected to exactly 0 (not 0 * (dp - delta), NaN when a hidden key's v is).
//
// Per-D configuration (the query tile, K / V fragments in registers or not): BwdMmaCfg in
// cuda/mma_config.hpp, with the shared memory: K and V tiles, the dS^T tile, two buffers of (Q, dO).

// The A fragment (16 rows of the warp x 16 columns, k-step s) of a row-major swizzled tile.
template <int D, class T>
__device__ __forceinline__ void a_frag(uint32_t (&r)[4], const T* tile, int warp, int lane, int s) {
  const int mtx = lane / 8;  // matrices: (rows 0-7 | 8-15) x (chunk 2 s | 2 s + 1)
  mma::ldmatrix<4, false>(r, tile + swz<D>(16 * warp + 8 * (mtx % 2) + lane % 8, 2 * s + mtx / 2));
}

template <int D, class T>
__global__ void __launch_bounds__(kMmaThreads) attn_bwd_mma_kernel(const AttnParams p) {
  using C = BwdMmaCfg<D>;
  constexpr int BQ = C::BQ;
  constexpr bool KV_REGS = C::kv_regs;
  constexpr int KS = D / 16;       // k-steps over the head dim (S^T, dP^T)
  constexpr int NS = BQ / 8;       // 8-query column tiles of S^T, dP^T
  constexpr int NO = D / 8;        // 8-wide column tiles of dK, dV, dQ
  constexpr int MQ = BQ / 16;      // 16-row query tiles of dQ
  constexpr int NQ = NO * MQ / kWarps;  // dQ column tiles per warp (warp w: row tile w % MQ)
  static_assert(kWarps % MQ == 0 && NQ % 2 == 0 && NS % 2 == 0, "tile split");
  T* Ks = mma::dynamic_smem<T>();
  T* Vs = Ks + kBK * D;
  T* dSs = Vs + kBK * D;
  auto Qs = [&](int buf) { return dSs + kBK * BQ + buf * 2 * BQ * D; };
  auto dOs = [&](int buf) { return Qs(buf) + BQ * D; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = int64_t(blockIdx.x) * kBK, hk = blockIdx.y, b = blockIdx.z;
  const int64_t group = p.heads / p.heads_kv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  // Query tiles t = 0 .. tiles - 1 over (head of the group, query tile). The queries that see any key
  // of this tile are one range (positions increase with the row): from those of its first key to
  // those of its last; only the query tiles (multiples of BQ) that meet it are walked.
  const int64_t k_last = (k0 + kBK < p.seq_k ? k0 + kBK : p.seq_k) - 1;
  const int64_t qb = mask::query_begin(p.mask, k0, p.seq_q), qe = mask::query_end(p.mask, k_last, p.seq_q);
  const int64_t first = qb / BQ, per_head = qb < qe ? ceil_div(qe, BQ) - first : 0, tiles = group * per_head;
  auto head_of = [&](int64_t t) { return hk * group + t / per_head; };
  auto q0_of = [&](int64_t t) { return (first + t % per_head) * BQ; };
  auto load_q_tile = [&](int64_t t, int buf) {
    const int64_t h = head_of(t), q0 = q0_of(t);
    load_tile_async<D, BQ>(Qs(buf), static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh, p.q_ss, q0, p.seq_q);
    load_tile_async<D, BQ>(dOs(buf), static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh, p.do_ss, q0, p.seq_q);
  };

  // Prologue: K and V (group 0), the first (Q, dO) tile (group 1).
  load_tile_async<D, kBK>(Ks, k, p.k_ss, k0, p.seq_k);
  load_tile_async<D, kBK>(Vs, v, p.v_ss, k0, p.seq_k);
  mma::cp_async_commit();
  if (tiles > 0) load_q_tile(0, 0);
  mma::cp_async_commit();
  mma::cp_async_wait<1>();  // K and V have landed
  __syncthreads();
  uint32_t kf[KV_REGS ? KS : 1][4], vf[KV_REGS ? KS : 1][4];
  if constexpr (KV_REGS)
    for (int s = 0; s < KS; ++s) {
      a_frag<D>(kf[s], Ks, warp, lane, s);
      a_frag<D>(vf[s], Vs, warp, lane, s);
    }

  float dk[NO][4], dv[NO][4];
  for (int j = 0; j < NO; ++j)
    for (int i = 0; i < 4; ++i) dk[j][i] = dv[j][i] = 0.f;

  for (int64_t t = 0; t < tiles; ++t) {
    const int buf = int(t % 2);
    // Prefetch the next tile into the other buffer (its readers passed the barrier ending the
    // previous iteration); an empty group keeps "wait for all but the newest" uniform.
    if (t + 1 < tiles) load_q_tile(t + 1, 1 - buf);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
    __syncthreads();
    const int64_t h = head_of(t), q0 = q0_of(t);

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's BQ queries.
    float s[NS][4], dp[NS][4];
    for (int j = 0; j < NS; ++j)
      for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.f;
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t kt[4], vt[4];
      if constexpr (!KV_REGS) {
        a_frag<D>(kt, Ks, warp, lane, ks);
        a_frag<D>(vt, Vs, warp, lane, ks);
      }
      const uint32_t(&ka)[4] = KV_REGS ? kf[KV_REGS ? ks : 0] : kt;
      const uint32_t(&va)[4] = KV_REGS ? vf[KV_REGS ? ks : 0] : vt;
      for (int j = 0; j < NS; j += 2) {
        const int mtx = lane / 8;  // matrices: (queries 8 j | 8 j + 8) x (chunk 2 ks | 2 ks + 1)
        const int at = swz<D>(8 * j + 8 * (mtx / 2) + lane % 8, 2 * ks + mtx % 2);
        uint32_t qb[4], ob[4];
        mma::ldmatrix<4, false>(qb, Qs(buf) + at);
        mma::ldmatrix<4, false>(ob, dOs(buf) + at);
        const uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]}, o0b[2] = {ob[0], ob[1]}, o1b[2] = {ob[2], ob[3]};
        mma::mma_16816<T>(s[j], ka, q0b, s[j]);
        mma::mma_16816<T>(s[j + 1], ka, q1b, s[j + 1]);
        mma::mma_16816<T>(dp[j], va, o0b, dp[j]);
        mma::mma_16816<T>(dp[j + 1], va, o1b, dp[j + 1]);
      }
    }

    // P^T into s, dS^T into dp (accumulator layout: key row 16 w + e.row, query column 8 j + e.col).
    const float* lse = p.lse + b * p.l_sb + h * p.l_sh;
    const float* delta = p.delta + b * p.d_sb + h * p.d_sh;
    // The tile's queries that see this lane's key rows 16 w + g and 16 w + g + 8 (accumulator rows);
    // recomputed per tile rather than kept: at D 128 the block has no registers to spare for them.
    const int64_t kj = k0 + 16 * warp + lane / 4;
    const Cols vis[2] = {in_tile(queries_seeing(p, kj), q0, BQ), in_tile(queries_seeing(p, kj + 8), q0, BQ)};
    for (int j = 0; j < NS; ++j)
      for (int i = 0; i < 4; ++i) {
        const mma::RC e = mma::c_elem(lane, i);
        const int64_t qi = q0 + 8 * j + e.col;
        const bool use = vis[i / 2].has(8 * j + e.col);
        const float pr = use ? expf(s[j][i] * p.scale - lse[qi]) : 0.f;
        s[j][i] = pr;
        dp[j][i] = use ? p.scale * pr * (dp[j][i] - delta[qi]) : 0.f;
      }
    // dS^T to shared memory for the dQ product (pairs of query columns in one 32-bit word).
    for (int j = 0; j < NS; ++j)
      for (int x = 0; x < 2; ++x) {
        const int row = 16 * warp + lane / 4 + 8 * x;
        *reinterpret_cast<uint32_t*>(dSs + swz<BQ>(row, j) + 2 * (lane % 4)) = mma::pack2<T>(dp[j][2 * x], dp[j][2 * x + 1]);
      }

    // dV += P^T dO and dK += dS^T Q: accumulator tiles 2 kk, 2 kk + 1 are the A operand of query
    // step kk; dO and Q come in with ldmatrix.trans (queries are the reduction axis).
    for (int kk = 0; kk < BQ / 16; ++kk) {
      const uint32_t pa[4] = {mma::pack2<T>(s[2 * kk][0], s[2 * kk][1]), mma::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              mma::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              mma::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t da[4] = {mma::pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), mma::pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                              mma::pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              mma::pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
      for (int j = 0; j < NO; j += 2) {
        const int mtx = lane / 8;  // matrices: (queries 16 kk | 16 kk + 8) x (chunk j | j + 1)
        const int at = swz<D>(16 * kk + 8 * (mtx % 2) + lane % 8, j + mtx / 2);
        uint32_t ob[4], qb[4];
        mma::ldmatrix<4, true>(ob, dOs(buf) + at);
        mma::ldmatrix<4, true>(qb, Qs(buf) + at);
        const uint32_t o0b[2] = {ob[0], ob[1]}, o1b[2] = {ob[2], ob[3]}, q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
        mma::mma_16816<T>(dv[j], pa, o0b, dv[j]);
        mma::mma_16816<T>(dv[j + 1], pa, o1b, dv[j + 1]);
        mma::mma_16816<T>(dk[j], da, q0b, dk[j]);
        mma::mma_16816<T>(dk[j + 1], da, q1b, dk[j + 1]);
      }
    }
    __syncthreads();  // every warp's dS^T is in shared memory

    // dq += dS K: warp w takes query rows 16 (w % MQ) .. + 15 and column tiles n0 .. n0 + NQ - 1.
    {
      const int mt = warp % MQ, n0 = (warp / MQ) * NQ;
      float dq[NQ][4];
      for (int j = 0; j < NQ; ++j)
        for (int i = 0; i < 4; ++i) dq[j][i] = 0.f;
      for (int kk = 0; kk < kBK / 16; ++kk) {
        const int mtx = lane / 8;  // dS^T matrices: (keys 16 kk | 16 kk + 8) x (queries 16 mt | 16 mt + 8)
        uint32_t a[4];
        mma::ldmatrix<4, true>(a, dSs + swz<BQ>(16 * kk + 8 * (mtx / 2) + lane % 8, 2 * mt + mtx % 2));
        for (int j = 0; j < NQ; j += 2) {
          uint32_t kb[4];  // K matrices: (keys 16 kk | 16 kk + 8) x (chunk n0 + j | + 1)
          mma::ldmatrix<4, true>(kb, Ks + swz<D>(16 * kk + 8 * (mtx % 2) + lane % 8, n0 + j + mtx / 2));
          const uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
          mma::mma_16816<T>(dq[j], a, k0b, dq[j]);
          mma::mma_16816<T>(dq[j + 1], a, k1b, dq[j + 1]);
        }
      }
      float* dqh = p.dq + b * p.dq_sb + h * p.dq_sh;
      for (int j = 0; j < NQ; ++j)
        for (int i = 0; i < 4; ++i) {
          const mma::RC e = mma::c_elem(lane, i);
          const int64_t qi = q0 + 16 * mt + e.row;
          if (qi < p.seq_q) atomicAdd(dqh + qi * p.dq_ss + 8 * (n0 + j) + e.col, dq[j][i]);
        }
    }
    __syncthreads();  // this buffer and dS^T are free for the next prefetch and tile
  }
  mma::cp_async_wait<0>();

  // dk, dv += the block's sums (the block owns these key rows: no atomics).
  for (int x = 0; x < 2; ++x) {
    const int64_t kj = k0 + 16 * warp + lane / 4 + 8 * x;
    if (kj >= p.seq_k) continue;
    float* dkr = p.dk + b * p.dk_sb + hk * p.dk_sh + kj * p.dk_ss;
    float* dvr = p.dv + b * p.dv_sb + hk * p.dv_sh + kj * p.dv_ss;
    for (int j = 0; j < NO; ++j)
      for (int i = 2 * x; i < 2 * x + 2; ++i) {
        const int col = 8 * j + mma::c_elem(lane, i).col;
        dkr[col] += dk[j][i];
        dvr[col] += dv[j][i];
      }
  }
}

template <int D, class T>
void launch_bwd_mma(const AttnParams& p) {
  constexpr int smem = bwd_mma_smem_bytes<D>();
  const dim3 grid(unsigned(ceil_div(p.seq_k, kBK)), unsigned(p.heads_kv), unsigned(p.batch));
  void (*kernel)(const AttnParams) = attn_bwd_mma_kernel<D, T>;
#ifndef RA_EMULATE
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);  // above 48 KiB: opt in
#endif
  RA_LAUNCH_SMEM("attn_bwd_mma_kernel", kernel, grid, dim3(kMmaThreads), smem, p.stream, p);
}

}  // namespace

// ---- host entry points -----------------------------------------------------------------------------
bool attention_forward_mma(const AttnParams& p) {
  if (!mma_eligible(p, false)) return false;
  const bool bf16 = p.dtype == DType::bf16;
  if (p.dim == 64) bf16 ? launch_fwd_mma<64, __nv_bfloat16>(p) : launch_fwd_mma<64, __half>(p);
  else bf16 ? launch_fwd_mma<128, __nv_bfloat16>(p) : launch_fwd_mma<128, __half>(p);
  return true;
}

bool attention_backward_mma(const AttnParams& p) {
  if (!mma_eligible(p, true)) return false;
  const bool bf16 = p.dtype == DType::bf16;
  if (p.dim == 64) bf16 ? launch_bwd_mma<64, __nv_bfloat16>(p) : launch_bwd_mma<64, __half>(p);
  else bf16 ? launch_bwd_mma<128, __nv_bfloat16>(p) : launch_bwd_mma<128, __half>(p);
  return true;
}

#ifdef RA_EMULATE
std::vector<std::pair<std::string, long>> emulated_launches() {
  std::lock_guard<std::mutex> lock(::ra_emu::launch_mutex());
  return {::ra_emu::counters().begin(), ::ra_emu::counters().end()};
}
#endif

}  // namespace gpu
}  // namespace ringattn
