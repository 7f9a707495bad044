// The scheduler behind emulator.h: fibers (ucontext) for the threads of one block (or one
// cluster of blocks) at a time, block, warp and cluster barriers, cp.async bookkeeping, the
// Hopper asynchronous operations, and the CUDA runtime calls the kernels' launchers make.
// <memory> before emulator.h: libstdc++ spells __attribute__((__noinline__)), which the
// emulator's __noinline__ macro (for kernel code) would break.
#include <memory>

#include "emulator.h"

#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
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

// What a thread knows of the other threads' past (a vector clock, kept small): it grows
// along every happens-before edge the emulator models (its own program order, a block or
// warp barrier, a warpgroup rendezvous, an mbarrier's arrivals and landed copies carried to
// the wait that sees their phase complete, a cluster barrier), joined by elementwise max.
//   * retired: per CTA of the cluster and warpgroup, the highest wgmma issue number (1, 2,
//     ... in the warpgroup's issue order) retired by a wgmma.wait_group that happens before
//     the thread's present point. wait_group retires the oldest groups first, so the retired
//     wgmmas of a warpgroup are always a prefix of its issue order and one number says which.
//   * init_fences: per CTA, how many of its fence.mbarrier_init.release.cluster happen before
//     (an mbarrier of another CTA may be arrived on remotely once its publishing fence does).
//   * remote: per CTA, the serial of its latest access to another CTA's shared memory (a
//     remote arrive, a multicast copy) that happens before; serials are per source CTA, so a
//     thread that knows serial k is taken to know every earlier one of that CTA (an
//     approximation that can only hide a race, never invent one).
constexpr int kMaxWarpGroups = 8;    // 1024 threads
constexpr int kMaxClusterCtas = 8;   // the portable cluster size limit
struct Knowledge {
  std::array<uint64_t, kMaxClusterCtas * kMaxWarpGroups> retired{};  // [rank * 8 + warpgroup]
  std::array<uint64_t, kMaxClusterCtas> init_fences{}, remote{};
};

void learn(Knowledge& into, const Knowledge& from) {
  for (size_t i = 0; i < into.retired.size(); ++i) into.retired[i] = std::max(into.retired[i], from.retired[i]);
  for (int r = 0; r < kMaxClusterCtas; ++r) {
    into.init_fences[r] = std::max(into.init_fences[r], from.init_fences[r]);
    into.remote[r] = std::max(into.remote[r], from.remote[r]);
  }
}

struct PendingCopy {
  void* dst;
  unsigned char data[16];
};

// One thread's share of an in-flight wgmma: its accumulator registers (NaN until the
// wait_group that covers it) and their future value; the warpgroup's thread 0 also keeps
// the shared-memory operand bits it read, to check that nothing overwrote them meanwhile.
struct PendingWgmma {
  float* d = nullptr;
  int count = 0;
  std::vector<float> value;
  bool superseded = false;  // a later wgmma on the same registers carries its result on
  uint64_t serial = 0;      // its warpgroup's issue number (WarpGroup::issued)
  std::vector<std::pair<uint32_t, uint16_t>> operands;
};

struct Fiber;

struct Mbarrier {
  unsigned expected = 0, pending = 0;  // arrivals per phase, still to come in this one
  bool init_fenced = false;            // a fence.mbarrier_init / fence.proxy.async since init
  uint64_t published = 0;  // its CTA's fence.mbarrier_init (1, 2, ...) since init; 0: none
  long long tx = 0;                    // transaction bytes still to come in this phase
  uint64_t phase = 0;                  // completed phases
  std::vector<Fiber*> waiting;
  Knowledge arrived{};    // what the current phase's arrivals knew (released to its waiters)
  Knowledge completed{};  // ... the completed phases' arrivals, all together
};

struct Block;

// A bulk or TMA copy in flight into one CTA (a multicast copy is one per destination CTA).
struct BulkCopy {
  Block* cta;  // the destination CTA
  void* dst;
  std::vector<unsigned char> data;
  const void* bar;  // in the destination CTA
  Knowledge known;  // the issuer's, at issue: carried to the mbarrier's phase as it lands
};

// What cuTensorMapEncodeTiled records, inside the 128-byte CUtensorMap (2-D tiled maps only).
struct TensorMap2d {
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[2];
  uint64_t stride;  // bytes from one dim-1 index to the next
  uint32_t box[2];
  uint32_t elem_bytes;
  uint32_t swizzle_bytes;  // 0 (none), 32, 64, 128
};
constexpr uint64_t kTensorMapMagic = 0x656d752d746d6170ull;
static_assert(sizeof(TensorMap2d) <= sizeof(CUtensorMap), "fits the opaque map");

struct Fiber {
  ucontext_t context;
  unsigned char* stack = nullptr;  // mmap'ed, lowest page a guard
  ThreadContext coords;
  int linear = 0;
  bool done = false;
  std::vector<PendingCopy> open_group;              // issued, not yet committed
  std::deque<std::vector<PendingCopy>> committed;  // oldest first
  bool wgmma_fenced = false;                        // wgmma.fence since the last wait_group
  std::vector<std::shared_ptr<PendingWgmma>> wgmma_open;               // not yet committed
  std::deque<std::vector<std::shared_ptr<PendingWgmma>>> wgmma_groups;  // oldest first
  Mbarrier* waiting_on = nullptr;
  Knowledge known{};  // what this thread knows of the others' past (Knowledge)
  Block* cta = nullptr;           // its CTA
  uint64_t cluster_arrived = 0;   // 1 + the cluster barrier phase it arrived on; 0: none pending
};

struct Barrier {
  int arrived = 0;
  std::vector<Fiber*> waiting;
  Knowledge known{};  // what the threads arrived so far know: every one leaves knowing it
};

struct Warp {
  Barrier barrier;
  int live = 0;
  WarpOp op = WarpOp::kShuffle;
  unsigned char slots[32][kWarpSlotBytes];
};

constexpr int kWarpGroupSlotBytes = 64;

// Kinds of warpgroup-wide instruction: all 128 threads must meet at the same kind.
enum class GroupOp : int { kWgmma = 1, kSetmaxnreg };

struct WarpGroup {
  Barrier barrier;
  GroupOp op = GroupOp::kWgmma;
  bool computed = false;
  unsigned char slots[128][kWarpGroupSlotBytes];
  std::vector<double> product;  // 64 x N, row-major: A B of the rendezvous in progress
  std::vector<std::pair<uint32_t, uint16_t>> operands;
  uint64_t issued = 0;  // wgmmas issued by the warpgroup in this block (the last one's number)
  // Per 16-byte chunk of dynamic shared memory (wgmma operands and bulk / TMA destinations
  // come in whole chunks): (number << 1 | operand is B) of the last of the warpgroup's
  // wgmmas that read it, 0 if none; empty until the warpgroup's first wgmma. The last reader
  // is enough: a thread that knows it retired knows every earlier one retired (Knowledge).
  std::vector<uint64_t> readers;
};

// One CTA of the running cluster (a launch without clusters: clusters of one CTA).
struct Block {
  int rank = 0;  // %cluster_ctarank
  uint3 idx;
  uint64_t serial = 0;  // across launches (static __shared__ poisoning)
  int live = 0;         // its threads not yet exited
  Barrier block_barrier;
  std::vector<Warp> warps;
  std::vector<WarpGroup> warpgroups;
  std::vector<unsigned char> smem_storage;  // smem: its first 1024-byte boundary
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  // The dynamic shared memory as the async proxy sees it: the bytes as of the block's last
  // fence.proxy.async, updated by the async proxy's own writes (bulk and TMA landings).
  // A generic write (a thread's store, a cp.async landing) changes smem but not this copy,
  // so a byte that differs here was written through the generic proxy and not fenced since.
  std::vector<unsigned char> async_view;
  std::map<const void*, Mbarrier> mbarriers;  // by address
  uint64_t init_fences = 0;  // its fence.mbarrier_init so far
  // Per source CTA: the serial of its latest access to this CTA's shared memory, which must
  // happen before this CTA exits (Knowledge::remote); and the join of what this CTA's
  // threads knew as they exited.
  std::array<uint64_t, kMaxClusterCtas> remote_in{};
  Knowledge at_exit{};
  bool exited = false;
};

