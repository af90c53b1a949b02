// ThreadPool: the persistent workers that the CPU kernels split large calls
// over. A pool of N threads is the caller's thread plus N - 1 workers started
// once, in the constructor; a call to ParallelFor wakes them, runs chunks of
// the range on the caller's thread and the workers, and returns when every
// chunk has run. A call does no thread start and no allocation, and takes
// only an uncontended mutex to post the work.
//
// Failure policy: the pool never fails and never throws. When a worker cannot
// be started (the thread-start function throws, e.g. std::system_error at a
// container's pid limit, or returns a thread that is not joinable), the pool
// stops starting workers and runs with those it has, down to the caller's
// thread alone; every call still completes. num_threads() tells how many it
// got.
//
// Thread safety: ParallelFor may be called from any thread. One call at a time
// uses the workers; a call made while another is running runs entirely on its
// own caller's thread (no waiting on the other call). fn must not call
// ParallelFor on the same pool. Ownership: the pool owns its workers and joins
// them in the destructor, which must not run concurrently with a call.

#ifndef KVCACHE_KERNELS_THREAD_POOL_H_
#define KVCACHE_KERNELS_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"

namespace kvcache::internal {

class ThreadPool {
 public:
  // Starts a thread running `body` (std::thread's own constructor by
  // default). A test seam: it may throw (as std::thread does) or return a
  // thread that is not joinable to report that the thread was not started.
  using StartThreadFn = std::function<std::thread(std::function<void()> body)>;

  // Threads of a pool made for `requested` (0 = the machine's hardware
  // concurrency, at least 1).
  static int ResolveThreads(int requested);

  // A pool of `num_threads` threads counting the caller's (num_threads - 1
  // workers; 1 or less = no workers).
  explicit ThreadPool(int num_threads, StartThreadFn start_thread = {});
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Threads that run a call: the workers started plus the caller's.
  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(begin, end) over [0, n) in `num_chunks` contiguous chunks (at
  // most n; fewer threads than chunks take several), on the caller's thread
  // and the workers. With one chunk, or no workers, or while another call
  // runs, fn(0, n) runs on the caller's thread and no worker is woken.
  void ParallelFor(int64_t n, int64_t num_chunks,
                   absl::FunctionRef<void(int64_t, int64_t)> fn);

 private:
  struct Job;

  void WorkerLoop();
  // Claims and runs chunks of `job` until none is left.
  static void RunChunks(Job& job);

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // Held by the call that uses the workers.

  std::mutex mu_;
  std::condition_variable work_cv_;  // Workers wait for a new job or stop.
  std::condition_variable done_cv_;  // The caller waits for the workers.
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  Job* job_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_THREAD_POOL_H_
