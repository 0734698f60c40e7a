// Host emulation of the CUDA subset the kernels use (built only with -DRA_EMULATE, by tests).
//
// What a launch does here:
//   - blocks run one at a time, in a shuffled order (a real GPU promises no order either);
//   - the threads of a block are fibers (ucontext) on the calling host thread, scheduled
//     cooperatively: a thread runs until it reaches __syncthreads or a warp-level operation, then
//     the next ready thread runs; released threads resume in a shuffled order. One host thread per
//     launch makes a run deterministic for a given seed, and a barrier nobody can complete is seen
//     at once (no timeout needed): the launch fails with the kernel's name, the block and where each
//     waiting thread is;
//   - warp-level operations (__shfl_sync, __shfl_xor_sync, __syncwarp, and the ldmatrix / mma.sync
//     of cuda/mma.cuh through warp_collective) meet all 32 lanes of the warp: the last lane to
//     arrive computes every lane's result from every lane's operands. Between two such operations
//     the lanes run one after another, which is what CUDA guarantees since Volta (independent
//     thread scheduling: lanes converge only at the warp-synchronous operations);
//   - cp.async copies (cuda/mma.cuh) poison their destination when issued and land only at the
//     cp.async.wait_group that covers them, so a missing wait reads NaN bytes;
//   - dynamic shared memory and the static __shared__ arrays of non-template functions are poisoned
//     (0xFF bytes: NaN in every float format) before each block. GCC ignores the section attribute
//     on the statics of function templates, so a template kernel names its static arrays in
//     RA_POISON_SHARED(...) (common.cuh) right after declaring them: the first thread of each block
//     to get there poisons them (before any thread of the block can have used them).
// Seed: RA_EMU_SEED, or a random one printed to stderr at the first launch (pytest shows it with a
// failing test's output; set RA_EMU_SEED to replay the same block and thread orders).
//
// Launches from several host threads are serialised (static shared memory is one copy). This
// checks indexing, masking, synchronisation and register layouts, not speed.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
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
#define __shared__ __attribute__((section("ra_shared"))) static
#define __forceinline__ inline
#define __launch_bounds__(...)

extern "C" unsigned char __start_ra_shared[] __attribute__((weak));
extern "C" unsigned char __stop_ra_shared[] __attribute__((weak));

namespace ra_emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kPoison = 0xFF;

inline thread_local uint3 threadIdx_, blockIdx_;
inline dim3 blockDim_, gridDim_;

// ---- cp.async bookkeeping (per thread) --------------------------------------------------------------
struct Copy {
  void* dst;
  int bytes;
  unsigned char data[16];
};

// ---- fibers -------------------------------------------------------------------------------------
struct Fiber {
  enum State { ready, at_block, at_warp, done };
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid{};
  int linear = 0, warp = 0, lane = 0;
  State state = ready;
  // the warp operation this lane waits in
  const char* op = nullptr;
  const void* in = nullptr;
  void* out = nullptr;
  std::vector<Copy> uncommitted;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
};

using Combine = void (*)(const void* const* ins, void* const* outs, void* ctx);

struct Block {
  const char* kernel;
  std::vector<Fiber> fibers;
  std::vector<int> ready;  // run queue, front = back of the vector
  int live = 0, at_block = 0;
  std::vector<int> warp_arrived;
  ucontext_t sched;
  Fiber* cur = nullptr;
  std::function<void()> body;
  std::mt19937_64* rng = nullptr;
  std::string error;
};

inline thread_local Block* block_ = nullptr;

inline uint64_t seed() {
  static const uint64_t s = [] {
    const char* e = std::getenv("RA_EMU_SEED");
    const uint64_t v = e && *e ? std::strtoull(e, nullptr, 0) : std::random_device{}();
    if (!(e && *e))
      std::fprintf(stderr, "ra_emu: shuffled block and thread order, RA_EMU_SEED=%llu (set it to replay)\n",
                   static_cast<unsigned long long>(v));
    return v;
  }();
  return s;
}

// Launch counts per kernel name (the tests ask which kernel a call used).
inline std::map<std::string, long>& counters() {
  static std::map<std::string, long> c;
  return c;
}