// barrier.cluster: a phase completes when every thread of the cluster not exited has
// arrived (exiting threads release it, as for bar.sync).
struct ClusterBarrier {
  uint64_t phase = 0;    // completed phases
  int not_arrived = 0;   // live threads not yet arrived in the current phase
  int arrivals = 0;      // arrivals in the current phase
  Knowledge pending{};   // what the current phase's arrivals knew
  Knowledge completed{};
  std::vector<Fiber*> waiting;
};

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // stacks reused across blocks and launches
  Fiber* current = nullptr;
  std::deque<Block> blocks;  // the running cluster's CTAs, by rank
  int threads_per_block = 0;
  int cluster_live = 0;  // threads of the running cluster not yet exited
  ClusterBarrier cluster_barrier;
  std::array<uint64_t, kMaxClusterCtas> remote_serial{};  // per CTA: its remote accesses so far
  // Runnable threads: in order of arrival (round robin), or one FIFO queue per warp of the
  // cluster (the warp-by-warp schedules: CTA by CTA, each warp by warp); `queued` counts them.
  std::deque<Fiber*> runnable;
  std::vector<std::deque<Fiber*>> runnable_by_warp;
  int queued = 0;
  std::deque<BulkCopy> bulk_in_flight;        // issued, not yet landed
  const std::function<void()>* body = nullptr;
  bool failed = false;
  std::string error;       // of the running launch
  std::string last_error;  // of the last failed launch, until read
  cudaError_t cuda_error = cudaSuccess;
  std::map<const void*, int> smem_opt_in;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  Schedule schedule = Schedule::kRoundRobin;
  uint64_t random_state = 1;  // kRandom's generator (splitmix64)
  uint64_t block_serial = 0;                       // of the last block started, across launches
  std::map<void*, uint64_t> poisoned_in_block;     // static __shared__ variable -> block
  std::vector<const void*> launched;               // kernels run, until take_launched_kernels
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

// The running thread's CTA.
Block& current_cta() { return *running().cta; }

void to_scheduler() {
  Fiber& f = running();
  swapcontext(&f.context, &state().scheduler);
}

void make_runnable(Fiber* f) {
  State& s = state();
  if (s.schedule == Schedule::kRoundRobin || s.schedule == Schedule::kRandom) {
    s.runnable.push_back(f);
  } else {
    s.runnable_by_warp[size_t(f->cta->rank) * (s.threads_per_block / 32) + f->linear / 32].push_back(f);
  }
  ++s.queued;
}

void release(Barrier& b) {
  for (Fiber* f : b.waiting) {
    learn(f->known, b.known);
    make_runnable(f);
  }
  b.waiting.clear();
  b.arrived = 0;
  b.known = Knowledge{};
}

// The calling fiber waits at `b` until `expected` threads have arrived.
void arrive(Barrier& b, int expected) {
  Fiber& f = running();
  learn(b.known, f.known);
  if (++b.arrived == expected) {
    learn(f.known, b.known);
    release(b);
    return;
  }
  b.waiting.push_back(&running());
  to_scheduler();
}

std::string where(const Fiber& f) {
  const ThreadContext& c = f.coords;
  std::string rank = state().blocks.size() > 1 ? " (cluster rank " + std::to_string(f.cta->rank) + ")" : "";
  return "block (" + std::to_string(c.block_idx.x) + "," + std::to_string(c.block_idx.y) + "," +
         std::to_string(c.block_idx.z) + ")" + rank + " thread " + std::to_string(f.linear);
}

void land(std::vector<PendingCopy>& group) {
  for (PendingCopy& c : group) std::memcpy(c.dst, c.data, 16);
  group.clear();
}

void check_shared(const void* p, const char* what) {
  const Block& cta = current_cta();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < cta.smem || b + 16 > cta.smem + cta.smem_size) {
    fail(std::string(what) + ": address outside the block's dynamic shared memory");
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(std::string(what) + ": address not 16-byte aligned");
}

void cluster_thread_exits(Fiber& f);
void cta_exits(Block& cta);

void fiber_main() {
  State& s = state();
  Fiber& f = running();
  Block& cta = *f.cta;
  (*s.body)();
  if (!f.open_group.empty()) fail("cp.async copies issued but never committed and waited for");
  for (const auto& g : f.committed) {
    if (!g.empty()) fail("cp.async group never waited for (cp.async.wait_group) before exit");
  }
  if (!f.wgmma_open.empty()) fail("wgmma.mma_async issued but never committed and waited for");
  if (!f.wgmma_groups.empty()) fail("wgmma group never waited for (wgmma.wait_group) before exit");
  f.done = true;
  --cta.live;
  Warp& w = cta.warps[f.linear / 32];
  --w.live;
  if (w.barrier.arrived > 0) fail("a lane exited while its warp waits at a warp-synchronous op");
  const size_t group = size_t(f.linear / 128);
  if (group < cta.warpgroups.size() && cta.warpgroups[group].barrier.arrived > 0) {
    fail("a thread exited while its warpgroup waits at a warpgroup-wide instruction (wgmma.mma_async, setmaxnreg)");
  }
  if (cta.block_barrier.arrived > 0 && cta.block_barrier.arrived == cta.live) release(cta.block_barrier);
  learn(cta.at_exit, f.known);
  cluster_thread_exits(f);
  if (cta.live == 0) cta_exits(cta);
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
  f.wgmma_fenced = false;
  f.wgmma_open.clear();
  f.wgmma_groups.clear();
  f.waiting_on = nullptr;
  f.known = Knowledge{};
  f.cluster_arrived = 0;
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


// ---- mbarrier and bulk copies ----

// The mbarrier at `bar` in `cta`'s shared memory (the running thread's CTA unless named).
Mbarrier& mbarrier_at(const void* bar, const char* what, Block* cta = nullptr) {
  if (cta == nullptr) cta = &current_cta();
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) fail(std::string(what) + ": mbarrier address not 8-byte aligned");
  auto it = cta->mbarriers.find(bar);
  if (it == cta->mbarriers.end()) {
    fail(std::string(what) + ": mbarrier not initialised (mbarrier.init) in " +
         (cta == &current_cta() ? std::string("this block") : "CTA rank " + std::to_string(cta->rank)));
  }
  return it->second;
}

// Completes the current phase if its arrivals and transaction bytes are all in.
void maybe_complete(Mbarrier& m) {
  if (m.pending != 0 || m.tx != 0) return;
  ++m.phase;
  m.pending = m.expected;
  learn(m.completed, m.arrived);
  m.arrived = Knowledge{};
  for (Fiber* f : m.waiting) {
    f->waiting_on = nullptr;
    learn(f->known, m.completed);
    make_runnable(f);
  }
  m.waiting.clear();
}

// Records a failure found outside any thread (by the scheduler landing bulk copies).
void fail_outside(const std::string& what) {
  State& s = state();
  if (!s.failed) {
    s.failed = true;
    s.error = what;
  }
}

void complete_tx(Mbarrier& m, long long bytes) {
  m.tx -= bytes;
  if (m.tx < -((1ll << 20) - 1)) {
    fail_outside("mbarrier: tx-count below its range (more bytes completed than expected)");
    return;
  }
  maybe_complete(m);
}

