// KVCacheManager::Attention on the CPU backend (tests/attention_manager_
// scenario.h: shared prefix blocks, a fork with copy-on-write, 1 to 8 query
// tokens, window and soft-cap; side and inline scales) against the float64
// reference, and its argument checks.

#include <cstdlib>
#include <cstring>

#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "tests/attention_manager_scenario.h"

namespace kvcache::testing {
namespace {

MemOps HostOps() {
  MemOps ops;
  ops.alloc = [](size_t n) { return std::malloc(n); };
  ops.release = [](void* p) { std::free(p); };
  ops.to_backend = [](void* d, const void* s, size_t n) {
    std::memcpy(d, s, n);
  };
  ops.to_host = [](void* d, const void* s, size_t n) { std::memcpy(d, s, n); };
  return ops;
}

TEST(AttentionManagerTest, SharedPrefixAndForkInt8) {
  RunAttentionManagerScenario(DType::kInt8, HostOps());
}
TEST(AttentionManagerTest, SharedPrefixAndForkFp8) {
  RunAttentionManagerScenario(DType::kFp8E4M3, HostOps());
}
TEST(AttentionManagerTest, SharedPrefixAndForkInt8InlineScales) {
  RunAttentionManagerScenario(DType::kInt8, HostOps(), ScalePlacement::kInline);
}
TEST(AttentionManagerTest, SharedPrefixAndForkFp8InlineScales) {
  RunAttentionManagerScenario(DType::kFp8E4M3, HostOps(),
                              ScalePlacement::kInline);
}
TEST(AttentionManagerTest, SharedPrefixAndForkBf16) {
  RunAttentionManagerScenario(DType::kBFloat16, HostOps());
}

TEST(AttentionManagerTest, RefusesBadCalls) {
  KVCacheConfig config;
  config.num_layers = 1;
  config.num_kv_heads = 2;
  config.head_size = 64;
  config.num_blocks = 8;
  auto no_attention = KVCacheManager::Create(config);
  ASSERT_TRUE(no_attention.ok());
  std::vector<uint16_t> q(8 * 64), o(q.size());
  const TensorView qv =
      TensorView::Contiguous(q.data(), DType::kBFloat16, {1, 8, 64});
  const TensorView ov =
      TensorView::Contiguous(o.data(), DType::kBFloat16, {1, 8, 64});
  AttentionOptions options;
  options.softmax_scale = 0.125f;
  EXPECT_TRUE(absl::IsFailedPrecondition(
      (*no_attention)->Attention({1}, 0, qv, ov, options)));
  config.num_q_heads = 6;  // Not a multiple of 2 heads... it is; 3 per head.
  EXPECT_TRUE(KVCacheManager::Create(config).ok());
  config.num_q_heads = 7;
  EXPECT_TRUE(absl::IsInvalidArgument(KVCacheManager::Create(config).status()));
  config.num_q_heads = 8;
  auto m = KVCacheManager::Create(config);
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(absl::IsNotFound((*m)->Attention({1}, 0, qv, ov, options)));
  ASSERT_TRUE((*m)->AddSequence(1, {1, 2, 3}).ok());
  EXPECT_TRUE(
      absl::IsInvalidArgument((*m)->Attention({1}, 1, qv, ov, options)));
  options.num_query_tokens_per_sequence = 9;
  EXPECT_TRUE(
      absl::IsInvalidArgument((*m)->Attention({1}, 0, qv, ov, options)));
  options.num_query_tokens_per_sequence = 2;  // q has 1 row, needs 2.
  EXPECT_TRUE(
      absl::IsInvalidArgument((*m)->Attention({1}, 0, qv, ov, options)));
  options.num_query_tokens_per_sequence = 1;
  options.softmax_scale = 0;
  EXPECT_TRUE(
      absl::IsInvalidArgument((*m)->Attention({1}, 0, qv, ov, options)));
  options.softmax_scale = 0.125f;
  // No committed token yet: the row attends nothing and is zero.
  o.assign(o.size(), 0x7FC1);
  ASSERT_TRUE((*m)->Attention({1}, 0, qv, ov, options).ok());
  for (uint16_t x : o) ASSERT_EQ(x, 0);
}

}  // namespace
}  // namespace kvcache::testing
