// TierMover (api/tier_mover.h) on the CPU backend: the run table Create
// hands the copier, checked by round trips. Random blocks of every layer go
// to random tier slots and come back into other blocks; the cache must then
// hold exactly what CacheBackend::CopyBlocks (copy-on-write, its own address
// math) makes of the same cache for the same (source, destination) pairs:
// every layer's K, V and scale bytes of each source block in its
// destination, and no other byte changed. Dense layouts of several layers
// (int8 and fp8 with side scales: 4 runs a layer; inline scales; a bf16
// K-only cache) and records (layer groups of several shapes: 1 run a layer).
// Offloads and onboards run as two calls, and as one call (the onboards
// after the offloads of their slots). KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/tier_mover.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "allocator/prefix_cache.h"
#include "api/cache_backend.h"
#include "api/kv_cache_config.h"
#include "core/dtype.h"
#include "core/scale_placement.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "storage/tier_copier.h"
#include "testing/test_seed.h"
#include "tests/make_layer_group.h"

namespace kvcache::internal {
namespace {

constexpr int32_t kBlocks = 24;
constexpr int kPairs = 8;

struct Case {
  const char* name;
  KVCacheConfig config;
  bool records;  // Every layer in records (one run a block).
};

KVCacheConfig Dense(DType dtype, ScalePlacement placement, int32_t dv) {
  KVCacheConfig c;
  c.num_layers = 3;
  c.num_kv_heads = 2;
  c.head_size = 16;
  c.head_size_v = dv;
  c.block_size = 4;
  c.cache_dtype = dtype;
  c.scale_placement = placement;
  c.input_dtype = DType::kBFloat16;
  c.num_blocks = kBlocks;
  c.cpu_threads = 1;
  return c;
}

// Groups of different shapes (heads, head sizes, a K-only fp8 group).
KVCacheConfig Records() {
  KVCacheConfig c;
  c.num_layers = 6;
  c.num_kv_heads = 0;
  c.head_size = 0;
  c.head_size_v = 0;
  c.num_q_heads = 0;
  c.block_size = 4;
  c.num_blocks = kBlocks;
  c.input_dtype = DType::kBFloat16;
  c.cpu_threads = 1;
  c.layer_groups = {MakeGroup({0, 1, 2, 4}, 16, 2, 32, 32, DType::kInt8),
                    MakeGroup({3, 5}, 0, 1, 64, 0, DType::kFp8E4M3)};
  return c;
}

std::vector<Case> Cases() {
  return {
      {"int8_side", Dense(DType::kInt8, ScalePlacement::kSide, 8), false},
      {"fp8_side", Dense(DType::kFp8E4M3, ScalePlacement::kSide, 16), false},
      {"int8_inline", Dense(DType::kInt8, ScalePlacement::kInline, 8), false},
      {"bf16_k_only", Dense(DType::kBFloat16, ScalePlacement::kSide, 0), false},
      {"records", Records(), true},
  };
}

// Every allocation of the backend's storage, copied out or written back.
std::vector<std::vector<uint8_t>> Snapshot(const CacheBackend& backend) {
  std::vector<std::vector<uint8_t>> out;
  for (int i = 0; i < backend.storage().num_allocations(); ++i) {
    const auto* p =
        static_cast<const uint8_t*>(backend.storage().allocation(i).key_cache);
    out.emplace_back(p, p + backend.storage().allocation_bytes(i));
  }
  return out;
}
void Restore(const CacheBackend& backend,
             const std::vector<std::vector<uint8_t>>& bytes) {
  for (int i = 0; i < backend.storage().num_allocations(); ++i) {
    std::memcpy(backend.storage().allocation(i).key_cache, bytes[i].data(),
                bytes[i].size());
  }
}

class TierMoverTest : public ::testing::TestWithParam<bool> {};

TEST_P(TierMoverTest, RoundTripMatchesCopyOnWrite) {
  const bool one_call = GetParam();
  const uint64_t seed = kvcache::testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed,
                            " (rerun with KVCACHE_TEST_SEED=", seed, ")"));
  std::mt19937_64 rng(seed);
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    ASSERT_TRUE(ValidateConfig(c.config).ok()) << ValidateConfig(c.config);
    absl::StatusOr<std::unique_ptr<CacheBackend>> b =
        CacheBackend::Create(c.config, CreateCpuDevice());
    ASSERT_TRUE(b.ok()) << b.status();
    const CacheBackend& backend = **b;
    for (int l = 0; l < backend.num_layers(); ++l) {
      ASSERT_EQ(backend.layer(l).layout.records(), c.records) << "layer " << l;
    }
    absl::StatusOr<std::unique_ptr<TierMover>> m =
        TierMover::Create(backend, int64_t{1} << 22);
    ASSERT_TRUE(m.ok()) << m.status();
    TierMover& mover = **m;
    ASSERT_GE(mover.num_slots(), kPairs);
    if (!c.records) {  // A slot is one block of every layer.
      EXPECT_EQ(mover.slot_bytes(), *BlockBytesAllLayers(c.config));
    }

