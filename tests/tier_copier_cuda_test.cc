// The host tier's copy queue on CUDA (storage/cuda_tier_copier.cu): every
// shape of tests/tier_copier_check.h against its byte-level model, the copy
// kernel reading the pairs from pinned memory and the run table from device
// memory (16-byte and byte paths, ring reuse, a pair buffer that grows).
// Skipped without a GPU. KVCACHE_TEST_SEED=<n> reruns one seed.

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/cuda_test_util.h"
#include "tests/tier_copier_check.h"

namespace kvcache {
namespace {

TEST(CudaTierCopierTest, BatchesMatchTheModel) {
  KVCACHE_SKIP_WITHOUT_GPU();
  absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
  ASSERT_TRUE(device.ok()) << device.status();
  for (const testing::TierCopierShape& shape : testing::TierCopierShapes()) {
    testing::CheckTierCopier(**device, shape, testing::TierCopierSeed());
  }
}

// The same shapes with one thread block per copy kernel (the grid strides
// over every pair and run) and by the copy engines (whole slots through a
// staging buffer): with the default staging (every batch of these shapes in
// one chunk), and with a 3-slot staging buffer and pairs in slot order
// (batches in chunks, neighbouring slots merged into one descriptor).
TEST(CudaTierCopierTest, OneBlockAndCopyEnginesMatchTheModel) {
  KVCACHE_SKIP_WITHOUT_GPU();
  absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
  ASSERT_TRUE(device.ok()) << device.status();
  struct Mode {
    const char* name;
    int copy_blocks;
    int64_t staging_blocks;
    bool sorted_slots;
  };
  for (const Mode& mode : {Mode{"one thread block", 1, -1, false},
                           Mode{"copy engines", 0, -1, false},
                           Mode{"copy engines, 3-slot staging", 0, 3, true}}) {
    SCOPED_TRACE(mode.name);
    for (testing::TierCopierShape shape : testing::TierCopierShapes()) {
      shape.copy_blocks = mode.copy_blocks;
      shape.staging_blocks = mode.staging_blocks;
      shape.sorted_slots = mode.sorted_slots;
      testing::CheckTierCopier(**device, shape, testing::TierCopierSeed());
    }
  }
}

// A pool of 300 MiB: from 256 MiB up the CUDA device pins staging memory by
// registering a mapping (storage/cuda_device.cc), which the copy kernel must
// reach through the same pointers.
TEST(CudaTierCopierTest, RegisteredPoolMatchesTheModel) {
  KVCACHE_SKIP_WITHOUT_GPU();
  absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
  ASSERT_TRUE(device.ok()) << device.status();
  testing::TierCopierShape large;
  large.name = "registered_pool";
  large.run_bytes = {512 << 10, 4096, 512 << 10};
  large.misalign = {0, 0, 0};
  large.num_blocks = 64;
  large.num_slots = 290;  // 290 x 1028 KiB: 291 MiB.
  large.max_pairs = 16;
  large.batches_per_round = 40;
  large.rounds = 2;
  testing::CheckTierCopier(**device, large, testing::TierCopierSeed());
}

}  // namespace
}  // namespace kvcache