inline std::vector<char*>& stack_pool() {
  static thread_local std::vector<char*> pool;
  return pool;
}

inline char* take_stack() {
  auto& pool = stack_pool();
  if (!pool.empty()) {
    char* s = pool.back();
    pool.pop_back();
    return s;
  }
  void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("ra_emu: cannot allocate a fiber stack");
  mprotect(m, kGuardBytes, PROT_NONE);  // an overflowing kernel thread faults instead of corrupting
  return static_cast<char*>(m);
}

inline std::string where(const Block& b) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "kernel %s, block (%u, %u, %u), thread %d", b.kernel, blockIdx_.x, blockIdx_.y,
                blockIdx_.z, b.cur ? b.cur->linear : -1);
  return buf;
}

// Stop the block with an error (called on a fiber; never returns to the kernel code).
[[noreturn]] inline void fail(const std::string& msg) {
  Block* b = block_;
  if (b->error.empty()) b->error = "emulated CUDA: " + msg + " (" + where(*b) + ", RA_EMU_SEED=" + std::to_string(seed()) + ")";
  swapcontext(&b->cur->ctx, &b->sched);
  std::abort();  // never resumed
}

inline void make_ready(Block& b, std::vector<int> ids) {
  std::shuffle(ids.begin(), ids.end(), *b.rng);
  for (int i : ids) {
    b.fibers[i].state = Fiber::ready;
    b.ready.insert(b.ready.begin(), i);  // runs after those already queued
  }
}

// All live threads are at __syncthreads: release them.
inline void release_block(Block& b) {
  std::vector<int> ids;
  for (auto& f : b.fibers)
    if (f.state == Fiber::at_block) ids.push_back(f.linear);
  b.at_block = 0;
  make_ready(b, ids);
}

inline void yield_to_scheduler() {
  Block* b = block_;
  swapcontext(&b->cur->ctx, &b->sched);
}

inline void syncthreads() {
  Block& b = *block_;
  b.cur->state = Fiber::at_block;
  if (++b.at_block == b.live) release_block(b);
  yield_to_scheduler();
}

inline int warp_size_of(const Block& b, int warp) {
  return std::min<int>(kWarp, int(b.fibers.size()) - warp * kWarp);
}

// The warp-synchronous operation `op`: every lane of the caller's warp passes its operand `in` and
// receives `out`; the last lane to arrive runs combine(ins[32], outs[32], ctx) in lane order. All 32
// lanes must take part (full mask), in the same operation.
inline void warp_collective(const char* op, const void* in, void* out, Combine combine, void* ctx = nullptr) {
  Block& b = *block_;
  Fiber& me = *b.cur;
  const int w = me.warp, n = warp_size_of(b, w);
  if (n != kWarp) fail(std::string(op) + " needs a full warp of 32 threads (block size is not a multiple of 32)");
  me.op = op;
  me.in = in;
  me.out = out;
  me.state = Fiber::at_warp;
  if (++b.warp_arrived[w] < n) {
    yield_to_scheduler();
    return;
  }
  b.warp_arrived[w] = 0;
  const void* ins[kWarp];
  void* outs[kWarp];
  std::vector<int> others;
  for (int l = 0; l < kWarp; ++l) {
    Fiber& f = b.fibers[w * kWarp + l];
    if (std::strcmp(f.op, op) != 0)
      fail("lanes of warp " + std::to_string(w) + " diverged: lane " + std::to_string(l) + " is in " + f.op +
           " while lane " + std::to_string(me.lane) + " is in " + op);
    ins[l] = f.in;
    outs[l] = f.out;
    if (&f != &me) others.push_back(f.linear);
  }
  combine(ins, outs, ctx);
  me.state = Fiber::ready;
  make_ready(b, others);
}

inline void check_full_mask(unsigned mask, const char* op) {
  if (mask != 0xffffffffu) fail(std::string(op) + ": only the full mask 0xffffffff is emulated");
}

template <class T>
struct ShflIn {
  T v;
  int src;
};

