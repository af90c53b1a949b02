#include "tests/tier_copier_check.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "storage/tier_copier.h"

namespace kvcache::testing {
namespace {

// The first offset where a and b differ, or -1.
int64_t FirstDiff(const std::vector<uint8_t>& a, const uint8_t* b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

class Checker {
 public:
  Checker(Device& device, const TierCopierShape& shape, uint64_t seed)
      : device_(device), shape_(shape), rng_(seed) {}

  void Run() {
    ASSERT_NO_FATAL_FAILURE(Build());
    for (int round = 0; round < shape_.rounds; ++round) {
      SCOPED_TRACE(absl::StrCat("round ", round));
      for (int b = 0; b < shape_.batches_per_round; ++b) {
        ASSERT_NO_FATAL_FAILURE(EnqueueRandomBatch());
      }
      ASSERT_NO_FATAL_FAILURE(WaitAndCompare());
    }
    // An injected failure copies nothing and enqueues nothing; an empty
    // batch is no batch.
    copier_->fail_next_for_testing(1);
    const int64_t before = copier_->enqueued(TierLane::kOnboard);
    std::vector<TierPair> pairs = Pairs(/*onboard=*/true);
    const absl::Status failed =
        copier_->Enqueue(TierLane::kOnboard, pairs, nullptr, TierDeps());
    EXPECT_EQ(failed.code(), absl::StatusCode::kInternal) << failed;
    EXPECT_TRUE(
        copier_->Enqueue(TierLane::kOnboard, {}, nullptr, TierDeps()).ok());
    EXPECT_EQ(copier_->enqueued(TierLane::kOnboard), before);
    ASSERT_NO_FATAL_FAILURE(WaitAndCompare());
  }

 private:
  int64_t Rand(int64_t lo, int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }

  // The cache's regions, the runs and the pool, all random bytes.
  void Build() {
    const size_t n = shape_.run_bytes.size();
    region_.resize(n);
    int64_t cache_bytes = 0;
    for (size_t r = 0; r < n; ++r) {
      region_[r] = (cache_bytes + 255) / 256 * 256 + shape_.misalign[r];
      cache_bytes = region_[r] + shape_.num_blocks * shape_.run_bytes[r];
    }
    absl::StatusOr<Buffer> cache = device_.Allocate(cache_bytes);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    ASSERT_EQ(reinterpret_cast<uintptr_t>(cache_.data()) % 256, 0u);
    // The slot holds the runs in a shuffled order.
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng_);
    runs_.resize(n);
    int64_t slot_bytes = 0;
    for (size_t r : order) {
      if (shape_.gaps) slot_bytes += Rand(0, 5);
      runs_[r] = TierRun{cache_.as<char>() + region_[r], shape_.run_bytes[r],
                         slot_bytes};
      slot_bytes += shape_.run_bytes[r];
    }
    if (shape_.gaps) slot_bytes += Rand(1, 5);
    slot_bytes_ = slot_bytes;
    absl::StatusOr<std::unique_ptr<TierCopier>> copier =
        CreateTierCopier(device_, runs_, slot_bytes_, shape_.num_slots);
    ASSERT_TRUE(copier.ok()) << copier.status();
    copier_ = *std::move(copier);
    if (shape_.copy_blocks >= 0) copier_->set_copy_blocks(shape_.copy_blocks);
    if (shape_.staging_blocks >= 1) {
      copier_->set_staging_blocks(shape_.staging_blocks);
    }
    ASSERT_EQ(copier_->slot_bytes(), slot_bytes_);
    ASSERT_EQ(copier_->num_slots(), shape_.num_slots);
    ASSERT_EQ(copier_->pool_bytes(), slot_bytes_ * shape_.num_slots);

    cache_model_.resize(cache_bytes);
    for (uint8_t& x : cache_model_) x = static_cast<uint8_t>(rng_());
    absl::StatusOr<Buffer> staging = device_.AllocateStaging(cache_bytes);
    ASSERT_TRUE(staging.ok()) << staging.status();
    std::memcpy(staging->data(), cache_model_.data(), cache_bytes);
    ASSERT_TRUE(device_
                    .CopyToDeviceAsync(cache_.data(), staging->data(),
                                       cache_bytes, nullptr)
                    .ok());
    ASSERT_TRUE(device_.SynchronizeStream(nullptr).ok());
    pool_model_.resize(copier_->pool_bytes());
    for (uint8_t& x : pool_model_) x = static_cast<uint8_t>(rng_());
    std::memcpy(copier_->pool(), pool_model_.data(), pool_model_.size());
  }

  // Random pairs for one batch: distinct slots for an offload (it writes
  // them), distinct blocks for an onboard.
  std::vector<TierPair> Pairs(bool onboard) {
    std::vector<int32_t> distinct(onboard ? shape_.num_blocks
                                          : shape_.num_slots);
    std::iota(distinct.begin(), distinct.end(), 0);
    std::shuffle(distinct.begin(), distinct.end(), rng_);
    const int64_t n =
        Rand(shape_.min_pairs,
             std::min<int64_t>(shape_.max_pairs,
                               static_cast<int64_t>(distinct.size())));
    std::vector<TierPair> pairs(n);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t other = static_cast<int32_t>(
          Rand(0, (onboard ? shape_.num_slots : shape_.num_blocks) - 1));
      pairs[i] =
          onboard ? TierPair{distinct[i], other} : TierPair{other, distinct[i]};
    }
    if (shape_.sorted_slots) {
      std::sort(pairs.begin(), pairs.end(),
                [](const TierPair& a, const TierPair& b) {
                  return a.host_slot < b.host_slot;
                });
    }
    return pairs;
  }

