// The CPU emulation's scheduler (see tests/cuda_emulation/__init__.py for what is emulated).
//
// A launch runs its blocks one after another. The threads of a block are fibers (ucontext) on the
// calling OS thread, scheduled cooperatively: a fiber runs until it waits at a barrier or returns.
// Barriers: __syncthreads (all live threads of the block; a returned thread no longer counts) and
// one inside every warp collective (all lanes named in the mask; a returned lane named in the mask
// is an error). When every live fiber waits and no barrier can complete, the launch fails with a
// description of who waits where (a deadlock on a GPU), instead of hanging.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedLimit = 48 * 1024;  // static + dynamic per block without an opt-in
constexpr unsigned kMaxThreads = 1024;

enum class State { kReady, kWaitWarp, kWaitBlock, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  uint3 idx{0, 0, 0};
  int linear = 0;
  State state = State::kDone;
  int shared_decls = 0;  // static __shared__ declarations this thread has executed
  const char* waiting_at = "";
  std::source_location waiting_where;
};

struct Collective {  // one per warp
  uint64_t slots[2][32];
  unsigned long long round = 0;  // slots[round & 1] is this round's
  unsigned arrived = 0;          // lanes arrived in this round
  unsigned mask = 0;
  int width = 0;
  const char* what = "";
  std::source_location where;
};

struct SharedSlot {
  size_t offset, bytes;
  std::source_location where;
};

enum Counter { kLaunches, kBlocks, kThreads, kWarpCollectives, kBlockBarriers, kCounters };

struct Launch {
  LaunchConfig cfg{};
  void (*entry)(void*) = nullptr;
  void* ctx = nullptr;
  unsigned threads = 0;
  std::vector<Fiber> fibers;
  std::vector<Collective> warps;
  unsigned live = 0;  // threads of the running block that have not returned
  unsigned block_arrived = 0;
  std::source_location block_where;
  std::vector<SharedSlot> static_slots;
  size_t static_bytes = 0;
  alignas(128) unsigned char static_arena[kSharedLimit];
  std::vector<unsigned char> dynamic_arena;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  bool aborted = false;
};

std::mutex g_mutex;  // one launch at a time (the state below is global)
Launch g;
char* g_stacks = nullptr;
size_t g_stack_count = 0;
std::string g_error_message;
thread_local cudaError_t g_last_error = cudaSuccess;
int g_sm_count = 2;
// 0 by default: launchers that size their work to the device's thread slots see none to fill
// (tests set it to exercise that path).
int g_threads_per_sm = 0;
long long g_counters[kCounters] = {};

std::string where_text(const std::source_location& w) {
  return std::string(w.file_name()) + ":" + std::to_string(w.line());
}

std::string thread_text(const Fiber& f) {
  return "thread (" + std::to_string(f.idx.x) + "," + std::to_string(f.idx.y) + "," +
         std::to_string(f.idx.z) + ") of block (" + std::to_string(g_block_idx.x) + "," +
         std::to_string(g_block_idx.y) + "," + std::to_string(g_block_idx.z) + ")";
}

// Aborts the launch from inside a fiber: the scheduler stops and the launch returns an error.
[[noreturn]] void fail(const std::string& message) {
  if (!g.aborted) {
    g.aborted = true;
    g_error_message = message;
  }
  if (g.current == nullptr) {
    std::fprintf(stderr, "cuda emulation: %s (outside a kernel)\n", message.c_str());
    std::abort();
  }
  swapcontext(&g.current->context, &g.scheduler);
  std::abort();  // never resumed
}

Fiber& self() {
  if (g.current == nullptr) {
    std::fprintf(stderr, "cuda emulation: device function called outside a kernel\n");
    std::abort();
  }
  return *g.current;
}

void wait_here(State state, const char* what, const std::source_location& where) {
  Fiber& f = self();
  f.state = state;
  f.waiting_at = what;
  f.waiting_where = where;
  swapcontext(&f.context, &g.scheduler);
}

