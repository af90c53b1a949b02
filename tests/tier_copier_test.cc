// The host tier's copy queue on the CPU backend (storage/tier_copier.h):
// every shape of tests/tier_copier_check.h against its byte-level model
// (batches of (block, slot) pairs on three lanes, ordered by TierDeps, some
// delayed), and a bad run table refused by name before anything is
// allocated, and the copy-engine path's staged copies on host memory.
// KVCACHE_TEST_SEED=<n> reruns one seed.

#include "storage/tier_copier.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "tests/tier_copier_check.h"

namespace kvcache {
namespace {

TEST(CpuTierCopierTest, BatchesMatchTheModel) {
  std::unique_ptr<Device> device = CreateCpuDevice();
  for (const testing::TierCopierShape& shape : testing::TierCopierShapes()) {
    testing::CheckTierCopier(*device, shape, testing::TierCopierSeed());
  }
}

// The copy-engine path's copies (storage/tier_copier.h: SlotSegments,
// AppendStagedCopies), on host memory: random runs with random gaps in a
// shuffled slot order, random batches (some in slot order): applying the
// copies from a staging buffer of images must change exactly the runs'
// bytes of each pair's slot, as the byte-level model does; and when the runs
// tile the slot, a batch put in slot order (SortBySlot) is one copy per
// stretch of neighbouring slots, whatever order it was drawn in.
TEST(TierStagingTest, StagedCopiesMoveExactlyTheRunsBytes) {
  const uint64_t seed = testing::TierCopierSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  auto rand = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  char device;  // The runs' device pointers are not used here.
  for (int round = 0; round < 200; ++round) {
    const bool gaps = round % 4 != 0;
    const int n = static_cast<int>(rand(1, 8));
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<TierRun> runs(n);
    int64_t slot_bytes = 0;
    for (int r : order) {
      if (gaps) slot_bytes += rand(0, 5);
      runs[r] = TierRun{&device, rand(1, 40), slot_bytes};
      slot_bytes += runs[r].bytes;
    }
    if (gaps) slot_bytes += rand(0, 5);
    ASSERT_TRUE(ValidateTierRuns(runs, slot_bytes, 1).ok());
    const std::vector<SlotSegment> segments = SlotSegments(runs);
    if (!gaps) {
      ASSERT_EQ(segments.size(), 1u);
      EXPECT_EQ(segments[0].offset, 0);
      EXPECT_EQ(segments[0].bytes, slot_bytes);
    }
    const int32_t num_slots = static_cast<int32_t>(rand(1, 12));
    std::vector<int32_t> slots(num_slots);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    const bool sorted = round % 2 == 0;
    std::vector<TierPair> copies(rand(1, num_slots));
    for (size_t i = 0; i < copies.size(); ++i) {
      copies[i] = TierPair{0, slots[i]};
    }
    if (sorted) {
      SortBySlot(absl::MakeSpan(copies));
      for (size_t i = 1; i < copies.size(); ++i) {
        ASSERT_LT(copies[i - 1].host_slot, copies[i].host_slot);
      }
    }
    std::vector<char> staging(copies.size() * slot_bytes);
    std::vector<char> pool(num_slots * slot_bytes);
    for (char& c : staging) c = static_cast<char>(rng());
    for (char& c : pool) c = static_cast<char>(rng());
    std::vector<char> model = pool;
    for (size_t i = 0; i < copies.size(); ++i) {
      for (const TierRun& r : runs) {
        std::memcpy(&model[copies[i].host_slot * slot_bytes + r.slot_offset],
                    &staging[i * slot_bytes + r.slot_offset], r.bytes);
      }
    }
    std::vector<StagedCopy> out;
    AppendStagedCopies(segments, copies, staging.data(), pool.data(),
                       slot_bytes, out);
    for (const StagedCopy& c : out) std::memcpy(c.pool, c.staging, c.bytes);
    ASSERT_EQ(pool, model) << "round " << round;
    // Runs tiling the slot, the batch in slot order: one copy per stretch
    // of neighbouring slots in the batch (a slot whose predecessor is not in
    // it starts one).
    if (!gaps && sorted) {
      size_t stretches = 0;
      for (const TierPair& c : copies) {
        stretches += std::none_of(
            copies.begin(), copies.end(),
            [&](const TierPair& o) { return o.host_slot == c.host_slot - 1; });
      }
      EXPECT_EQ(out.size(), stretches) << "round " << round;
    }
  }
}

// InvalidArgument from CreateTierCopier, its message holding `what`.
void ExpectRefused(const std::vector<TierRun>& runs, int64_t slot_bytes,
                   int32_t num_slots, const std::string& what) {
  std::unique_ptr<Device> device = CreateCpuDevice();
  absl::StatusOr<std::unique_ptr<TierCopier>> copier =
      CreateTierCopier(*device, runs, slot_bytes, num_slots);
  ASSERT_FALSE(copier.ok()) << what;
  EXPECT_EQ(copier.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(copier.status().message().find(what), std::string::npos)
      << copier.status();
}

TEST(CpuTierCopierTest, BadRunTablesAreRefusedByName) {
  char cache[256];
  ExpectRefused({}, 64, 4, "none");
  ExpectRefused({{cache, 32, 0}}, 0, 4, "slot_bytes 0");
  ExpectRefused({{cache, 32, 0}}, 64, 0, "num_slots 0");
  ExpectRefused({{cache, 32, 0}}, int64_t{1} << 40, 1 << 24, "num_slots");
  ExpectRefused({{nullptr, 32, 0}}, 64, 4, "device null");
  ExpectRefused({{cache, 0, 0}}, 64, 4, "bytes 0");
  ExpectRefused({{cache, 32, 0}, {cache, 16, -1}}, 64, 4, "slot_offset -1");
  ExpectRefused({{cache, 32, 0}, {cache, 16, 49}}, 64, 4, "slot_offset 49");
  ExpectRefused({{cache, 32, 30}, {cache, 16, 24}}, 64, 4,
                "overlap in the slot: [24, 40) and one at slot_offset 30");
  ExpectRefused({{cache, 32, 0}, {cache, 16, 31}}, 64, 4,
                "overlap in the slot: [0, 32) and one at slot_offset 31");
  // Touching runs and unused bytes are fine.
  std::unique_ptr<Device> device = CreateCpuDevice();
  EXPECT_TRUE(
      CreateTierCopier(*device, {{cache, 32, 0}, {cache, 16, 32}}, 64, 4).ok());
}

}  // namespace
}  // namespace kvcache