// Lands the in-flight bulk copies that signal `bar` (all of them for nullptr), oldest first;
// true if there were any.
bool land_bulk_copies(const void* bar) {
  State& s = state();
  bool any = false;
  for (size_t i = 0; i < s.bulk_in_flight.size();) {
    BulkCopy& c = s.bulk_in_flight[i];
    if (bar != nullptr && c.bar != bar) {
      ++i;
      continue;
    }
    BulkCopy done = std::move(c);
    s.bulk_in_flight.erase(s.bulk_in_flight.begin() + long(i));
    Block& cta = *done.cta;
    std::memcpy(done.dst, done.data.data(), done.data.size());
    std::memcpy(&cta.async_view[static_cast<unsigned char*>(done.dst) - cta.smem], done.data.data(), done.data.size());
    auto it = cta.mbarriers.find(done.bar);
    if (it == cta.mbarriers.end()) {
      fail_outside("a bulk copy completes on an mbarrier that is no longer initialised");
      return false;
    }
    learn(it->second.arrived, done.known);  // the issue happens before the complete_tx
    complete_tx(it->second, (long long)done.data.size());
    any = true;
  }
  return any;
}

uint32_t shared_offset(const void* p, size_t bytes, const char* what) {
  const Block& cta = current_cta();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < cta.smem || b + bytes > cta.smem + cta.smem_size) {
    fail(std::string(what) + ": address outside the block's dynamic shared memory");
  }
  return uint32_t(b - cta.smem);
}

// The destination of an asynchronous copy reads as 0xff bytes until the copy lands, through
// either proxy: the emulator's poison, not a generic write that would need a proxy fence.
void unreadable_until_landed(Block& cta, void* smem_dst, size_t bytes) {
  std::memset(smem_dst, 0xff, bytes);
  std::memset(&cta.async_view[static_cast<unsigned char*>(smem_dst) - cta.smem], 0xff, bytes);
}

// The mbarrier a bulk copy will complete its bytes on: the async proxy updates it, so its
// initialisation must have been made visible to that proxy (PTX ISA, mbarrier.init).
Mbarrier& async_mbarrier(const void* bar, const char* what, Block* cta = nullptr) {
  Mbarrier& m = mbarrier_at(bar, what, cta);
  if (!m.init_fenced) {
    fail(std::string(what) + ": its mbarrier was initialised without a fence.mbarrier_init.release.cluster "
         "(or fence.proxy.async.shared::cta) between mbarrier.init and this copy: the async proxy may not "
         "see the initialisation");
  }
  return m;
}

// A bulk or TMA copy may write its destination at any time between its issue and its
// completion, whenever the emulator lands it, so it must not be issued while a wgmma that
// reads those bytes may still be in flight: the wgmma's warpgroup must have retired it with
// a wgmma.wait_group that happens before the issue (Knowledge). A wait_group that comes later
// in the emulated execution but is not ordered before the issue (the consumer's arrival on
// the producer's "empty" mbarrier placed above its wait_group) does not count: that is the
// race, whichever schedule runs it and whenever the copy lands.
void check_copy_spares_wgmma_operands(const Block& cta, uint32_t dst, uint32_t bytes, const char* what) {
  const Fiber& f = running();
  for (size_t w = 0; w < cta.warpgroups.size(); ++w) {
    const WarpGroup& g = cta.warpgroups[w];
    if (g.readers.empty()) continue;
    uint64_t reader = 0;
    uint32_t lo = 0, hi = 0;
    for (uint32_t c = dst / 16; c < (dst + bytes + 15) / 16; ++c) {
      if ((g.readers[c] >> 1) <= f.known.retired[size_t(cta.rank) * kMaxWarpGroups + w]) continue;
      if (reader == 0) reader = g.readers[c], lo = c * 16;
      hi = c * 16 + 16;
    }
    if (reader == 0) continue;  // [lo, hi): from the first to the last such chunk
    const uint64_t serial = reader >> 1;
    fail(std::string(what) + " into shared memory bytes [" + std::to_string(std::max(lo, dst)) + ", " +
         std::to_string(std::min(hi, dst + bytes)) + ") read by an in-flight wgmma of warpgroup " +
         std::to_string(w) + (&cta == f.cta ? std::string() : " of CTA rank " + std::to_string(cta.rank)) +
         " (its wgmma.mma_async #" + std::to_string(serial) + " in " +
         (&cta == f.cta ? "this block" : "that CTA") + ", operand " +
         ((reader & 1) != 0 ? "B" : "A") +
         ", not retired by a wgmma.wait_group ordered before this copy by program order, a barrier, an "
         "mbarrier arrive (local or remote) -> wait or a cluster barrier): the copy may overwrite the operand while the wgmma reads it; release the "
         "buffer to the copy's issuer only after the wgmma.wait_group that retires the wgmma");
  }
}

// ---- warpgroup-wide instructions ----

// The calling thread's warpgroup, which `what` (a warpgroup-wide instruction) needs whole.
WarpGroup& whole_warpgroup(const std::string& what) {
  Block& cta = current_cta();
  if (cta.warpgroups.empty() || int(cta.warps.size()) % 4 != 0) {
    fail(what + ": the block is not made of whole warpgroups (128 threads)");
  }
  const int group = running().linear / 128;
  for (int w = 4 * group; w < 4 * group + 4; ++w) {
    if (cta.warps[w].live != 32) fail(what + " in a warpgroup with exited threads");
  }
  return cta.warpgroups[group];
}

// The calling thread waits at its warpgroup's rendezvous until all 128 threads are there,
// at the same kind of instruction.
void group_arrive(WarpGroup& g, GroupOp op) {
  if (g.barrier.arrived == 0) {
    g.op = op;
  } else if (g.op != op) {
    fail("warpgroup divergence: threads of one warpgroup at different warpgroup-wide instructions "
         "(wgmma.mma_async, setmaxnreg)");
  }
  arrive(g.barrier, 128);
}

// ---- wgmma ----

struct WgmmaArgs {
  uint64_t a_desc, b_desc;
  uint32_t a_regs[4];
  int32_t type, n, scale_d, scale_a, scale_b, tnsp_a, tnsp_b, a_in_regs;
};
static_assert(sizeof(WgmmaArgs) <= kWarpGroupSlotBytes, "wgmma arguments fit a slot");

// Byte address in shared memory of element (mn, k) of a 16-bit operand tile described by
// the wgmma matrix descriptor `desc` (PTX ISA, "Matrix Descriptor Format"; CuTe's
// GmmaDescriptor): bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45
// stride byte offset >> 4, 49-51 base offset, 62-63 layout (0 none, 1 128B, 2 64B, 3 32B
// swizzle). The canonical layouts, in 16-byte units (T = 8 elements):
//   K-major,  none:   ((8,m),(T,2)) : ((1T,SBO),(1,LBO))
//   K-major,  W x16B: ((8,m),(T,2)) : ((W T,SBO),(1,T))        (LBO unused)
//   MN-major, none:   ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//   MN-major, W x16B: ((T,W,m),(8,k)) : ((1,T,LBO),(W T,SBO))
// and the swizzle of W x 16 B (W = 2, 4, 8) XORs address bits [4, 4+log2 W) with bits
// [7, 7+log2 W) of the shared-memory address (CuTe's Swizzle<log2 W,4,3>).
uint32_t operand_address(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  const unsigned base = unsigned((desc >> 49) & 7);
  const unsigned mode = unsigned(desc >> 62);
  if (base != 0) fail("wgmma descriptor: a nonzero base offset is not modelled");
  const unsigned log_w = mode == 0 ? 0 : mode == 1 ? 3 : mode == 2 ? 2 : 1;
  const uint32_t w = 1u << log_w;
  uint32_t off;
  if (!mn_major) {
    const uint32_t r = mn % 8, i = mn / 8, c = k / 8, e = k % 8;
    off = mode == 0 ? r * 16 + i * sbo + c * lbo + e * 2 : r * 16 * w + i * sbo + c * 16 + e * 2;
  } else {
    const uint32_t e = mn % 8, blk = mn / 8, kr = k % 8, kg = k / 8;
    off = mode == 0 ? blk * sbo + kr * 16 + kg * lbo + e * 2
                    : (blk % w) * 16 + (blk / w) * lbo + kr * 16 * w + kg * sbo + e * 2;
  }
  uint32_t addr = start + off;
  if (log_w != 0) addr ^= ((addr >> 7) & (w - 1)) << 4;
  return addr;
}