    // Random bytes everywhere; kPairs distinct sources, kPairs distinct
    // destinations among the other blocks, kPairs distinct slots.
    std::vector<std::vector<uint8_t>> before = Snapshot(backend);
    for (std::vector<uint8_t>& a : before) {
      for (uint8_t& x : a) x = static_cast<uint8_t>(rng());
    }
    Restore(backend, before);
    std::vector<int32_t> blocks(kBlocks), slots(mover.num_slots());
    std::iota(blocks.begin(), blocks.end(), 0);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    std::shuffle(slots.begin(), slots.end(), rng);
    std::vector<TierCopy> offloads, onboards;
    std::vector<int64_t> pairs;  // (source, destination) for CopyBlocks.
    for (int i = 0; i < kPairs; ++i) {
      const int32_t src = blocks[i], dst = blocks[kPairs + i];
      offloads.push_back(TierCopy{src, slots[i], false, rng() % 2 == 0});
      onboards.push_back(TierCopy{dst, slots[i], true, true});
      pairs.push_back(src);
      pairs.push_back(dst);
    }

    TierMover::Batches queued;
    if (one_call) {
      std::vector<TierCopy> all = offloads;
      all.insert(all.end(), onboards.begin(), onboards.end());
      mover.copier().set_delay_for_testing(absl::Milliseconds(2));
      ASSERT_TRUE(mover.Run(all, nullptr, &queued).ok());
      EXPECT_GT(queued.onboard, 0);
    } else {
      ASSERT_TRUE(mover.Run(offloads, nullptr, &queued).ok());
      ASSERT_TRUE(mover.copier().Synchronize().ok());
      ASSERT_TRUE(mover.Run(onboards, nullptr, &queued).ok());
    }
    ASSERT_TRUE(mover.copier().Synchronize().ok());
    EXPECT_EQ(mover.offload_bytes(), kPairs * mover.slot_bytes());
    EXPECT_EQ(mover.onboard_bytes(), kPairs * mover.slot_bytes());
    EXPECT_EQ(mover.copier().in_flight_bytes(), 0);
    const std::vector<std::vector<uint8_t>> moved = Snapshot(backend);

    // The reference: copy-on-write of the same pairs on the same bytes.
    Restore(backend, before);
    ASSERT_TRUE(backend.CopyBlocks(pairs.data(), kPairs, nullptr).ok());
    const std::vector<std::vector<uint8_t>> expected = Snapshot(backend);
    ASSERT_EQ(moved.size(), expected.size());
    for (size_t a = 0; a < moved.size(); ++a) {
      const auto diff =
          std::mismatch(moved[a].begin(), moved[a].end(), expected[a].begin());
      EXPECT_TRUE(diff.first == moved[a].end())
          << "allocation " << a << " differs at byte "
          << (diff.first - moved[a].begin());
      EXPECT_NE(moved[a], before[a]) << "allocation " << a << ": no copy";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Calls, TierMoverTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "OneCall" : "TwoCalls";
                         });

}  // namespace
}  // namespace kvcache::internal