unsigned lanes_of_warp(unsigned warp) {
  const unsigned n = g.threads - warp * 32;
  return n >= 32 ? 0xffffffffu : (1u << n) - 1;
}

void release_block_barrier() {
  g.block_arrived = 0;
  ++g_counters[kBlockBarriers];
  for (unsigned i = 0; i < g.threads; ++i)
    if (g.fibers[i].state == State::kWaitBlock) g.fibers[i].state = State::kReady;
}

void thread_returned() {
  Fiber& f = self();
  f.state = State::kDone;
  --g.live;
  const unsigned warp = f.linear / 32, lane = f.linear % 32;
  const Collective& c = g.warps[warp];
  if (c.arrived != 0 && (c.mask >> lane & 1))
    fail(thread_text(f) + " returned while lanes of its warp wait for it in " + c.what + " at " +
         where_text(c.where) + " (its mask names the lane)");
  if (g.block_arrived != 0 && g.block_arrived == g.live) release_block_barrier();
  swapcontext(&f.context, &g.scheduler);
  std::abort();  // never resumed
}

void fiber_main() {
  g.entry(g.ctx);
  thread_returned();
}

void ensure_stacks(size_t count) {
  if (count <= g_stack_count) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = kStackBytes + page;  // a guard page below each stack
  void* mem = mmap(nullptr, each * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    std::perror("cuda emulation: mmap of fiber stacks");
    std::abort();
  }
  for (size_t i = 0; i < count; ++i) mprotect(static_cast<char*>(mem) + i * each, page, PROT_NONE);
  if (g_stacks != nullptr) munmap(g_stacks, (kStackBytes + page) * g_stack_count);
  g_stacks = static_cast<char*>(mem);
  g_stack_count = count;
}

char* stack_of(unsigned i) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return g_stacks + i * (kStackBytes + page) + page;
}

std::string describe_deadlock() {
  std::map<std::string, std::pair<int, std::string>> waits;  // place -> (count, first thread)
  for (unsigned i = 0; i < g.threads; ++i) {
    const Fiber& f = g.fibers[i];
    if (f.state == State::kDone) continue;
    const std::string key = std::string(f.waiting_at) + " at " + where_text(f.waiting_where);
    auto& entry = waits[key];
    if (entry.first++ == 0) entry.second = thread_text(f);
  }
  std::string text = "deadlock: every live thread waits at a barrier that cannot complete:";
  for (const auto& [place, who] : waits)
    text += " " + std::to_string(who.first) + " thread(s) in " + place + " (first: " + who.second + ");";
  return text;
}

