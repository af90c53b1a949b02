// Regression tests of issue #12 (hostile use of the C++ API on the CPU
// backend): each test reproduces one finding, which crashed, read out of
// bounds, leaked another tenant's data or changed the manager on failure
// before the fix. The C API's findings are in kvcache_c_hardening_test.c, the
// cross-tenant property test in tenant_isolation_test.cc.

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "dlpack/dlpack.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/kv_reference.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

KVCacheConfig SmallConfig() {
  KVCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_size = 16;
  c.head_size_v = 8;
  c.block_size = 4;
  c.cache_dtype = DType::kInt8;
  c.input_dtype = DType::kBFloat16;
  c.num_blocks = 16;
  return c;
}

// ---- Item 1: config limits -------------------------------------------------

TEST(ConfigLimitsTest, TheWrappingShapeIsRejected) {
  // The reproducer: one block's int64 size wrapped to 0 and Create divided by
  // it (SIGFPE); with num_blocks = 1 it made a 0-byte cache.
  KVCacheConfig c = SmallConfig();
  c.num_kv_heads = 1 << 27;
  c.head_size = 1024;
  c.head_size_v = 0;
  c.block_size = 1 << 27;
  c.cache_dtype = c.input_dtype = DType::kBFloat16;
  c.num_blocks = 0;
  c.memory_budget_bytes = int64_t{1} << 30;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(m.status().message()),
              HasSubstr("num_kv_heads 134217728 exceeds 1024"));
  c.memory_budget_bytes = 0;
  c.num_blocks = 1;
  m = KVCacheManager::Create(c);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigLimitsTest, EachLimitIsNamedWithItsValue) {
  struct Case {
    std::function<void(KVCacheConfig&)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](KVCacheConfig& c) { c.num_layers = kMaxNumLayers + 1; },
       "num_layers 1025 exceeds 1024"},
      {[](KVCacheConfig& c) { c.num_kv_heads = kMaxNumKvHeads + 1; },
       "num_kv_heads 1025 exceeds 1024"},
      {[](KVCacheConfig& c) { c.block_size = kMaxBlockSize + 1; },
       "block_size 2049 exceeds 2048"},
      {[](KVCacheConfig& c) { c.head_size = 1032; },
       "head_size 1032 is not in [8, 1024]"},
      {[](KVCacheConfig& c) { c.max_tokens_per_step = INT32_MAX; },
       "max_tokens_per_step 2147483647 exceeds 1048576"},
      {[](KVCacheConfig& c) { c.max_sequences_per_step = INT32_MAX; },
       "max_sequences_per_step 2147483647 exceeds 65536"},
      {[](KVCacheConfig& c) { c.max_blocks_per_sequence = INT32_MAX; },
       "max_blocks_per_sequence 2147483647 exceeds 1048576"},
      {[](KVCacheConfig& c) {
         c.max_blocks_per_sequence = 1 << 20;
         c.block_size = 2048;
       },
       "exceeds 2147483647 tokens"},
      {[](KVCacheConfig& c) { c.max_inflight_plans = 1000; },
       "max_inflight_plans 1000 exceeds 64"},
      {[](KVCacheConfig& c) {
         // 1024 layers x 2048 tokens x 1024 heads x 2048 elements: 2^42
         // bytes per block (and scales), so 2^15 blocks exceed 2^56.
         c.num_layers = 1024;
         c.block_size = 2048;
         c.num_kv_heads = 1024;
         c.head_size = c.head_size_v = 1024;
         c.cache_dtype = DType::kInt8;
         c.num_blocks = 1 << 15;
       },
       "num_blocks 32768 x 4415226380288 bytes per block"},
  };
  for (const Case& bad : cases) {
    KVCacheConfig config = SmallConfig();
    bad.change(config);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument)
        << bad.message << ": " << m.status();
    EXPECT_THAT(std::string(m.status().message()), HasSubstr(bad.message));
  }
}

TEST(ConfigLimitsTest, TheLimitsThemselvesAreAccepted) {
  KVCacheConfig c = SmallConfig();
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.block_size = kMaxBlockSize;
  c.num_blocks = 2;
  EXPECT_TRUE(KVCacheManager::Create(c).ok());
  c = SmallConfig();
  c.num_kv_heads = kMaxNumKvHeads;
  c.head_size = c.head_size_v = 8;
  c.block_size = 1;
  c.num_blocks = 2;
  EXPECT_TRUE(KVCacheManager::Create(c).ok());
}

}  // namespace
}  // namespace kvcache