// A (64 x 16) B^T (16 x N) of the warpgroup's gathered arguments, into g.product; the
// shared-memory operand bits read into g.operands.
void wgmma_product(WarpGroup& g) {
  const Block& cta = current_cta();
  WgmmaArgs args[128];
  for (int t = 0; t < 128; ++t) std::memcpy(&args[t], g.slots[t], sizeof(WgmmaArgs));
  const WgmmaArgs& a0 = args[0];
  for (int t = 1; t < 128; ++t) {
    const WgmmaArgs& a = args[t];
    if (a.type != a0.type || a.n != a0.n || a.b_desc != a0.b_desc || a.scale_d != a0.scale_d ||
        a.scale_a != a0.scale_a || a.scale_b != a0.scale_b || a.tnsp_a != a0.tnsp_a || a.tnsp_b != a0.tnsp_b ||
        a.a_in_regs != a0.a_in_regs || (!a0.a_in_regs && a.a_desc != a0.a_desc)) {
      fail("wgmma.mma_async: threads of one warpgroup give different descriptors, shapes or flags");
    }
  }
  const bool bf16 = a0.type == 0;
  const int n = a0.n;
  g.operands.clear();
  ++g.issued;
  if (g.readers.empty()) g.readers.assign((cta.smem_size + 15) / 16, 0);
  auto load = [&](uint64_t desc, bool mn_major, int mn, int k, char operand) {
    const uint32_t addr = operand_address(desc, mn_major, mn, k);
    if (addr % 2 != 0 || size_t(addr) + 2 > cta.smem_size) {
      fail("wgmma.mma_async: descriptor addresses an element outside the block's dynamic shared memory");
    }
    if (std::memcmp(cta.smem + addr, &cta.async_view[addr], 2) != 0) {
      fail(std::string("wgmma.mma_async reads operand ") + operand + " element (" + std::to_string(mn) + ", " +
           std::to_string(k) + ") at shared address " + std::to_string(addr) +
           ", written through the generic proxy (a store or cp.async) after the block's last "
           "fence.proxy.async: a fence.proxy.async.shared::cta must come between the write and the wgmma");
    }
    uint16_t bits;
    std::memcpy(&bits, cta.smem + addr, 2);
    g.operands.emplace_back(addr, bits);
    g.readers[addr / 16] = (g.issued << 1) | uint64_t(operand == 'B');
    return b16_to_float(bits, bf16);
  };
  std::vector<double> a(64 * 16), b(size_t(n) * 16);
  if (a0.a_in_regs) {
    // A fragment (ALayout_64x16): thread t = 32 w + 4 g + q holds in register j the pair
    // (row 16 w + g + 8 (j % 2), columns 2 q + 8 (j / 2) + {0, 1}), low half first.
    for (int t = 0; t < 128; ++t) {
      const int w = t / 32, gr = (t % 32) / 4, q = t % 4;
      for (int j = 0; j < 4; ++j) {
        const int row = 16 * w + gr + 8 * (j % 2), col = 2 * q + 8 * (j / 2);
        a[row * 16 + col] = b16_to_float(uint16_t(args[t].a_regs[j] & 0xffffu), bf16);
        a[row * 16 + col + 1] = b16_to_float(uint16_t(args[t].a_regs[j] >> 16), bf16);
      }
    }
  } else {
    for (int m = 0; m < 64; ++m) {
      for (int k = 0; k < 16; ++k) a[m * 16 + k] = load(a0.a_desc, a0.tnsp_a != 0, m, k, 'A');
    }
  }
  for (int col = 0; col < n; ++col) {
    for (int k = 0; k < 16; ++k) b[col * 16 + k] = load(a0.b_desc, a0.tnsp_b != 0, col, k, 'B');
  }
  const double sign = double(a0.scale_a) * double(a0.scale_b);
  g.product.assign(size_t(64) * n, 0.0);
  for (int m = 0; m < 64; ++m) {
    for (int col = 0; col < n; ++col) {
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += a[m * 16 + k] * b[col * 16 + k];
      g.product[size_t(m) * n + col] = sign * acc;
    }
  }
}

std::shared_ptr<PendingWgmma> pending_for(Fiber& f, const float* d) {
  for (auto it = f.wgmma_open.rbegin(); it != f.wgmma_open.rend(); ++it) {
    if ((*it)->d == d && !(*it)->superseded) return *it;
  }
  for (auto g = f.wgmma_groups.rbegin(); g != f.wgmma_groups.rend(); ++g) {
    for (auto it = g->rbegin(); it != g->rend(); ++it) {
      if ((*it)->d == d && !(*it)->superseded) return *it;
    }
  }
  return nullptr;
}

bool overlaps_pending(Fiber& f, const float* p, int count) {
  auto hit = [&](const std::shared_ptr<PendingWgmma>& r) {
    return !r->superseded && p < r->d + r->count && r->d < p + count;
  };
  for (auto& r : f.wgmma_open) if (hit(r)) return true;
  for (auto& g : f.wgmma_groups) for (auto& r : g) if (hit(r)) return true;
  return false;
}

constexpr uint32_t kNanBits = 0xffffffffu;

}  // namespace

const ThreadContext& context() { return running().coords; }

int lane() { return running().linear % 32; }

void sync_block() {
  Block& cta = current_cta();
  arrive(cta.block_barrier, cta.live);
}

void warp_exchange(WarpOp op, const void* mine, size_t bytes, void* all) {
  Fiber& f = running();
  Block& cta = *f.cta;
  Warp& w = cta.warps[f.linear / 32];
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
  if (s.blocks.size() > 1) {
    fail("static __shared__ variables are not modelled in cluster launches (the emulator keeps them as "
         "function statics, which the cluster's CTAs, running together, would share): use dynamic shared memory");
  }
  uint64_t& last = s.poisoned_in_block[variable];
  if (last != current_cta().serial) {
    last = current_cta().serial;
    std::memset(variable, 0xff, bytes);
  }
}

unsigned char* dynamic_smem() { return current_cta().smem; }
size_t dynamic_smem_bytes() { return current_cta().smem_size; }

