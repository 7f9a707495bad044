// The scheduler behind emulator.h: fibers (ucontext) for the threads of one block at a time,
// block and warp barriers, cp.async bookkeeping, and the two CUDA runtime calls the kernels'
// launchers make.
#include "emulator.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <vector>

namespace emu {
namespace {

constexpr size_t kStackBytes = size_t(512) << 10;
constexpr size_t kDefaultSmemLimit = size_t(48) << 10;  // without cudaFuncSetAttribute
constexpr size_t kOptInSmemLimit = size_t(227) << 10;   // H100's per-block maximum
constexpr int kWarpSlotBytes = 64;

struct PendingCopy {
  void* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t context;
  unsigned char* stack = nullptr;  // mmap'ed, lowest page a guard
  ThreadContext coords;
  int linear = 0;
  bool done = false;
  std::vector<PendingCopy> open_group;              // issued, not yet committed
  std::deque<std::vector<PendingCopy>> committed;  // oldest first
};

struct Barrier {
  int arrived = 0;
  std::vector<Fiber*> waiting;
};

struct Warp {
  Barrier barrier;
  int live = 0;
  WarpOp op = WarpOp::kShuffle;
  unsigned char slots[32][kWarpSlotBytes];
};

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // stacks reused across blocks and launches
  Fiber* current = nullptr;
  int live = 0;  // threads of the running block not yet exited
  Barrier block_barrier;
  std::vector<Warp> warps;
  // Runnable threads: in order of arrival (round robin), or one FIFO queue per warp (the
  // warp-by-warp schedules); `queued` counts them.
  std::deque<Fiber*> runnable;
  std::vector<std::deque<Fiber*>> runnable_by_warp;
  int queued = 0;
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
  bool failed = false;
  std::string error;       // of the running launch
  std::string last_error;  // of the last failed launch, until read
  cudaError_t cuda_error = cudaSuccess;
  std::map<const void*, int> smem_opt_in;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  Schedule schedule = Schedule::kRoundRobin;
  uint64_t random_state = 1;  // kRandom's generator (splitmix64)
  uint64_t block_serial = 0;                       // of the running block, across launches
  std::map<void*, uint64_t> poisoned_in_block;     // static __shared__ variable -> block
};

State& state() {
  static State s;
  return s;
}

Fiber& running() {
  State& s = state();
  if (s.current == nullptr) {
    std::fprintf(stderr, "emu: device code called outside a kernel\n");
    std::abort();
  }
  return *s.current;
}

void to_scheduler() {
  Fiber& f = running();
  swapcontext(&f.context, &state().scheduler);
}

void make_runnable(Fiber* f) {
  State& s = state();
  if (s.schedule == Schedule::kRoundRobin || s.schedule == Schedule::kRandom) {
    s.runnable.push_back(f);
  } else {
    s.runnable_by_warp[f->linear / 32].push_back(f);
  }
  ++s.queued;
}

void release(Barrier& b) {
  for (Fiber* f : b.waiting) make_runnable(f);
  b.waiting.clear();
  b.arrived = 0;
}

// The calling fiber waits at `b` until `expected` threads have arrived.
void arrive(Barrier& b, int expected) {
  if (++b.arrived == expected) {
    release(b);
    return;
  }
  b.waiting.push_back(&running());
  to_scheduler();
}

std::string where(const Fiber& f) {
  const ThreadContext& c = f.coords;
  return "block (" + std::to_string(c.block_idx.x) + "," + std::to_string(c.block_idx.y) + "," +
         std::to_string(c.block_idx.z) + ") thread " + std::to_string(f.linear);
}

void land(std::vector<PendingCopy>& group) {
  for (PendingCopy& c : group) std::memcpy(c.dst, c.data, 16);
  group.clear();
}

void check_shared(const void* p, const char* what) {
  State& s = state();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < s.smem.data() || b + 16 > s.smem.data() + s.smem.size()) {
    fail(std::string(what) + ": address outside the block's dynamic shared memory");
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(std::string(what) + ": address not 16-byte aligned");
}

void fiber_main() {
  State& s = state();
  Fiber& f = running();
  (*s.body)();
  if (!f.open_group.empty()) fail("cp.async copies issued but never committed and waited for");
  for (const auto& g : f.committed) {
    if (!g.empty()) fail("cp.async group never waited for (cp.async.wait_group) before exit");
  }
  f.done = true;
  --s.live;
  Warp& w = s.warps[f.linear / 32];
  --w.live;
  if (w.barrier.arrived > 0) fail("a lane exited while its warp waits at a warp-synchronous op");
  if (s.block_barrier.arrived > 0 && s.block_barrier.arrived == s.live) release(s.block_barrier);
  to_scheduler();  // never resumed
}

void init_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    f.stack = static_cast<unsigned char*>(mem) + page;
  }
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
  f.done = false;
  f.open_group.clear();
  f.committed.clear();
}

