// Work split over threads from inside an FFI handler, shared by the kernels of this package.
//
// Two ways, one rule (items claimed through an atomic counter, the calling thread working too):
//  - SpinPool: helper threads of this library's own that spin for a while after each job before they sleep. Decode
//    calls a kernel every few tens of microseconds with a few microseconds of work per thread; a task scheduled on
//    XLA's pool started 10-120 us later on a 2-core machine (its workers sleep), which cost more than the work.
//    $JAXINFER_CPU_KERNELS_SPIN_US sets the spin (default 200 microseconds); 0 starts no helpers (XLA's pool only:
//    no CPU burnt between calls, slower decode).
//  - XLA's intra-op pool, where another handler holds the SpinPool (8 host devices under shard_map run handlers at
//    once) or it has no helpers: a handler may itself run on a pool worker, so it never blocks on a task that has
//    not started; it waits only for items already claimed (their threads have started).

#ifndef JAXINFER_CPU_KERNELS_PARALLEL_FOR_H_
#define JAXINFER_CPU_KERNELS_PARALLEL_FOR_H_

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXINFER_CPU_RELAX() _mm_pause()
#else
#define JAXINFER_CPU_RELAX() std::this_thread::yield()
#endif

namespace jaxinfer_cpu {

// The CPUs this process may run on (its affinity mask when first asked: a process pinned to 2 of 16 CPUs gets 2).
inline int64_t UsableCores() {
  static const int64_t cores = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<int64_t>(std::max(1, CPU_COUNT(&set)));
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return cores;
}

// Threads a handler may use: `requested` (0: the pool's), never more than the cores this process may use (XLA's
// pool has a thread per forced host device: 8 in the tests on 2 cores).
inline int64_t UsableThreads(xla::ffi::ThreadPool& pool, int64_t requested) {
  return std::min(UsableCores(), requested > 0 ? requested : std::max<int64_t>(1, pool.num_threads()));
}

// Helper threads (one fewer than the usable cores) that wait for jobs by spinning for kSpin after the last one, then
// sleep until the next. One job at a time: a handler that finds the pool busy uses XLA's pool instead (TryRun false).
class SpinPool {
 public:
  static constexpr int64_t kDefaultSpinMicroseconds = 200;

  // The process's pool, started on first use; never destroyed (its threads are detached: exit does not wait).
  static SpinPool& Get() {
    static SpinPool* pool = [] {
      int64_t spin = kDefaultSpinMicroseconds;
      if (const char* env = std::getenv("JAXINFER_CPU_KERNELS_SPIN_US"); env && *env) spin = std::atoll(env);
      return new SpinPool(spin > 0 ? UsableCores() - 1 : 0, std::max<int64_t>(0, spin));
    }();
    return *pool;
  }

  int64_t helpers() const { return static_cast<int64_t>(helpers_); }

  // run(i) for every i in [0, count) on the calling thread and up to threads - 1 helpers; false (nothing run) when
  // another caller holds the pool.
  bool TryRun(int64_t threads, int64_t count, const std::function<void(int64_t)>& run) {
    std::unique_lock<std::mutex> hold(busy_, std::try_to_lock);
    if (!hold.owns_lock()) return false;
    run_ = &run;
    count_ = count;
    next_.store(0);
    done_.store(0);
    seats_.store(std::min<int64_t>(threads, count) - 1);  // helpers that may join
    open_.store(true);
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    Claim();
    // Every item is claimed; close the door and wait for the helpers inside (their items included).
    open_.store(false);
    while (inside_.load() != 0) JAXINFER_CPU_RELAX();
    return true;
  }

 private:
  SpinPool(int64_t helpers, int64_t spin_us) : helpers_(std::max<int64_t>(0, helpers)), spin_(spin_us) {
    for (int64_t i = 0; i < helpers_; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Claim() {
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      (*run_)(i);
      done_.fetch_add(1);
    }
  }

  // A helper: wait for a new generation (spinning, then asleep), join it if a seat is free and the door open.
  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      auto deadline = std::chrono::steady_clock::now() + spin_;
      for (int spins = 0; generation_.load() == seen; ++spins) {
        JAXINFER_CPU_RELAX();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleeping_.fetch_sub(1);
          break;
        }
      }
      seen = generation_.load();
      // Enter, then look at the door: the caller closes it, then waits for inside_ == 0 (both sequentially
      // consistent, so a helper that saw it open is counted, and one that entered late sees it closed).
      inside_.fetch_add(1);
      if (open_.load() && seats_.fetch_sub(1) > 0) Claim();
      inside_.fetch_sub(1);
    }
  }

  const int64_t helpers_;
  const std::chrono::microseconds spin_;
  std::mutex busy_;  // held by the caller whose job this is
  const std::function<void(int64_t)>* run_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0}, done_{0}, seats_{0};
  std::atomic<bool> open_{false};
  std::atomic<int64_t> inside_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> sleeping_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

// Items claimed through `next`; `done` counts finished ones. Shared with XLA's pool tasks through a shared_ptr.
struct ParallelJob {
  std::function<void(int64_t)> run;  // reads the handler's buffers: only called for a claimed item
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Work() {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      run(i);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// run(i) for i in [0, count) on up to `threads` threads: the caller and the SpinPool's helpers, or where another
// handler holds the SpinPool, the caller and threads - 1 tasks on XLA's pool.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t threads, int64_t count,
                        std::function<void(int64_t)> run) {
  const int64_t helpers = std::min(threads, count) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) run(i);
    return;
  }
  if (SpinPool::Get().helpers() > 0 && SpinPool::Get().TryRun(threads, count, run)) return;
  auto job = std::make_shared<ParallelJob>();
  job->run = std::move(run);
  job->count = count;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  // Every item is claimed now; wait for those still running.
  std::unique_lock<std::mutex> lock(job->mutex);
  job->finished.wait(lock, [&] { return job->done.load() == job->count; });
}

}  // namespace jaxinfer_cpu

#endif  // JAXINFER_CPU_KERNELS_PARALLEL_FOR_H_