  // One batch on a random lane, after the other lanes' last batches; the
  // model copies it at once.
  void EnqueueRandomBatch() {
    const TierLane lane = kTierLanes[Rand(0, kNumTierLanes - 1)];
    const bool onboard = lane == TierLane::kOnboard;
    const std::vector<TierPair> pairs = Pairs(onboard);
    TierDeps after;
    for (TierLane other : kTierLanes) {
      after.batch[static_cast<int>(other)] = copier_->enqueued(other);
    }
    // CPU: a delayed batch is still running when later ones are queued, so
    // a batch that ignored its dependencies would read or write too early.
    copier_->set_delay_for_testing(absl::Milliseconds(Rand(0, 1)));
    const int64_t before = copier_->enqueued(lane);
    const absl::Status s = copier_->Enqueue(lane, pairs, nullptr, after);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(copier_->enqueued(lane), before + 1);
    for (const TierPair& c : pairs) {
      for (size_t r = 0; r < runs_.size(); ++r) {
        uint8_t* cache = cache_model_.data() + region_[r] +
                         int64_t{c.device_block} * runs_[r].bytes;
        uint8_t* slot = pool_model_.data() +
                        int64_t{c.host_slot} * slot_bytes_ +
                        runs_[r].slot_offset;
        std::memcpy(onboard ? cache : slot, onboard ? slot : cache,
                    runs_[r].bytes);
      }
    }
  }

  // Waits for every lane's last batch on the null stream and compares.
  void WaitAndCompare() {
    for (TierLane lane : kTierLanes) {
      const absl::Status s =
          copier_->WaitOn(lane, copier_->enqueued(lane), nullptr);
      ASSERT_TRUE(s.ok()) << s;
    }
    ASSERT_TRUE(device_.SynchronizeStream(nullptr).ok());
    std::vector<uint8_t> cache(cache_model_.size());
    ASSERT_TRUE(
        device_.CopyToHost(cache.data(), cache_.data(), cache.size()).ok());
    EXPECT_EQ(FirstDiff(cache_model_, cache.data()), -1)
        << "cache byte differs from the model";
    EXPECT_EQ(FirstDiff(pool_model_,
                        reinterpret_cast<const uint8_t*>(copier_->pool())),
              -1)
        << "pool byte differs from the model (slot_bytes " << slot_bytes_
        << ")";
    for (TierLane lane : kTierLanes) {
      EXPECT_EQ(copier_->in_flight(lane), 0);
      EXPECT_EQ(copier_->in_flight_bytes(lane), 0);
      EXPECT_EQ(copier_->completed(lane), copier_->enqueued(lane));
    }
  }

  Device& device_;
  const TierCopierShape shape_;
  std::mt19937_64 rng_;
  Buffer cache_;
  std::vector<int64_t> region_;  // Offset of each run's region in cache_.
  std::vector<TierRun> runs_;
  int64_t slot_bytes_ = 0;
  std::unique_ptr<TierCopier> copier_;
  std::vector<uint8_t> cache_model_, pool_model_;
};

}  // namespace

std::vector<TierCopierShape> TierCopierShapes() {
  TierCopierShape layers;
  layers.name = "layers";
  for (int layer = 0; layer < 8; ++layer) {
    for (int64_t bytes : {16384, 16384, 512, 512}) {
      layers.run_bytes.push_back(bytes);
      layers.misalign.push_back(0);
    }
  }
  layers.num_blocks = 48;
  layers.num_slots = 40;
  layers.max_pairs = 24;
  layers.batches_per_round = 110;  // More than a CUDA lane's ring.
  layers.rounds = 2;

  TierCopierShape ragged;
  ragged.name = "ragged";
  ragged.run_bytes = {37, 16, 4099, 3, 64, 4096};
  ragged.misalign = {0, 1, 0, 5, 8, 4};
  ragged.gaps = true;
  ragged.num_blocks = 64;
  ragged.num_slots = 50;
  ragged.max_pairs = 40;
  ragged.batches_per_round = 50;
  ragged.rounds = 2;

  TierCopierShape many;
  many.name = "many_pairs";
  many.run_bytes = {48, 16, 96};
  many.misalign = {0, 0, 0};
  many.num_blocks = 9000;
  many.num_slots = 9000;
  many.min_pairs = 8500;
  many.max_pairs = 9000;
  many.batches_per_round = 12;
  many.rounds = 2;
  return {layers, ragged, many};
}

uint64_t TierCopierSeed() {
  const char* env = std::getenv("KVCACHE_TEST_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 10)
                        : std::random_device{}();
}

void CheckTierCopier(Device& device, const TierCopierShape& shape,
                     uint64_t seed) {
  SCOPED_TRACE(absl::StrCat(shape.name, ", seed ", seed));
  Checker(device, shape, seed).Run();
}

}  // namespace kvcache::testing
