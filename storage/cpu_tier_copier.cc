// The CPU backend's TierCopier: a second host pool, and one thread per lane
// that runs the lane's batches in order, each pair's runs one memcpy each
// (storage/tier_copier.h).

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
  CpuTierCopier(Buffer pool, absl::Span<const TierRun> runs, int64_t slot_bytes,
                int32_t num_slots)
      : TierCopier(runs, slot_bytes, num_slots), pool_(std::move(pool)) {}
  ~CpuTierCopier() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    for (Lane& l : lanes_) l.work.notify_all();
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

  // Starts the lanes' threads. May throw std::system_error.
  void Start() {
    for (int lane = 0; lane < kNumTierLanes; ++lane) {
      threads_[lane] = std::thread([this, lane] { Run(lane); });
    }
  }

  char* pool() const override { return pool_.as<char>(); }

  absl::Status Enqueue(TierLane lane, absl::Span<const TierPair> copies, void*,
                       const TierDeps& after) override {
    if (TakeInjectedFailure()) {
      return absl::InternalError("tier copy failed (injected by a test)");
    }
    if (copies.empty()) return absl::OkStatus();
    const int64_t bytes = static_cast<int64_t>(copies.size()) * slot_bytes();
    Lane& l = lanes_[Index(lane)];
    std::vector<TierPair> batch;
    {
      // A description a finished batch left behind: large batches would
      // otherwise map and fault in fresh pages on every call.
      std::lock_guard<std::mutex> lock(mu_);
      if (!l.spare.empty()) {
        batch = std::move(l.spare.back());
        l.spare.pop_back();
      }
    }
    batch.assign(copies.begin(), copies.end());
    {
      std::lock_guard<std::mutex> lock(mu_);
      l.queue.push_back(Batch{std::move(batch), delay_, bytes, after});
      ++l.enqueued;
      l.enqueued_bytes += bytes;
    }
    l.work.notify_one();  // Only this lane's thread has new work.
    return absl::OkStatus();
  }

  absl::Status WaitOn(TierLane lane, int64_t batch, void*) override {
    std::unique_lock<std::mutex> lock(mu_);
    const Lane& l = lanes_[Index(lane)];
    done_.wait(lock, [&] { return l.done >= batch; });
    return absl::OkStatus();
  }

  absl::Status Synchronize(TierLane lane) override {
    std::unique_lock<std::mutex> lock(mu_);
    const Lane& l = lanes_[Index(lane)];
    done_.wait(lock, [&] { return l.done == l.enqueued; });
    return absl::OkStatus();
  }

  int64_t in_flight(TierLane lane) override {
    std::lock_guard<std::mutex> lock(mu_);
    const Lane& l = lanes_[Index(lane)];
    return l.enqueued - l.done;
  }
  int64_t in_flight_bytes(TierLane lane) override {
    std::lock_guard<std::mutex> lock(mu_);
    const Lane& l = lanes_[Index(lane)];
    return l.enqueued_bytes - l.done_bytes;
  }
  int64_t enqueued(TierLane lane) const override {
    std::lock_guard<std::mutex> lock(mu_);
    return lanes_[Index(lane)].enqueued;
  }
  int64_t completed(TierLane lane) override {
    std::lock_guard<std::mutex> lock(mu_);
    return lanes_[Index(lane)].done;
  }

 private:
  struct Batch {
    std::vector<TierPair> copies;
    absl::Duration delay;
    int64_t bytes = 0;
    TierDeps after;
  };
  struct Lane {
    std::deque<Batch> queue;
    int64_t enqueued = 0;
    int64_t done = 0;
    int64_t enqueued_bytes = 0;
    int64_t done_bytes = 0;
    // Signals the lane's thread: a batch enqueued, another lane's batch
    // done (its front batch may wait for it), or stop_.
    std::condition_variable work;
    // Descriptions of finished batches, for reuse (at most kMaxSpare).
    std::vector<std::vector<TierPair>> spare;
  };
  static constexpr size_t kMaxSpare = 4;
  static int Index(TierLane lane) { return static_cast<int>(lane); }

  // Whether the batches `after` names of lanes other than `lane` are done.
  bool Ready(int lane, const TierDeps& after) const {
    for (int other = 0; other < kNumTierLanes; ++other) {
      if (other != lane && lanes_[other].done < after.batch[other]) {
        return false;
      }
    }
    return true;
  }

  // Copies every run of each pair: pool -> cache (onboard) or cache -> pool.
  void Copy(bool onboard, const std::vector<TierPair>& copies) const {
    char* const pool = pool_.as<char>();
    for (const TierPair& c : copies) {
      for (const TierRun& run : runs()) {
        char* cache = DeviceRunAddress(run, c.device_block);
        char* slot = SlotRunAddress(pool, slot_bytes(), run, c.host_slot);
        std::memcpy(onboard ? cache : slot, onboard ? slot : cache,
                    static_cast<size_t>(run.bytes));
      }
    }
  }

  // Lane `lane`'s thread: runs its batches in order, each once the other
  // lanes' batches it names are done.
  void Run(int lane) {
    Lane& l = lanes_[lane];
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      l.work.wait(lock, [&] {
        return (stop_ && l.queue.empty()) ||
               (!l.queue.empty() && Ready(lane, l.queue.front().after));
      });
      if (l.queue.empty()) return;  // Stopped and drained.
      Batch batch = std::move(l.queue.front());
      l.queue.pop_front();
      lock.unlock();
      if (batch.delay > absl::ZeroDuration()) absl::SleepFor(batch.delay);
      Copy(lane == Index(TierLane::kOnboard), batch.copies);
      lock.lock();
      ++l.done;
      l.done_bytes += batch.bytes;
      if (l.spare.size() < kMaxSpare) {
        l.spare.push_back(std::move(batch.copies));
      }
      done_.notify_all();
      // Another lane's next batch may have been waiting for this one.
      for (int other = 0; other < kNumTierLanes; ++other) {
        if (other != lane && !lanes_[other].queue.empty() &&
            lanes_[other].queue.front().after.batch[lane] == l.done) {
          lanes_[other].work.notify_one();
        }
      }
    }
  }

  Buffer pool_;
  mutable std::mutex mu_;
  // Signals a batch done (WaitOn, Synchronize).
  std::condition_variable done_;
  Lane lanes_[kNumTierLanes];
  bool stop_ = false;
  std::thread threads_[kNumTierLanes];
};

}  // namespace

