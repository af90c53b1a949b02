// KVCacheConfig::cpu_threads: out-of-range values are rejected by name, and
// managers with 1 thread, 3 threads and the default (hardware concurrency)
// append and gather a prompt large enough to be split over the pool with the
// same bytes.

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "api/kv_cache_config.h"
#include "api/kv_cache_manager.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/float_convert.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

KVCacheConfig Config(int32_t threads) {
  KVCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 8;
  c.head_size = 128;
  c.block_size = 16;
  c.num_blocks = 80;
  c.cpu_threads = threads;
  return c;
}

TEST(CpuThreadsConfigTest, RejectsOutOfRangeByName) {
  for (int32_t bad : {-1, kMaxCpuThreads + 1}) {
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(Config(bad));
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(m.status().message()),
                HasSubstr("cpu_threads " + std::to_string(bad)));
  }
}

// Appends a 1024-token prompt (1024 x 8 x 256 elements, above the split
// threshold) and gathers it back as float32.
std::vector<float> AppendAndGather(int32_t threads) {
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
      KVCacheManager::Create(Config(threads));
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return {};
  KVCacheManager& manager = **m;
  constexpr int64_t kTokens = 1024;
  const std::vector<int32_t> prompt(kTokens, 5);
  EXPECT_TRUE(manager.AddSequence(1, prompt).ok());
  absl::StatusOr<StepPlanInfo> plan = manager.Reserve({{1, {}, kTokens}});
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return {};
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> kv(2 * kTokens * 8 * 128);
  for (uint16_t& x : kv) x = internal::PortableFloatToBFloat16(normal(rng));
  const TensorView key =
      TensorView::Contiguous(kv.data(), DType::kBFloat16, {kTokens, 8, 128});
  const TensorView value = TensorView::Contiguous(
      kv.data() + kv.size() / 2, DType::kBFloat16, {kTokens, 8, 128});
  EXPECT_TRUE(manager.Append(plan->id, 0, key, value).ok());
  EXPECT_TRUE(manager.Commit(plan->id).ok());
  std::vector<float> out(kv.size());
  const TensorView key_out =
      TensorView::Contiguous(out.data(), DType::kFloat32, {kTokens, 8, 128});
  const TensorView value_out = TensorView::Contiguous(
      out.data() + out.size() / 2, DType::kFloat32, {kTokens, 8, 128});
  EXPECT_TRUE(manager.Gather(1, 0, 0, kTokens, key_out, value_out).ok());
  return out;
}

TEST(CpuThreadsConfigTest, EveryThreadCountGivesTheSameBytes) {
  const std::vector<float> one = AppendAndGather(1);
  ASSERT_FALSE(one.empty());
  EXPECT_EQ(AppendAndGather(3), one);
  EXPECT_EQ(AppendAndGather(0), one);
}

}  // namespace
}  // namespace kvcache