void cp_async16(void* smem, const void* gmem) {
  check_shared(smem, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("cp.async source not 16-byte aligned");
  PendingCopy c;
  c.dst = smem;
  std::memcpy(c.data, gmem, 16);
  unreadable_until_landed(current_cta(), smem, 16);  // until the wait, whose landing is a generic write
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


// ---- Hopper asynchronous operations ----

uint32_t smem_address(const void* p) { return shared_offset(p, 1, "shared address"); }

void* smem_pointer(uint32_t address) {
  const Block& cta = current_cta();
  if (size_t(address) >= cta.smem_size) fail("shared address outside the block's dynamic shared memory");
  return cta.smem + address;
}

void mbarrier_init(void* bar, unsigned count) {
  Block& cta = current_cta();
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) fail("mbarrier.init: address not 8-byte aligned");
  if (count < 1 || count > (1u << 20) - 1) fail("mbarrier.init: count out of range [1, 2^20 - 1]");
  Mbarrier& m = cta.mbarriers[bar];
  if (!m.waiting.empty()) fail("mbarrier.init of an mbarrier that threads wait on");
  m = Mbarrier{};
  m.expected = m.pending = count;
  std::memset(bar, 0, 8);  // the object's bits are opaque; only the emulator's state counts
}

void mbarrier_inval(void* bar) {
  Mbarrier& m = mbarrier_at(bar, "mbarrier.inval");
  if (!m.waiting.empty()) fail("mbarrier.inval of an mbarrier that threads wait on");
  current_cta().mbarriers.erase(bar);
}

uint64_t arrive_on(Mbarrier& m, unsigned count) {
  if (count < 1 || count > m.pending) {
    fail("mbarrier.arrive: " + std::to_string(count) + " arrivals where the phase awaits " +
         std::to_string(m.pending) + (m.pending == 0 ? " (all in, tx bytes outstanding): a wait on the wrong phase?" : ""));
  }
  const uint64_t token = m.phase;
  m.pending -= count;
  learn(m.arrived, running().known);  // released to the threads that see the phase complete
  maybe_complete(m);
  return token;
}

uint64_t mbarrier_arrive(void* bar, unsigned count) { return arrive_on(mbarrier_at(bar, "mbarrier.arrive"), count); }

void mbarrier_expect_tx(void* bar, unsigned tx_bytes) {
  Mbarrier& m = mbarrier_at(bar, "mbarrier.expect_tx");
  m.tx += tx_bytes;
  if (m.tx > (1ll << 20) - 1) fail("mbarrier.expect_tx: tx-count above 2^20 - 1");
}

uint64_t mbarrier_arrive_expect_tx(void* bar, unsigned tx_bytes) {
  mbarrier_expect_tx(bar, tx_bytes);
  return mbarrier_arrive(bar, 1);
}

// Whether the phase of that parity is complete; if so, the calling thread acquires what the
// completed phases' arrivals knew.
bool phase_complete(Mbarrier& m, unsigned parity) {
  if ((m.phase & 1) == (parity & 1)) return false;
  learn(running().known, m.completed);
  return true;
}

bool mbarrier_test_wait_parity(void* bar, unsigned parity) {
  return phase_complete(mbarrier_at(bar, "mbarrier.test_wait"), parity);
}

bool mbarrier_try_wait_parity(void* bar, unsigned parity) {
  Mbarrier& m = mbarrier_at(bar, "mbarrier.try_wait");
  if (phase_complete(m, parity)) return true;
  land_bulk_copies(bar);
  if (state().failed) fail(state().error);
  if (phase_complete(m, parity)) return true;
  Fiber& f = running();
  f.waiting_on = &m;
  m.waiting.push_back(&f);
  to_scheduler();  // resumed when the phase completes (or never: a deadlock)
  return true;
}

namespace {

// An access by the running thread to the shared memory of another CTA of its cluster (a
// remote arrive, a multicast copy): that CTA must not have exited, and must not exit before
// the access happens before the exit of one of its threads (cta_exits).
void note_remote_access(Block& target, const std::string& what) {
  State& s = state();
  Fiber& f = running();
  if (target.exited) {
    fail(what + " into the shared memory of CTA rank " + std::to_string(target.rank) +
         " of the cluster, which has exited: a CTA's shared memory is gone when it exits; keep every CTA "
         "alive with a cluster barrier (barrier.cluster.arrive.release + wait.acquire) until its peers' "
         "last access");
  }
  const int me = f.cta->rank;
  const uint64_t serial = ++s.remote_serial[size_t(me)];
  f.known.remote[size_t(me)] = serial;
  target.remote_in[size_t(me)] = serial;
}

// A remote use of `owner`'s mbarrier m: its mbarrier.init must be visible at cluster scope,
// published by a fence.mbarrier_init.release.cluster of its CTA that happens before this use
// (in practice: init, fence, then a cluster barrier before any peer touches it).
void check_published(const Block& owner, const Mbarrier& m, const std::string& what) {
  const std::string of = "the mbarrier of CTA rank " + std::to_string(owner.rank);
  if (m.published == 0) {
    fail(what + ": " + of + " has had no fence.mbarrier_init.release.cluster since its mbarrier.init: "
         "another CTA of the cluster may not see the initialisation");
  }
  if (running().known.init_fences[size_t(owner.rank)] < m.published) {
    fail(what + ": " + of + " is initialised and fenced, but that fence is not ordered before this "
         "remote use: a cluster barrier (barrier.cluster.arrive.release + barrier.cluster.wait.acquire) "
         "must come between the fence.mbarrier_init and a peer's first arrive or multicast on it");
  }
}

// Issues a copy of `data` (the source, read at issue) to shared offset `dst` of `target`,
// completing its bytes on the mbarrier `bar` of `target` when it lands. `op`: the PTX
// instruction, `what`: the copy, in messages.
void issue_copy(Block& target, uint32_t dst, std::vector<unsigned char> data, const void* bar, const char* op,
                const char* what) {
  State& s = state();
  Fiber& f = running();
  const bool remote = &target != f.cta;
  if (remote) note_remote_access(target, what);
  const Mbarrier& m = async_mbarrier(bar, op, &target);
  if (remote) check_published(target, m, what);
  check_copy_spares_wgmma_operands(target, dst, uint32_t(data.size()), what);
  BulkCopy c;
  c.cta = &target;
  c.dst = target.smem + dst;
  c.data = std::move(data);
  c.bar = bar;
  c.known = f.known;
  unreadable_until_landed(target, c.dst, c.data.size());
  s.bulk_in_flight.push_back(std::move(c));
}

}  // namespace

void bulk_copy_g2s(void* smem_dst, const void* gmem_src, unsigned bytes, void* bar) {
  const uint32_t dst = shared_offset(smem_dst, bytes, "cp.async.bulk destination");
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
    fail("cp.async.bulk: addresses must be 16-byte aligned");
  }
  if (bytes == 0 || bytes % 16 != 0) fail("cp.async.bulk: size must be a nonzero multiple of 16");
  const auto* src = static_cast<const unsigned char*>(gmem_src);
  issue_copy(current_cta(), dst, std::vector<unsigned char>(src, src + bytes), bar, "cp.async.bulk",
             "bulk copy (cp.async.bulk)");
}

namespace {

// The shared-memory image of the box at (x, y) of tensor map `map` landing at shared offset
// `dst`: row after row (dim 0 fastest), row_bytes apart; with a swizzle the 16-byte chunk c
// of the row at shared address a goes to chunk c ^ ((a >> 7) & (span/16 - 1)), i.e. CuTe's
// Swizzle<log2(span/16),4,3> on the shared-memory byte address. Elements outside the tensor
// are zeros (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE).
std::vector<unsigned char> tma_box(const TensorMap2d& m, uint32_t dst, int x, int y) {
  const uint32_t row_bytes = m.box[0] * m.elem_bytes, total = row_bytes * m.box[1];
  const uint32_t mask = m.swizzle_bytes == 0 ? 0 : m.swizzle_bytes / 16 - 1;
  std::vector<unsigned char> data(total, 0);
  for (uint32_t j = 0; j < m.box[1]; ++j) {
    for (uint32_t i = 0; i < m.box[0]; ++i) {
      const uint32_t a = dst + j * row_bytes + i * m.elem_bytes;
      const uint32_t swizzled = a ^ (((a >> 7) & mask) << 4);
      const long long gx = (long long)x + i, gy = (long long)y + j;
      if (gx < 0 || gy < 0 || uint64_t(gx) >= m.dims[0] || uint64_t(gy) >= m.dims[1]) continue;
      std::memcpy(&data[swizzled - dst], m.base + uint64_t(gy) * m.stride + uint64_t(gx) * m.elem_bytes,
                  m.elem_bytes);
    }
  }
  return data;
}

// The tensor map, and the box's shared offset (checked) in the running CTA.
TensorMap2d tma_map(const void* tensor_map, void* smem_dst, uint32_t& dst) {
  TensorMap2d m;
  std::memcpy(&m, tensor_map, sizeof(m));
  if (m.magic != kTensorMapMagic) fail("cp.async.bulk.tensor: not a tensor map made by cuTensorMapEncodeTiled");
  dst = shared_offset(smem_dst, size_t(m.box[0]) * m.elem_bytes * m.box[1], "cp.async.bulk.tensor destination");
  if (dst % 128 != 0) fail("cp.async.bulk.tensor: shared-memory destination not 128-byte aligned");
  return m;
}

}  // namespace