// Runs one block to completion; false when the launch was aborted.
bool run_block() {
  ++g_counters[kBlocks];
  g.live = g.threads;
  g.block_arrived = 0;
  for (Collective& c : g.warps) c.arrived = 0;
  // Uninitialised shared memory reads as NaN (floats) / -1 (integers).
  std::memset(g.static_arena, 0xff, sizeof(g.static_arena));
  std::memset(g.dynamic_arena.data(), 0xff, g.dynamic_arena.size());
  const dim3 b = g.cfg.block;
  for (unsigned i = 0; i < g.threads; ++i) {
    Fiber& f = g.fibers[i];
    f.idx = {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    f.linear = static_cast<int>(i);
    f.state = State::kReady;
    f.shared_decls = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack_of(i);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  while (g.live > 0) {
    bool ran = false;
    for (unsigned i = 0; i < g.threads; ++i) {
      Fiber& f = g.fibers[i];
      if (f.state != State::kReady) continue;
      ran = true;
      g.current = &f;
      g_thread_idx = f.idx;
      swapcontext(&g.scheduler, &f.context);
      g.current = nullptr;
      if (g.aborted) return false;
    }
    if (!ran) {
      g.aborted = true;
      g_error_message = describe_deadlock();
      return false;
    }
  }
  return true;
}

cudaError_t config_error(const std::string& message) {
  g_error_message = message;
  return cudaErrorInvalidConfiguration;
}

}  // namespace

cudaError_t run_grid(const LaunchConfig& cfg, void (*entry)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const dim3 gr = cfg.grid, bl = cfg.block;
  const unsigned long long threads = 1ull * bl.x * bl.y * bl.z;
  if (threads == 0 || threads > kMaxThreads || bl.z > 64)
    return config_error("invalid block " + std::to_string(bl.x) + "x" + std::to_string(bl.y) +
                        "x" + std::to_string(bl.z));
  if (gr.x == 0 || gr.y == 0 || gr.z == 0 || gr.x > 2147483647u || gr.y > 65535 || gr.z > 65535)
    return config_error("invalid grid " + std::to_string(gr.x) + "x" + std::to_string(gr.y) + "x" +
                        std::to_string(gr.z));
  if (cfg.shared_bytes > kSharedLimit)
    return config_error(std::to_string(cfg.shared_bytes) + " bytes of dynamic shared memory (at most " +
                        std::to_string(kSharedLimit) + " without cudaFuncSetAttribute)");
  ++g_counters[kLaunches];
  g.cfg = cfg;
  g.entry = entry;
  g.ctx = ctx;
  g.threads = static_cast<unsigned>(threads);
  g.fibers.assign(g.threads, Fiber{});
  g.warps.assign((g.threads + 31) / 32, Collective{});
  g.static_slots.clear();
  g.static_bytes = 0;
  g.dynamic_arena.assign(cfg.shared_bytes, 0);
  g.aborted = false;
  ensure_stacks(g.threads);
  g_grid_dim = gr;
  g_block_dim = bl;
  g_counters[kThreads] += static_cast<long long>(threads) * gr.x * gr.y * gr.z;
  for (unsigned z = 0; z < gr.z; ++z)
    for (unsigned y = 0; y < gr.y; ++y)
      for (unsigned x = 0; x < gr.x; ++x) {
        g_block_idx = {x, y, z};
        if (!run_block()) return cudaErrorLaunchFailure;
      }
  return cudaSuccess;
}

void* dynamic_shared() {
  self();
  return g.dynamic_arena.data();
}

void* static_shared(size_t bytes, size_t align, const std::source_location& where) {
  Fiber& f = self();
  const size_t k = static_cast<size_t>(f.shared_decls++);
  if (k < g.static_slots.size()) {
    const SharedSlot& s = g.static_slots[k];
    if (s.bytes != bytes || s.where.line() != where.line())
      fail(thread_text(f) + " declared __shared__ storage at " + where_text(where) +
           " where another thread declared it at " + where_text(s.where));
    return g.static_arena + s.offset;
  }
  const size_t offset = (g.static_bytes + align - 1) / align * align;
  g.static_bytes = offset + bytes;
  if (g.static_bytes + g.cfg.shared_bytes > kSharedLimit)
    fail("shared memory of the block (" + std::to_string(g.static_bytes) + " static + " +
         std::to_string(g.cfg.shared_bytes) + " dynamic bytes) exceeds 48 KiB");
  g.static_slots.push_back({offset, bytes, where});
  return g.static_arena + offset;
}

void sync_block(const std::source_location& where) {
  Fiber& f = self();
  if (g.block_arrived == 0) {
    g.block_where = where;
  } else if (g.block_where.line() != where.line() ||
             std::strcmp(g.block_where.file_name(), where.file_name()) != 0) {
    fail(thread_text(f) + " reached __syncthreads at " + where_text(where) +
         " while other threads wait at " + where_text(g.block_where));
  }
  if (++g.block_arrived == g.live) {
    release_block_barrier();
    return;
  }
  wait_here(State::kWaitBlock, "__syncthreads", where);
}

const uint64_t* warp_exchange(unsigned mask, uint64_t bits, int width, const char* what,
                              const std::source_location& where) {
  Fiber& f = self();
  const unsigned warp = f.linear / 32, lane = f.linear % 32;
  Collective& c = g.warps[warp];
  const unsigned existing = lanes_of_warp(warp);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(thread_text(f) + ": " + what + " at " + where_text(where) + " with width " +
         std::to_string(width) + " (must be a power of two <= 32)");
  if (mask != 0xffffffffu && mask != existing)
    fail(thread_text(f) + ": " + what + " at " + where_text(where) +
         " with a partial mask (only full-warp masks are emulated)");
  const unsigned required = mask & existing;
  for (unsigned l = 0; l < 32; ++l)
    if ((required >> l & 1) && g.fibers[warp * 32 + l].state == State::kDone)
      fail(thread_text(f) + ": " + what + " at " + where_text(where) + " names lane " +
           std::to_string(l) + ", which has returned");
  if (c.arrived == 0) {
    c.mask = mask;
    c.width = width;
    c.what = what;
    c.where = where;
  } else if (c.where.line() != where.line() || c.where.column() != where.column() ||
             std::strcmp(c.what, what) != 0 || c.width != width || c.mask != mask) {
    fail(thread_text(f) + " (lane " + std::to_string(lane) + ") reached " + what + " at " +
         where_text(where) + " (width " + std::to_string(width) + ") while lanes of its warp wait in " +
         c.what + " at " + where_text(c.where) + " (width " + std::to_string(c.width) +
         "): a divergent warp collective");
  }
  uint64_t* slots = c.slots[c.round & 1];
  slots[lane] = bits;
  c.arrived |= 1u << lane;
  if (c.arrived == required) {
    c.arrived = 0;
    ++c.round;
    ++g_counters[kWarpCollectives];
    for (unsigned l = 0; l < 32; ++l) {
      Fiber* other = warp * 32 + l < g.threads ? &g.fibers[warp * 32 + l] : nullptr;
      if (other != nullptr && other->state == State::kWaitWarp) other->state = State::kReady;
    }
    return slots;
  }
  wait_here(State::kWaitWarp, what, where);
  return slots;  // unchanged until every lane has passed the next collective too
}

int lane_id() { return self().linear % 32; }

void device_fault(const std::string& what, const std::source_location& where) {
  fail(thread_text(self()) + ": " + what + " at " + where_text(where));
}

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess || g_last_error == cudaSuccess) g_last_error = err;
}

