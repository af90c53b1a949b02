#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "testing/cuda_test_util.h"
#include "tests/cuda_smoke_kernel.h"

namespace kvcache {
namespace {

TEST(CudaSmokeTest, KernelAddsOneToEveryElement) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> dist(-1000000, 1000000);
  std::vector<int> values(100003);
  for (int& v : values) v = dist(rng);
  std::vector<int> expected = values;
  for (int& v : expected) v += 1;
  ASSERT_TRUE(testing::AddOneOnDevice(values).ok());
  EXPECT_EQ(values, expected);
}

TEST(CudaSmokeTest, DeviceCountIsAnAnswerNotACrash) {
  absl::StatusOr<int> count = CudaDeviceCount();
  if (BuiltWithCuda()) {
    ASSERT_TRUE(count.ok()) << count.status();
    EXPECT_GE(*count, 0);
  } else {
    EXPECT_EQ(count.status().code(), absl::StatusCode::kFailedPrecondition);
  }
}

}  // namespace
}  // namespace kvcache
