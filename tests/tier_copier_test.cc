// The host tier's copy queue on the CPU backend (storage/tier_copier.h):
// every shape of tests/tier_copier_check.h against its byte-level model
// (batches of (block, slot) pairs on three lanes, ordered by TierDeps, some
// delayed), and a bad run table refused by name before anything is
// allocated. KVCACHE_TEST_SEED=<n> reruns one seed.

#include "storage/tier_copier.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
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