cudaError_t take_last_error() {
  const cudaError_t err = g_last_error;
  g_last_error = cudaSuccess;
  return err;
}

int sm_count() { return g_sm_count; }
int threads_per_sm() { return g_threads_per_sm; }

// ------------------------------------------------------------------------------------------------
// Half / bfloat16 conversions (round to nearest, ties to even; NaN stays NaN)

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7fffu);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (ax < 0x38800000u) {                                                // below 2^-14: subnormal
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);           // below 2^-25: zero
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (r & 1))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t rebased = ax - 0x38000000u;  // exponent bias 127 -> 15
  uint32_t r = rebased >> 13;
  const uint32_t rest = rebased & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (r & 1))) ++r;  // a carry rounds into the exponent
  return static_cast<uint16_t>(sign | r);
}

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t x;
  if (e == 0x1f) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    const float magnitude = std::ldexp(static_cast<float>(m), -24);
    return sign ? -magnitude : magnitude;
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t float_to_bfloat16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

float bfloat16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace cuda_emu

// ------------------------------------------------------------------------------------------------
// C interface shared by every emulated library (ctypes)

extern "C" {

const char* gk_emu_error_message() { return cuda_emu::g_error_message.c_str(); }

void gk_emu_set_sm_count(int sms) { cuda_emu::g_sm_count = sms; }
void gk_emu_set_threads_per_sm(int threads) { cuda_emu::g_threads_per_sm = threads; }

// launches, blocks, threads, completed warp collectives, completed __syncthreads
void gk_emu_counters(long long* out) {
  for (int i = 0; i < cuda_emu::kCounters; ++i) out[i] = cuda_emu::g_counters[i];
}

void gk_emu_float_to_half(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = cuda_emu::float_to_half_bits(in[i]);
}
void gk_emu_half_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = cuda_emu::half_bits_to_float(in[i]);
}
void gk_emu_float_to_bfloat16(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = cuda_emu::float_to_bfloat16_bits(in[i]);
}
void gk_emu_bfloat16_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = cuda_emu::bfloat16_bits_to_float(in[i]);
}

}  // extern "C"

