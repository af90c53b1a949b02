// ThreadPool (see thread_pool.h). One job at a time is posted in job_ under
// mu_ with a new generation_; a worker that sees a new generation with a job
// registers itself in the job (workers_in, under mu_), claims chunks from the
// job's atomic counter, and deregisters. The caller runs chunks too, then
// withdraws the job (job_ = nullptr, under mu_) and waits until every
// registered worker has deregistered. A worker that wakes after the
// withdrawal finds no job and never touches it, so the job can live on the
// caller's stack and a call never waits for a worker that is still asleep.

#include "kernels/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

namespace kvcache::internal {

struct ThreadPool::Job {
  Job(int64_t n, int64_t num_chunks,
      absl::FunctionRef<void(int64_t, int64_t)> fn)
      : n(n), num_chunks(num_chunks), fn(fn) {}

  const int64_t n;
  const int64_t num_chunks;
  const absl::FunctionRef<void(int64_t, int64_t)> fn;
  std::atomic<int64_t> next_chunk{0};
  int workers_in = 0;  // Guarded by the pool's mu_.
};

int ThreadPool::ResolveThreads(int requested) {
  if (requested > 0) return requested;
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

ThreadPool::ThreadPool(int num_threads, StartThreadFn start_thread) {
  if (!start_thread) {
    start_thread = [](std::function<void()> body) {
      return std::thread(std::move(body));
    };
  }
  const int workers = std::max(num_threads, 1) - 1;
  workers_.reserve(static_cast<size_t>(workers));
  for (int i = 0; i < workers; ++i) {
    // Any failure to start a thread (std::system_error from pthread_create,
    // std::bad_alloc, a non-joinable result) ends the starting; the pool runs
    // with the workers it has. The push_back cannot throw (reserved above).
    std::thread thread;
    try {
      thread = start_thread([this] { WorkerLoop(); });
    } catch (...) {
      break;
    }
    if (!thread.joinable()) break;
    workers_.push_back(std::move(thread));
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunChunks(Job& job) {
  for (;;) {
    const int64_t c = job.next_chunk.fetch_add(1, std::memory_order_relaxed);
    if (c >= job.num_chunks) return;
    const int64_t begin = job.n * c / job.num_chunks;
    const int64_t end = job.n * (c + 1) / job.num_chunks;
    job.fn(begin, end);
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  for (;;) {
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || generation_ != seen;
      });
      if (stop_) return;
      seen = generation_;
      job = job_;
      if (job == nullptr) continue;  // Withdrawn before this worker woke.
      ++job->workers_in;
    }
    RunChunks(*job);
    std::lock_guard<std::mutex> lock(mu_);
    if (--job->workers_in == 0) done_cv_.notify_one();
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t num_chunks,
                             absl::FunctionRef<void(int64_t, int64_t)> fn) {
  if (n <= 0) return;
  num_chunks = std::min(num_chunks, n);
  std::unique_lock<std::mutex> run(run_mu_, std::defer_lock);
  if (num_chunks <= 1 || workers_.empty() || !run.try_lock()) {
    fn(0, n);
    return;
  }
  Job job(n, num_chunks, fn);
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &job;
    ++generation_;
  }
  work_cv_.notify_all();
  RunChunks(job);
  std::unique_lock<std::mutex> lock(mu_);
  job_ = nullptr;
  done_cv_.wait(lock, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return job.workers_in == 0;
  });
}

}  // namespace kvcache::internal