// Removes and returns the next thread to run under the current schedule.
Fiber* next_runnable() {
  State& s = state();
  Fiber* f = nullptr;
  if (s.schedule == Schedule::kRoundRobin) {
    f = s.runnable.front();
    s.runnable.pop_front();
  } else if (s.schedule == Schedule::kRandom) {
    uint64_t z = (s.random_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    const size_t pick = size_t((z ^ (z >> 31)) % s.runnable.size());
    f = s.runnable[pick];
    s.runnable[pick] = s.runnable.back();
    s.runnable.pop_back();
  } else {
    const int warps = int(s.runnable_by_warp.size());
    for (int i = 0; i < warps && f == nullptr; ++i) {
      auto& q = s.runnable_by_warp[s.schedule == Schedule::kWarpsAscending ? i : warps - 1 - i];
      if (!q.empty()) {
        f = q.front();
        q.pop_front();
      }
    }
  }
  --s.queued;
  return f;
}

cudaError_t launch_failed(cudaError_t code, const std::string& why) {
  State& s = state();
  s.last_error = why;
  s.cuda_error = code;
  return code;
}

}  // namespace

const ThreadContext& context() { return running().coords; }

int lane() { return running().linear % 32; }

void sync_block() {
  State& s = state();
  arrive(s.block_barrier, s.live);
}

void warp_exchange(WarpOp op, const void* mine, size_t bytes, void* all) {
  State& s = state();
  Fiber& f = running();
  Warp& w = s.warps[f.linear / 32];
  if (bytes > size_t(kWarpSlotBytes)) fail("warp exchange of more than 64 bytes per lane");
  if (w.live != 32) fail("warp-synchronous op in a warp with exited lanes");
  if (w.barrier.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("warp divergence: lanes of one warp at different warp-synchronous ops");
  }
  std::memcpy(w.slots[f.linear % 32], mine, bytes);
  arrive(w.barrier, 32);
  auto* out = static_cast<unsigned char*>(all);
  for (int l = 0; l < 32; ++l) std::memcpy(out + l * bytes, w.slots[l], bytes);
  arrive(w.barrier, 32);  // every lane has read before any lane writes its slot again
}

void set_schedule(Schedule schedule, uint64_t seed) {
  state().schedule = schedule;
  state().random_state = seed;
}

void poison_shared(void* variable, size_t bytes) {
  State& s = state();
  uint64_t& last = s.poisoned_in_block[variable];
  if (last != s.block_serial) {
    last = s.block_serial;
    std::memset(variable, 0xff, bytes);
  }
}

unsigned char* dynamic_smem() { return state().smem.data(); }
size_t dynamic_smem_bytes() { return state().smem.size(); }