// ------------------------------------------------------------------------------------------------
// Undefined-behaviour checks (build.py compiles the kernels with -fsanitize=alignment,bounds,...
// and links no sanitizer runtime: these handlers turn each finding into a launch failure). The
// argument layouts are the UBSan ABI shared by GCC and Clang.

namespace {

struct UbLocation {
  const char* file;
  uint32_t line, column;
};
struct UbType {
  uint16_t kind, info;
  char name[1];
};
struct UbTypeMismatch {
  UbLocation loc;
  const UbType* type;
  unsigned char log_alignment, check_kind;
};
struct UbOutOfBounds {
  UbLocation loc;
  const UbType* array_type;
  const UbType* index_type;
};
struct UbOverflow {
  UbLocation loc;
  const UbType* type;
};
struct UbShift {
  UbLocation loc;
  const UbType* lhs_type;
  const UbType* rhs_type;
};

[[noreturn]] void undefined_behaviour(const UbLocation& loc, const std::string& what) {
  const std::string where = std::string(loc.file) + ":" + std::to_string(loc.line);
  if (cuda_emu::g.current == nullptr) {
    std::fprintf(stderr, "cuda emulation: %s at %s (host code)\n", what.c_str(), where.c_str());
    std::abort();
  }
  cuda_emu::fail(cuda_emu::thread_text(*cuda_emu::g.current) + ": " + what + " at " + where);
}

}  // namespace

extern "C" {

void __ubsan_handle_type_mismatch_v1(UbTypeMismatch* d, uintptr_t pointer) {
  const uintptr_t alignment = uintptr_t(1) << d->log_alignment;
  const std::string type = d->type->name;
  if (pointer == 0) undefined_behaviour(d->loc, "null pointer use as " + type);
  if (pointer % alignment != 0)
    undefined_behaviour(d->loc, "misaligned address " + std::to_string(pointer) + " for " + type +
                                    " (needs " + std::to_string(alignment) + "-byte alignment)");
  undefined_behaviour(d->loc, "invalid use of an object of type " + type);
}
void __ubsan_handle_out_of_bounds(UbOutOfBounds* d, uintptr_t index) {
  undefined_behaviour(d->loc, "index " + std::to_string(static_cast<intptr_t>(index)) +
                                  " out of bounds for " + d->array_type->name);
}
void __ubsan_handle_add_overflow(UbOverflow* d, uintptr_t, uintptr_t) {
  undefined_behaviour(d->loc, std::string("signed overflow in + of ") + d->type->name);
}
void __ubsan_handle_sub_overflow(UbOverflow* d, uintptr_t, uintptr_t) {
  undefined_behaviour(d->loc, std::string("signed overflow in - of ") + d->type->name);
}
void __ubsan_handle_mul_overflow(UbOverflow* d, uintptr_t, uintptr_t) {
  undefined_behaviour(d->loc, std::string("signed overflow in * of ") + d->type->name);
}
void __ubsan_handle_negate_overflow(UbOverflow* d, uintptr_t) {
  undefined_behaviour(d->loc, std::string("signed overflow in negation of ") + d->type->name);
}
void __ubsan_handle_divrem_overflow(UbOverflow* d, uintptr_t, uintptr_t) {
  undefined_behaviour(d->loc, std::string("division by zero or overflow of ") + d->type->name);
}
void __ubsan_handle_shift_out_of_bounds(UbShift* d, uintptr_t, uintptr_t) {
  undefined_behaviour(d->loc, std::string("shift out of bounds for ") + d->lhs_type->name);
}

}  // extern "C"