void tma_load_2d(void* smem_dst, const void* tensor_map, int x, int y, void* bar) {
  uint32_t dst;
  const TensorMap2d m = tma_map(tensor_map, smem_dst, dst);
  issue_copy(current_cta(), dst, tma_box(m, dst, x, y), bar, "cp.async.bulk.tensor", "TMA copy (cp.async.bulk.tensor)");
}

void tma_load_2d_multicast(void* smem_dst, const void* tensor_map, int x, int y, void* bar, uint16_t cta_mask) {
  State& s = state();
  const char* what = "TMA multicast copy (cp.async.bulk.tensor .multicast::cluster)";
  const unsigned n = unsigned(s.blocks.size());
  if (cta_mask == 0) fail(std::string(what) + ": empty ctaMask");
  for (unsigned r = n; r < 16; ++r) {
    if ((cta_mask >> r) & 1u) {
      fail(std::string(what) + ": ctaMask 0x" + [&] { char b[8]; std::snprintf(b, sizeof b, "%x", cta_mask); return std::string(b); }() +
           " names CTA rank " + std::to_string(r) + ", outside the cluster of " + std::to_string(n) + " CTAs");
    }
  }
  uint32_t dst;
  const TensorMap2d m = tma_map(tensor_map, smem_dst, dst);
  const uint32_t bar_off = shared_offset(bar, 8, "multicast mbarrier");
  const std::vector<unsigned char> data = tma_box(m, dst, x, y);
  // The data lands at the same CTA-relative offset in every destination CTA, and each one's
  // mbarrier at the same offset as `bar` gets the complete_tx of the bytes landed there.
  for (unsigned r = 0; r < n; ++r) {
    if ((cta_mask >> r) & 1u) {
      issue_copy(s.blocks[r], dst, data, s.blocks[r].smem + bar_off, "cp.async.bulk.tensor .multicast::cluster", what);
    }
  }
}

// Any thread's fence counts for the whole block, and for every generic write that precedes
// it in the emulated execution, whether or not a barrier orders that write before the fence:
// an approximation that never fails correctly fenced code; a write that is not ordered before
// the fence shows up under the schedules that run it after the fence.
void fence_proxy_async_shared() {
  Block& cta = current_cta();
  std::copy(cta.smem, cta.smem + cta.smem_size, cta.async_view.begin());
  for (auto& [bar, m] : cta.mbarriers) m.init_fenced = true;
}

// Also a release at cluster scope of the CTA's initialised mbarriers: they are published
// with this fence's number, which peers must know (through a cluster barrier) to use them.
void fence_mbarrier_init() {
  Block& cta = current_cta();
  ++cta.init_fences;
  for (auto& [bar, m] : cta.mbarriers) {
    m.init_fenced = true;
    if (m.published == 0) m.published = cta.init_fences;
  }
  running().known.init_fences[size_t(cta.rank)] = cta.init_fences;
}

// ---- clusters ----

unsigned cluster_ctarank() { return unsigned(current_cta().rank); }
unsigned cluster_nctarank() { return unsigned(state().blocks.size()); }

namespace {
// Shared::cluster addresses: a shared::cta address (below kClusterWindow) names the running
// CTA's own shared memory; mapa gives (rank + 1) * kClusterWindow + offset for CTA `rank`.
constexpr uint32_t kClusterWindow = 1u << 24;
}  // namespace

uint32_t mapa_shared(uint32_t address, unsigned rank) {
  State& s = state();
  if (rank >= s.blocks.size()) {
    fail("mapa.shared::cluster: CTA rank " + std::to_string(rank) + " outside the cluster of " +
         std::to_string(s.blocks.size()) + " CTAs");
  }
  const uint32_t offset = address % kClusterWindow;
  if (offset >= current_cta().smem_size) fail("mapa.shared::cluster: address outside the dynamic shared memory");
  return (rank + 1) * kClusterWindow + offset;
}

namespace {

// The CTA and offset a shared::cluster address names.
std::pair<Block*, uint32_t> cluster_target(uint32_t address, size_t bytes, const char* what) {
  State& s = state();
  Block* target = &current_cta();
  if (address >= kClusterWindow) {
    const uint32_t rank = address / kClusterWindow - 1;
    if (rank >= s.blocks.size()) fail(std::string(what) + ": shared::cluster address of no CTA of the cluster");
    target = &s.blocks[rank];
  }
  const uint32_t offset = address % kClusterWindow;
  if (size_t(offset) + bytes > target->smem_size) {
    fail(std::string(what) + ": address outside the target CTA's dynamic shared memory");
  }
  return {target, offset};
}

}  // namespace

void mbarrier_arrive_cluster(uint32_t address) {
  const char* what = "mbarrier.arrive.release.cluster.shared::cluster";
  auto [target, offset] = cluster_target(address, 8, what);
  void* bar = target->smem + offset;
  if (target != &current_cta()) {
    note_remote_access(*target, what);
    Mbarrier& m = mbarrier_at(bar, what, target);
    check_published(*target, m, what);
    arrive_on(m, 1);
  } else {
    arrive_on(mbarrier_at(bar, what), 1);
  }
}

namespace {

// Completes the cluster barrier's phase once every live thread of the cluster has arrived.
void maybe_complete_cluster_phase() {
  State& s = state();
  ClusterBarrier& cb = s.cluster_barrier;
  if (cb.not_arrived > 0 || cb.arrivals == 0) return;
  ++cb.phase;
  learn(cb.completed, cb.pending);
  cb.pending = Knowledge{};
  cb.arrivals = 0;
  cb.not_arrived = s.cluster_live;
  for (Fiber* f : cb.waiting) {
    learn(f->known, cb.completed);
    f->cluster_arrived = 0;
    make_runnable(f);
  }
  cb.waiting.clear();
}

}  // namespace

void cluster_arrive() {
  Fiber& f = running();
  ClusterBarrier& cb = state().cluster_barrier;
  if (f.cluster_arrived != 0) {
    fail("barrier.cluster.arrive twice without a barrier.cluster.wait between");
  }
  f.cluster_arrived = cb.phase + 1;
  learn(cb.pending, f.known);
  ++cb.arrivals;
  --cb.not_arrived;
  maybe_complete_cluster_phase();
}

void cluster_wait() {
  Fiber& f = running();
  ClusterBarrier& cb = state().cluster_barrier;
  if (f.cluster_arrived == 0) fail("barrier.cluster.wait without a barrier.cluster.arrive before it");
  if (cb.phase >= f.cluster_arrived) {
    learn(f.known, cb.completed);
    f.cluster_arrived = 0;
    return;
  }
  cb.waiting.push_back(&f);
  to_scheduler();  // resumed when the phase completes (or never: a deadlock)
}