void cp_async16(void* smem, const void* gmem) {
  check_shared(smem, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("cp.async source not 16-byte aligned");
  PendingCopy c;
  c.dst = smem;
  std::memcpy(c.data, gmem, 16);
  std::memset(smem, 0xff, 16);  // reads as NaN until the copy is waited for
  running().open_group.push_back(c);
}

void cp_async_commit() {
  Fiber& f = running();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int pending_groups_allowed) {
  Fiber& f = running();
  while (int(f.committed.size()) > pending_groups_allowed) {
    land(f.committed.front());
    f.committed.pop_front();
  }
}

void fail(const std::string& what) {
  State& s = state();
  if (!s.failed) {
    s.failed = true;
    s.error = s.current != nullptr ? where(*s.current) + ": " + what : what;
  }
  if (s.current == nullptr) {
    std::fprintf(stderr, "emu: %s\n", what.c_str());
    std::abort();
  }
  to_scheduler();  // the launch is abandoned: never resumed
  std::abort();
}

std::string last_error() {
  State& s = state();
  std::string e = std::move(s.last_error);
  s.last_error.clear();
  return e;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const void* kernel_id,
                     const std::function<void()>& body) {
  State& s = state();
  const int threads = int(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024 || threads % 32 != 0) {
    return launch_failed(cudaErrorInvalidConfiguration,
                         "block of " + std::to_string(threads) +
                             " threads (the emulator models 32..1024 threads in whole warps)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    return launch_failed(cudaErrorInvalidConfiguration, "grid dimensions out of range");
  }
  const auto opt_in = s.smem_opt_in.find(kernel_id);
  const size_t limit = opt_in == s.smem_opt_in.end() ? kDefaultSmemLimit : size_t(opt_in->second);
  if (smem_bytes > limit) {
    return launch_failed(cudaErrorInvalidValue,
                         std::to_string(smem_bytes) + " bytes of dynamic shared memory, limit " +
                             std::to_string(limit) + " for this kernel");
  }
  if (s.fibers.size() < size_t(threads)) s.fibers.resize(threads);
  s.body = &body;
  s.failed = false;
  s.error.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ++s.block_serial;
        s.live = threads;
        s.block_barrier = Barrier{};
        s.warps.assign(threads / 32, Warp{});
        for (Warp& w : s.warps) w.live = 32;
        s.runnable.clear();
        s.runnable_by_warp.assign(threads / 32, {});
        s.queued = 0;
        s.smem.assign(smem_bytes, 0xff);
        for (int t = 0; t < threads; ++t) {
          Fiber& f = s.fibers[t];
          init_fiber(f);
          f.linear = t;
          f.coords.thread_idx = make_uint3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
          f.coords.block_idx = make_uint3(bx, by, bz);
          f.coords.block_dim = block;
          f.coords.grid_dim = grid;
          make_runnable(&f);
        }
        while (s.queued > 0 && !s.failed) {
          s.current = next_runnable();
          swapcontext(&s.scheduler, &s.current->context);
        }
        s.current = nullptr;
        if (s.failed) return launch_failed(cudaErrorLaunchFailure, s.error);
        if (s.live > 0) {
          std::string who;
          for (int t = 0; t < threads; ++t) {
            if (!s.fibers[t].done) {
              who = where(s.fibers[t]);
              break;
            }
          }
          return launch_failed(cudaErrorLaunchFailure,
                               "deadlock: " + std::to_string(s.live) + " threads wait forever (first: " +
                                   who + ", " + std::to_string(s.block_barrier.arrived) +
                                   " at the block barrier)");
        }
      }
    }
  }
  return cudaSuccess;
}

}  // namespace emu

// The CUDA runtime calls of the launchers, for the emulator.
extern "C" cudaError_t cudaGetLastError(void) {
  emu::State& s = emu::state();
  const cudaError_t e = s.cuda_error;
  s.cuda_error = cudaSuccess;
  return e;
}

extern "C" cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || size_t(value) > emu::kOptInSmemLimit) {
    emu::state().last_error = "cudaFuncSetAttribute: " + std::to_string(value) +
                              " bytes of dynamic shared memory exceed the device's maximum";
    return cudaErrorInvalidValue;
  }
  emu::state().smem_opt_in[func] = value;
  return cudaSuccess;
}
