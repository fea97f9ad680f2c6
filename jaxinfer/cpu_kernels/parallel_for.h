// Work on XLA's intra-op thread pool from inside an FFI handler, shared by the kernels of this package.
//
// A handler may itself run on a pool worker, so it never blocks on a task that has not started: items are claimed
// through an atomic counter by the calling thread and by helper tasks, and the caller waits only for items already
// claimed (their threads have started). A helper that starts after the handler returned finds nothing to claim.

#ifndef JAXINFER_CPU_KERNELS_PARALLEL_FOR_H_
#define JAXINFER_CPU_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer_cpu {

// Threads a handler may use: `requested` (0: the pool's), never more than the machine's cores (XLA's pool has a
// thread per forced host device: 8 in the tests on 2 cores).
inline int64_t UsableThreads(xla::ffi::ThreadPool& pool, int64_t requested) {
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return std::min(cores, requested > 0 ? requested : std::max<int64_t>(1, pool.num_threads()));
}

// Items claimed through `next`; `done` counts finished ones. Shared with the helper tasks through a shared_ptr.
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

// run(i) for i in [0, count) on up to `threads` threads: the caller and threads - 1 pool tasks.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t threads, int64_t count,
                        std::function<void(int64_t)> run) {
  const int64_t helpers = std::min(threads, count) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) run(i);
    return;
  }
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