namespace {

void cluster_thread_exits(Fiber& f) {
  State& s = state();
  ClusterBarrier& cb = s.cluster_barrier;
  --s.cluster_live;
  if (f.cluster_arrived == 0) --cb.not_arrived;  // exiting releases the barrier (PTX: exit)
  maybe_complete_cluster_phase();
}

// The last thread of `cta` has exited: its shared memory is gone, so every access a peer made
// to it must happen before the exit of one of its threads, and no copy (its own or a peer's
// multicast) may be in flight into it.
void cta_exits(Block& cta) {
  State& s = state();
  cta.exited = true;
  for (size_t j = 0; j < s.blocks.size(); ++j) {
    if (int(j) == cta.rank || cta.remote_in[j] <= cta.at_exit.remote[j]) continue;
    fail("CTA rank " + std::to_string(cta.rank) + " of the cluster exits while CTA rank " + std::to_string(j) +
         " may still access its shared memory: a remote mbarrier arrive or multicast copy into it is not "
         "ordered before the exit of any of its threads; end the kernel with a cluster barrier "
         "(barrier.cluster.arrive.release + barrier.cluster.wait.acquire) in every CTA after its last remote access");
  }
  for (const BulkCopy& c : s.bulk_in_flight) {
    if (c.cta == &cta) {
      fail("the last thread of " + (s.blocks.size() > 1 ? "CTA rank " + std::to_string(cta.rank) + " of the cluster"
                                                         : std::string("the block")) +
           " exits with a bulk / TMA copy still in flight into its shared memory (no thread waited for it on its "
           "mbarrier): its shared memory is gone when it exits");
    }
  }
}

}  // namespace

void setmaxnreg(bool increase, unsigned regs) {
  const std::string what = increase ? "setmaxnreg.inc" : "setmaxnreg.dec";
  if (regs < 24 || regs > 256 || regs % 8 != 0) {
    fail(what + ": register count " + std::to_string(regs) + " is not a multiple of 8 in [24, 256]");
  }
  WarpGroup& g = whole_warpgroup(what);
  const uint32_t mine = (regs << 1) | uint32_t(increase);
  std::memcpy(g.slots[running().linear % 128], &mine, sizeof(mine));
  group_arrive(g, GroupOp::kSetmaxnreg);
  uint32_t first;
  std::memcpy(&first, g.slots[0], sizeof(first));
  if (first != mine) {
    fail(what + ": threads of one warpgroup give different register counts or directions (.inc/.dec); "
         "the instruction is .sync.aligned: all 128 threads execute the same one");
  }
  group_arrive(g, GroupOp::kSetmaxnreg);  // every thread has read slot 0 before it is reused
}

void wgmma_fence() { running().wgmma_fenced = true; }

void wgmma_mma_async(int type, int n, float* d, const uint32_t* a_regs, uint64_t a_desc, uint64_t b_desc,
                     int scale_d, int scale_a, int scale_b, int tnsp_a, int tnsp_b) {
  Fiber& f = running();
  WarpGroup& g = whole_warpgroup("wgmma.mma_async");
  if (n < 8 || n > 256 || n % 8 != 0) fail("wgmma.mma_async: N must be a multiple of 8 in [8, 256]");
  if ((scale_a != 1 && scale_a != -1) || (scale_b != 1 && scale_b != -1)) fail("wgmma.mma_async: imm-scale must be +-1");
  if (a_regs != nullptr && tnsp_a != 0) fail("wgmma.mma_async: A from registers cannot be transposed");
  if (!f.wgmma_fenced) {
    fail("wgmma.mma_async without a wgmma.fence since the thread's start or its last wgmma.wait_group");
  }
  WgmmaArgs mine{};
  mine.a_desc = a_desc;
  mine.b_desc = b_desc;
  if (a_regs != nullptr) std::memcpy(mine.a_regs, a_regs, sizeof(mine.a_regs));
  mine.type = type, mine.n = n, mine.scale_d = scale_d, mine.scale_a = scale_a, mine.scale_b = scale_b;
  mine.tnsp_a = tnsp_a, mine.tnsp_b = tnsp_b, mine.a_in_regs = a_regs != nullptr;
  std::memcpy(g.slots[f.linear % 128], &mine, sizeof(mine));
  group_arrive(g, GroupOp::kWgmma);
  if (!g.computed) {
    wgmma_product(g);
    g.computed = true;
  }
  // This thread's accumulator fragment (CLayout_64xN): thread t = 32 w + 4 g + q holds
  // d[i] = D(16 w + g + 8 ((i / 2) % 2), 8 (i / 4) + 2 q + i % 2).
  const int t = f.linear % 128, w = t / 32, gr = (t % 32) / 4, q = t % 4, count = n / 2;
  std::shared_ptr<PendingWgmma> prior = pending_for(f, d);
  if (prior == nullptr && overlaps_pending(f, d, count)) {
    fail("wgmma.mma_async: accumulator registers overlap those of an in-flight wgmma");
  }
  auto rec = std::make_shared<PendingWgmma>();
  rec->serial = g.issued;
  rec->d = d;
  rec->count = count;
  rec->value.resize(count);
  for (int i = 0; i < count; ++i) {
    const int row = 16 * w + gr + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * q + i % 2;
    const double c = scale_d == 0 ? 0.0 : prior != nullptr ? double(prior->value[i]) : double(d[i]);
    rec->value[i] = float(c + g.product[size_t(row) * n + col]);
  }
  if (prior != nullptr) {
    if (prior->count != count) fail("wgmma.mma_async: in-flight accumulators reused with another N");
    prior->superseded = true;  // its operands stay its own: checked when its group retires
  }
  if (t == 0) rec->operands.insert(rec->operands.end(), g.operands.begin(), g.operands.end());
  for (int i = 0; i < count; ++i) std::memcpy(&d[i], &kNanBits, 4);  // NaN until waited for
  f.wgmma_open.push_back(rec);
  if (g.barrier.arrived + 1 == 128) g.computed = false;  // the last reader resets
  group_arrive(g, GroupOp::kWgmma);
}

void wgmma_commit_group() {
  Fiber& f = running();
  f.wgmma_groups.push_back(std::move(f.wgmma_open));
  f.wgmma_open.clear();
}

void wgmma_wait_group(int pending_groups_allowed) {
  Fiber& f = running();
  const Block& cta = *f.cta;
  while (int(f.wgmma_groups.size()) > pending_groups_allowed) {
    for (auto& r : f.wgmma_groups.front()) {
      uint64_t& retired = f.known.retired[size_t(cta.rank) * kMaxWarpGroups + f.linear / 128];
      retired = std::max(retired, r->serial);
      // A superseded wgmma's result travels on with the later one on the same registers;
      // its shared-memory operands are released here, when its own group completes.
      if (!r->superseded) {
        for (int i = 0; i < r->count; ++i) {
          uint32_t bits;
          std::memcpy(&bits, &r->d[i], 4);
          if (bits != kNanBits) fail("accumulator registers of an in-flight wgmma were written before its wait_group");
        }
        std::memcpy(r->d, r->value.data(), sizeof(float) * size_t(r->count));
      }
      for (const auto& [addr, bits] : r->operands) {
        uint16_t now;
        std::memcpy(&now, cta.smem + addr, 2);
        if (now != bits) fail("shared-memory operand of an in-flight wgmma was overwritten before its wait_group");
      }
    }
    f.wgmma_groups.pop_front();
  }
  f.wgmma_fenced = false;  // registers now belong to other instructions until the next fence
}