absl::StatusOr<std::unique_ptr<TierCopier>> CreateCpuTierCopier(
    Device& device, absl::Span<const TierRun> runs, int64_t slot_bytes,
    int32_t num_slots) {
  if (absl::Status s = ValidateTierRuns(runs, slot_bytes, num_slots); !s.ok()) {
    return s;
  }
  const int64_t pool_bytes = slot_bytes * num_slots;
  absl::StatusOr<Buffer> pool =
      device.AllocateStaging(static_cast<size_t>(pool_bytes));
  if (!pool.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "host tier of ", pool_bytes, " bytes: ", pool.status().message()));
  }
  auto copier = std::make_unique<CpuTierCopier>(*std::move(pool), runs,
                                                slot_bytes, num_slots);
  try {
    copier->Start();
    return std::unique_ptr<TierCopier>(std::move(copier));
  } catch (const std::system_error& e) {  // The thread could not start.
    return absl::ResourceExhaustedError(
        absl::StrCat("host tier: could not start its copy thread: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<TierCopier>> CreateTierCopier(
    Device& device, absl::Span<const TierRun> runs, int64_t slot_bytes,
    int32_t num_slots) {
  return device.kind() == DeviceKind::kCuda
             ? CreateCudaTierCopier(device, runs, slot_bytes, num_slots)
             : CreateCpuTierCopier(device, runs, slot_bytes, num_slots);
}

}  // namespace kvcache
