// The CPU backend's TierCopier: a second host pool, and one thread that runs
// the queued batches in order (storage/tier_copier.h).

#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "storage/tier_copier.h"

namespace kvcache {
namespace {

class CpuTierCopier final : public TierCopier {
 public:
  explicit CpuTierCopier(Buffer pool) : pool_(std::move(pool)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~CpuTierCopier() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  char* pool() const override { return pool_.as<char>(); }
  int64_t pool_bytes() const override {
    return static_cast<int64_t>(pool_.size());
  }

  absl::Status Enqueue(absl::Span<const CopyRun> runs, void*) override {
    if (TakeInjectedFailure()) {
      return absl::InternalError("tier copy failed (injected by a test)");
    }
    if (runs.empty()) return absl::OkStatus();
    std::vector<CopyRun> batch(runs.begin(), runs.end());
    int64_t bytes = 0;
    for (const CopyRun& r : runs) bytes += r.bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(Batch{std::move(batch), delay_, bytes});
      ++enqueued_;
      enqueued_bytes_ += bytes;
    }
    cv_.notify_all();
    return absl::OkStatus();
  }

  absl::Status WaitOn(void*) override {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return done_ == enqueued_; });
    return absl::OkStatus();
  }

  absl::Status Synchronize() override { return WaitOn(nullptr); }

  int64_t in_flight() override {
    std::lock_guard<std::mutex> lock(mu_);
    return enqueued_ - done_;
  }
  int64_t in_flight_bytes() override {
    std::lock_guard<std::mutex> lock(mu_);
    return enqueued_bytes_ - done_bytes_;
  }
  int64_t enqueued() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return enqueued_;
  }
  int64_t completed() override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }

 private:
  struct Batch {
    std::vector<CopyRun> runs;
    absl::Duration delay;
    int64_t bytes = 0;
  };

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // Stopped and drained.
      Batch batch = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      if (batch.delay > absl::ZeroDuration()) absl::SleepFor(batch.delay);
      for (const CopyRun& r : batch.runs) {
        std::memcpy(r.dst, r.src, static_cast<size_t>(r.bytes));
      }
      lock.lock();
      ++done_;
      done_bytes_ += batch.bytes;
      done_cv_.notify_all();
    }
  }

  Buffer pool_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::deque<Batch> queue_;
  int64_t enqueued_ = 0;
  int64_t done_ = 0;
  int64_t enqueued_bytes_ = 0;
  int64_t done_bytes_ = 0;
  bool stop_ = false;
  std::thread thread_;  // Last: starts after the members above exist.
};

}  // namespace

absl::StatusOr<std::unique_ptr<TierCopier>> CreateCpuTierCopier(
    Device& device, int64_t pool_bytes) {
  absl::StatusOr<Buffer> pool =
      device.AllocateStaging(static_cast<size_t>(pool_bytes));
  if (!pool.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "host tier of ", pool_bytes, " bytes: ", pool.status().message()));
  }
  try {
    return std::unique_ptr<TierCopier>(new CpuTierCopier(*std::move(pool)));
  } catch (const std::system_error& e) {  // The thread could not start.
    return absl::ResourceExhaustedError(
        absl::StrCat("host tier: could not start its copy thread: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<TierCopier>> CreateTierCopier(
    Device& device, int64_t pool_bytes) {
  return device.kind() == DeviceKind::kCuda
             ? CreateCudaTierCopier(device, pool_bytes)
             : CreateCpuTierCopier(device, pool_bytes);
}

}  // namespace kvcache