void wgmma_check_registers(const float* d, int count) {
  if (overlaps_pending(running(), d, count)) {
    fail("accumulator registers read while a wgmma on them is in flight (no wgmma.wait_group)");
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

std::vector<std::string> take_launched_kernels() {
  std::vector<std::string> names;
  for (const void* id : state().launched) {
    Dl_info info{};
    std::string name = "?";
    if (dladdr(id, &info) != 0 && info.dli_sname != nullptr && info.dli_saddr == id) {
      int status = 0;
      char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      name = status == 0 ? demangled : info.dli_sname;
      std::free(demangled);
    }
    names.push_back(std::move(name));
  }
  state().launched.clear();
  return names;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const void* kernel_id,
                     const std::function<void()>& body, dim3 cluster) {
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
  const int ctas = int(cluster.x * cluster.y * cluster.z);
  if (ctas < 1 || ctas > kMaxClusterCtas) {
    return launch_failed(cudaErrorInvalidClusterSize,
                         "cluster of " + std::to_string(ctas) + " CTAs (the emulator models 1..8, the portable sizes)");
  }
  if (grid.x % cluster.x != 0 || grid.y % cluster.y != 0 || grid.z % cluster.z != 0) {
    return launch_failed(cudaErrorInvalidClusterSize, "grid dimensions not multiples of the cluster dimensions");
  }
  const auto opt_in = s.smem_opt_in.find(kernel_id);
  const size_t limit = opt_in == s.smem_opt_in.end() ? kDefaultSmemLimit : size_t(opt_in->second);
  if (smem_bytes > limit) {
    return launch_failed(cudaErrorInvalidValue,
                         std::to_string(smem_bytes) + " bytes of dynamic shared memory, limit " +
                             std::to_string(limit) + " for this kernel");
  }
  s.launched.push_back(kernel_id);
  if (s.fibers.size() < size_t(threads) * size_t(ctas)) s.fibers.resize(size_t(threads) * size_t(ctas));
  s.body = &body;
  s.failed = false;
  s.error.clear();
  s.threads_per_block = threads;
  // Clusters run one after another; the CTAs of one cluster run together, their threads
  // scheduled as one pool (the warp-by-warp schedules: CTA by CTA, rank order or reversed).
  for (unsigned cz = 0; cz < grid.z; cz += cluster.z) {
    for (unsigned cy = 0; cy < grid.y; cy += cluster.y) {
      for (unsigned cx = 0; cx < grid.x; cx += cluster.x) {
        s.blocks.clear();
        s.blocks.resize(size_t(ctas));
        s.cluster_live = threads * ctas;
        s.cluster_barrier = ClusterBarrier{};
        s.cluster_barrier.not_arrived = s.cluster_live;
        s.remote_serial = {};
        s.runnable.clear();
        s.runnable_by_warp.assign(size_t(ctas) * size_t(threads / 32), {});
        s.queued = 0;
        s.bulk_in_flight.clear();
        for (int r = 0; r < ctas; ++r) {
          Block& b = s.blocks[size_t(r)];
          b.rank = r;
          b.idx = make_uint3(cx + unsigned(r) % cluster.x, cy + unsigned(r) / cluster.x % cluster.y,
                             cz + unsigned(r) / (cluster.x * cluster.y));
          b.serial = ++s.block_serial;
          b.live = threads;
          b.warps.assign(threads / 32, Warp{});
          for (Warp& w : b.warps) w.live = 32;
          b.warpgroups.assign(threads / 128, WarpGroup{});
          b.smem_storage.assign(smem_bytes + 1024, 0xff);
          b.smem = b.smem_storage.data() + (1024 - reinterpret_cast<uintptr_t>(b.smem_storage.data()) % 1024) % 1024;
          b.smem_size = smem_bytes;
          b.async_view.assign(smem_bytes, 0xff);  // the poison, as both proxies see it
        }
        for (int r = 0; r < ctas; ++r) {
          for (int t = 0; t < threads; ++t) {
            Fiber& f = s.fibers[size_t(r) * threads + t];
            init_fiber(f);
            f.linear = t;
            f.cta = &s.blocks[size_t(r)];
            f.coords.thread_idx = make_uint3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            f.coords.block_idx = f.cta->idx;
            f.coords.block_dim = block;
            f.coords.grid_dim = grid;
            make_runnable(&f);
          }
        }
        while (!s.failed) {
          // No thread can run: the bulk copies in flight land (their waiters may wake).
          if (s.queued == 0 && !(land_bulk_copies(nullptr) && !s.failed && s.queued > 0)) break;
          s.current = next_runnable();
          swapcontext(&s.scheduler, &s.current->context);
        }
        s.current = nullptr;
        if (s.failed) return launch_failed(cudaErrorLaunchFailure, s.error);
        if (s.cluster_live > 0) {
          const size_t all = size_t(threads) * size_t(ctas);
          std::string who;
          for (size_t t = 0; t < all; ++t) {
            if (!s.fibers[t].done) {
              who = where(s.fibers[t]);
              break;
            }
          }
          int at_mbarriers = 0, at_groups = 0, at_block = 0;
          for (size_t t = 0; t < all; ++t) at_mbarriers += s.fibers[t].waiting_on != nullptr;
          for (const Block& b : s.blocks) {
            at_block += b.block_barrier.arrived;
            for (const WarpGroup& g : b.warpgroups) at_groups += g.barrier.arrived;
          }
          const std::string at_cluster =
              ctas > 1 ? ", " + std::to_string(s.cluster_barrier.waiting.size()) + " at the cluster barrier" : "";
          return launch_failed(cudaErrorLaunchFailure,
                               "deadlock: " + std::to_string(s.cluster_live) + " threads wait forever (first: " +
                                   who + ", " + std::to_string(at_block) + " at the block barrier, " +
                                   std::to_string(at_mbarriers) + " at mbarrier waits, " +
                                   std::to_string(at_groups) + " at warpgroup-wide instructions" + at_cluster + ")");
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

// cuTensorMapEncodeTiled for the emulator: 2-D tiled maps of 1-, 2-, 4- or 8-byte elements,
// element strides 1, no interleave, swizzle none / 32B / 64B / 128B (the box's inner
// dimension exactly the swizzle span), out-of-bounds elements read as zeros.
extern "C" CUresult cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                                           void* global, const cuuint64_t* dims, const cuuint64_t* strides,
                                           const cuuint32_t* box, const cuuint32_t* element_strides,
                                           CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                           CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob_fill) {
  auto refuse = [](const std::string& why) {
    emu::state().last_error = "cuTensorMapEncodeTiled: " + why;
    return CUDA_ERROR_INVALID_VALUE;
  };
  uint32_t elem = 0;
  switch (type) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: elem = 1; break;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: elem = 2; break;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32: case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: elem = 4; break;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_UINT64: elem = 8; break;
    default: return refuse("data type not modelled");
  }
  if (rank != 2) return refuse("only rank 2 is modelled");
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return refuse("interleave not modelled");
  if (oob_fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) return refuse("NaN out-of-bounds fill not modelled");
  if (reinterpret_cast<uintptr_t>(global) % 16 != 0) return refuse("global address not 16-byte aligned");
  if (strides[0] % 16 != 0 || strides[0] < dims[0] * elem) return refuse("stride not a multiple of 16 covering a row");
  if (element_strides[0] != 1 || element_strides[1] != 1) return refuse("element strides other than 1 not modelled");
  if (box[0] == 0 || box[1] == 0 || box[0] > 256 || box[1] > 256) return refuse("box dimensions must be in [1, 256]");
  if (box[0] * elem % 16 != 0) return refuse("inner box dimension not a multiple of 16 bytes");
  uint32_t span = 0;
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: span = 0; break;
    case CU_TENSOR_MAP_SWIZZLE_32B: span = 32; break;
    case CU_TENSOR_MAP_SWIZZLE_64B: span = 64; break;
    case CU_TENSOR_MAP_SWIZZLE_128B: span = 128; break;
    default: return refuse("swizzle mode not modelled");
  }
  if (span != 0 && box[0] * elem != span) return refuse("inner box bytes other than the swizzle span not modelled");
  emu::TensorMap2d m{emu::kTensorMapMagic, static_cast<const unsigned char*>(global), {dims[0], dims[1]},
                     strides[0], {box[0], box[1]}, elem, span};
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}