template <class T>
T shfl(const char* op, T v, int src) {
  ShflIn<T> in{v, src};
  T out;
  warp_collective(op, &in, &out, [](const void* const* ins, void* const* outs, void*) {
    for (int l = 0; l < kWarp; ++l) {
      const int s = static_cast<const ShflIn<T>*>(ins[l])->src;
      *static_cast<T*>(outs[l]) = static_cast<const ShflIn<T>*>(ins[s])->v;
    }
  });
  return out;
}

inline int lane_id() { return block_->cur->lane; }

// ---- cp.async -----------------------------------------------------------------------------------
// Issue: read the source now (it is global memory, not written during the kernel), poison the
// destination; the bytes land at the wait_group that covers the copy's group.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Copy c{dst, bytes, {}};
  if (src_bytes > 0) std::memcpy(c.data, src, size_t(src_bytes));
  std::memset(c.data + src_bytes, 0, size_t(bytes - src_bytes));  // zero fill past src_bytes
  std::memset(dst, kPoison, size_t(bytes));
  block_->cur->uncommitted.push_back(c);
}

inline void cp_async_commit() {
  Fiber& f = *block_->cur;
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

// Wait until at most `n` of this thread's committed groups are pending.
inline void cp_async_wait(int n) {
  Fiber& f = *block_->cur;
  while (int(f.groups.size()) > n) {
    for (const Copy& c : f.groups.front()) std::memcpy(c.dst, c.data, size_t(c.bytes));
    f.groups.erase(f.groups.begin());
  }
}

// ---- dynamic shared memory ----------------------------------------------------------------------
inline std::vector<unsigned char>& dynamic_smem_buffer() {
  static std::vector<unsigned char> buf;
  return buf;
}
inline unsigned char* dynamic_smem() { return dynamic_smem_buffer().data(); }

// ---- static shared memory of function templates (RA_POISON_SHARED) ------------------------------
inline uint64_t& block_generation() {  // advanced before each block of each launch
  static uint64_t g = 0;
  return g;
}
// address -> (bytes, generation of the block that last poisoned it)
inline std::map<const unsigned char*, std::pair<size_t, uint64_t>>& template_statics() {
  static std::map<const unsigned char*, std::pair<size_t, uint64_t>> m;
  return m;
}
inline void poison_static(void* p, size_t bytes) {
  auto& e = template_statics()[static_cast<const unsigned char*>(p)];
  if (e.second != block_generation()) {
    std::memset(p, kPoison, bytes);
    e = {bytes, block_generation()};
  }
}
template <class... A>
void poison_statics(A&... arrays) {
  (poison_static(static_cast<void*>(&arrays), sizeof(arrays)), ...);
}

inline bool is_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  auto& d = dynamic_smem_buffer();
  if (!d.empty() && c >= d.data() && c + bytes <= d.data() + d.size()) return true;
  for (const auto& [at, e] : template_statics())
    if (c >= at && c + bytes <= at + e.first) return true;
  return __start_ra_shared && c >= __start_ra_shared && c + bytes <= __stop_ra_shared;
}

// ---- the launch ---------------------------------------------------------------------------------
inline void fiber_main() {
  Block& b = *block_;
  b.body();
  Fiber& f = *b.cur;
  f.state = Fiber::done;
  --b.live;
  // Threads that return early drop out of __syncthreads (as on the hardware), not out of a warp op.
  if (b.live > 0 && b.at_block == b.live) release_block(b);
  if (b.warp_arrived[f.warp] > 0 && b.error.empty())
    b.error = "emulated CUDA: a lane returned while the rest of its warp waits in a warp operation (" + where(b) + ")";
}

