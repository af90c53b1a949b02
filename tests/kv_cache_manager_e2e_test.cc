// End to end on the CPU backend: random sequences with shared prefixes, chunked
// prefill, decode, forks (copy-on-write) and frees, every layer appended;
// Gather must equal the reference quantization of exactly what was appended,
// token by token, in every layer; with side and with inline scales.

#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/manager_driver.h"

namespace kvcache {
namespace {

struct Case {
  DType cache_dtype;
  int head_size;
  int head_size_v;
  int block_size;
  ScalePlacement placement = ScalePlacement::kSide;
  int host_tier_blocks = 0;  // 0: no host tier.
};

class ManagerEndToEndTest : public ::testing::TestWithParam<Case> {};

TEST_P(ManagerEndToEndTest, GatherEqualsReferenceOfWhatWasAppended) {
  const Case c = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  KVCacheConfig config;
  config.num_layers = 3;
  config.num_kv_heads = 2;
  config.head_size = c.head_size;
  config.head_size_v = c.head_size_v;
  config.block_size = c.block_size;
  config.cache_dtype = c.cache_dtype;
  config.scale_placement = c.placement;
  config.input_dtype = DType::kBFloat16;
  config.num_blocks = 48;
  config.host_tier_bytes = c.host_tier_blocks * *BlockBytesAllLayers(config);
  absl::StatusOr<std::unique_ptr<testing::ManagerDriver>> driver =
      testing::ManagerDriver::Create(config, seed, seed + 1);
  ASSERT_TRUE(driver.ok()) << driver.status();
  const int ops = c.host_tier_blocks > 0 ? 1200 : 400;
  for (int op = 0; op < ops; ++op) {
    absl::Status s = (*driver)->RandomOp();
    ASSERT_TRUE(s.ok()) << "op " << op << ": " << s;
    if (op % 50 == 49) {
      absl::Status verified = (*driver)->VerifyAll();
      ASSERT_TRUE(verified.ok()) << "after op " << op << ": " << verified;
    }
  }
  absl::Status verified = (*driver)->VerifyAll();
  ASSERT_TRUE(verified.ok()) << verified;
  ASSERT_TRUE((*driver)->manager().Validate().ok());
  // The run must have exercised what it claims to test.
  const auto& counts = (*driver)->counts();
  EXPECT_GT(counts.steps, 50);
  EXPECT_GT(counts.forks, 5);
  EXPECT_GT(counts.prefix_hit_tokens, 0) << "no prefix-cache hit exercised";
  if (c.block_size > 1) {  // With one-token blocks no block is ever partial.
    EXPECT_GT(counts.block_copies, 0) << "no copy-on-write exercised";
  }
  const MetricsSnapshot m = (*driver)->manager().Metrics();
  EXPECT_EQ(m.prefix_hit_tokens, counts.prefix_hit_tokens);
  EXPECT_EQ(m.block_copies, counts.block_copies);
  EXPECT_EQ(m.blocks_free + m.blocks_cached + m.blocks_in_use, m.blocks_total);
  if (c.host_tier_blocks > 0) {  // The tier served hits, read back above.
    EXPECT_GT(m.tier_offloads, 0);
    EXPECT_GT(m.prefix_hit_tokens_host, 0) << "no host-tier hit exercised";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, ManagerEndToEndTest,
    ::testing::Values(
        Case{DType::kInt8, 16, 16, 4}, Case{DType::kFp8E4M3, 16, 16, 4},
        Case{DType::kInt8, 24, 8, 3}, Case{DType::kBFloat16, 8, 16, 5},
        Case{DType::kFp8E4M3, 64, 32, 1},
        // Inline scales.
        Case{DType::kInt8, 16, 16, 4, ScalePlacement::kInline},
        Case{DType::kFp8E4M3, 16, 16, 4, ScalePlacement::kInline},
        Case{DType::kInt8, 24, 8, 3, ScalePlacement::kInline},
        Case{DType::kFp8E4M3, 64, 32, 1, ScalePlacement::kInline},
        // A host tier.
        Case{DType::kInt8, 16, 16, 4, ScalePlacement::kSide, 24},
        Case{DType::kBFloat16, 8, 16, 5, ScalePlacement::kSide, 8},
        Case{DType::kFp8E4M3, 64, 32, 1, ScalePlacement::kSide, 64},
        Case{DType::kInt8, 24, 8, 3, ScalePlacement::kInline, 24},
        Case{DType::kFp8E4M3, 16, 16, 4, ScalePlacement::kInline, 64}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return absl::StrCat(
          DTypeName(info.param.cache_dtype), "_D", info.param.head_size, "_Dv",
          info.param.head_size_v, "_bs", info.param.block_size, "_",
          ScalePlacementName(info.param.placement),
          info.param.host_tier_blocks > 0
              ? absl::StrCat("_tier", info.param.host_tier_blocks)
              : "");
    });

}  // namespace
}  // namespace kvcache
