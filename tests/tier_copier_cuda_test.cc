// The host tier's copy queue on CUDA (storage/cuda_tier_copier.cu): every
// shape of tests/tier_copier_check.h against its byte-level model, the copy
// kernel reading the pairs from pinned memory and the run table from device
// memory (16-byte and byte paths, ring reuse, a pair buffer that grows).
// Skipped without a GPU. KVCACHE_TEST_SEED=<n> reruns one seed.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/cuda_test_util.h"
#include "tests/tier_copier_check.h"

namespace kvcache {
namespace {

uint64_t Seed() {
  const char* env = std::getenv("KVCACHE_TEST_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 10)
                        : std::random_device{}();
}

TEST(CudaTierCopierTest, BatchesMatchTheModel) {
  KVCACHE_SKIP_WITHOUT_GPU();
  absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
  ASSERT_TRUE(device.ok()) << device.status();
  for (const testing::TierCopierShape& shape : testing::TierCopierShapes()) {
    testing::CheckTierCopier(**device, shape, Seed());
  }
}

}  // namespace
}  // namespace kvcache