inline std::string deadlock_report(const Block& b) {
  std::string s = "emulated CUDA: deadlock in kernel " + std::string(b.kernel) + ", block (" +
                  std::to_string(blockIdx_.x) + ", " + std::to_string(blockIdx_.y) + ", " + std::to_string(blockIdx_.z) +
                  "): no thread can run;";
  auto place = [](const Fiber& f) {
    return f.state == Fiber::done ? std::string("returned") : f.state == Fiber::at_block ? std::string("at __syncthreads") : std::string("in ") + f.op;
  };
  for (size_t i = 0; i < b.fibers.size();) {  // runs of consecutive threads in the same place
    size_t j = i;
    while (j + 1 < b.fibers.size() && place(b.fibers[j + 1]) == place(b.fibers[i])) ++j;
    s += " threads " + std::to_string(i) + "-" + std::to_string(j) + " " + place(b.fibers[i]) + ";";
    i = j + 1;
  }
  return s + " RA_EMU_SEED=" + std::to_string(seed());
}

inline void run_block(Block& b, dim3 block) {
  const unsigned n = block.x * block.y * block.z;
  b.fibers.assign(n, Fiber{});
  b.live = int(n);
  b.at_block = 0;
  b.warp_arrived.assign((n + kWarp - 1) / kWarp, 0);
  std::vector<int> ids(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = int(t);
    f.warp = int(t) / kWarp;
    f.lane = int(t) % kWarp;
    f.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.stack = take_stack();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack + kGuardBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
    ids[t] = int(t);
  }
  b.ready.clear();
  make_ready(b, ids);
  while (b.error.empty()) {
    if (b.ready.empty()) {
      if (b.live == 0) break;
      b.error = deadlock_report(b);
      break;
    }
    const int i = b.ready.back();
    b.ready.pop_back();
    b.cur = &b.fibers[i];
    threadIdx_ = b.cur->tid;
    swapcontext(&b.sched, &b.cur->ctx);
  }
  // A failed block leaves fibers mid-kernel: their stacks are dropped (not reused), nothing unwinds.
  for (auto& f : b.fibers)
    if (b.error.empty()) stack_pool().push_back(f.stack);
  if (!b.error.empty()) throw std::runtime_error(b.error);
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

template <class... P, class... A>
void launch_named(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                  A... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  ++counters()[name];
  gridDim_ = grid;
  blockDim_ = block;
  static std::mt19937_64 rng(seed());
  std::vector<uint3> order;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) order.push_back(uint3{bx, by, bz});
  std::shuffle(order.begin(), order.end(), rng);
  dynamic_smem_buffer().assign(dynamic_smem_bytes, kPoison);
  Block b;
  b.kernel = name;
  b.rng = &rng;
  b.body = [&] { kernel(args...); };
  block_ = &b;
  struct Reset {
    ~Reset() { block_ = nullptr; }
  } reset;
  for (const uint3& idx : order) {
    blockIdx_ = idx;
    ++block_generation();
    std::fill(dynamic_smem_buffer().begin(), dynamic_smem_buffer().end(), kPoison);
    if (__start_ra_shared) std::memset(__start_ra_shared, kPoison, size_t(__stop_ra_shared - __start_ra_shared));
    run_block(b, block);
  }
}

inline float atomic_add(float* p, float v) {
  const float old = *p;  // one host thread runs a launch: a plain add is atomic
  *p = old + v;
  return old;
}
}  // namespace ra_emu

#define threadIdx ::ra_emu::threadIdx_
#define blockIdx ::ra_emu::blockIdx_
#define blockDim ::ra_emu::blockDim_
#define gridDim ::ra_emu::gridDim_
#define __syncthreads() ::ra_emu::syncthreads()
#define atomicAdd(p, v) ::ra_emu::atomic_add((p), (v))

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::ra_emu::check_full_mask(mask, "__syncwarp");
  int dummy = 0;
  ::ra_emu::warp_collective("__syncwarp", &dummy, &dummy, [](const void* const*, void* const*, void*) {});
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  ::ra_emu::check_full_mask(mask, "__shfl_sync");
  const int lane = ::ra_emu::lane_id();
  return ::ra_emu::shfl("__shfl_sync", v, (lane & ~(width - 1)) + (src & (width - 1)));
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::ra_emu::check_full_mask(mask, "__shfl_xor_sync");
  const int lane = ::ra_emu::lane_id();
  const int src = lane ^ lane_mask;
  return ::ra_emu::shfl("__shfl_xor_sync", v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
