// The CUDA attention launch policy (kernels/attention_policy.h) on the shapes
// it was built from (H200: 132 multiprocessors; 8 KV heads, GQA 4, one query
// token) and around them: the heads per block and kernel instantiation each
// variant picks, the fallbacks when heads do not divide the KV heads or no
// 4-blocks kernel exists, how each variant copies K rows, and row tiles for
// wider GQA groups and more query tokens. Expected values are written out
// from the rules, not computed.

#include "kernels/attention_policy.h"

#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention_params.h"

namespace kvcache::testing {
namespace {

using internal::AttentionKernelChoice;
using internal::ChooseAttentionKernel;

constexpr int kH200Sms = 132;

AttentionParams Params(DType cache, int32_t seqs, int64_t kv_heads = 8,
                       int32_t group = 4, int32_t query_tokens = 1,
                       int32_t variant = 0) {
  AttentionParams p;
  p.cache.layout.cache_dtype = cache;
  p.cache.layout.num_heads = kv_heads;
  p.cache.layout.head_size = 128;
  p.cache.layout.head_size_v = 128;
  p.num_q_heads = static_cast<int32_t>(kv_heads) * group;
  p.num_seqs = seqs;
  p.max_query_tokens = query_tokens;
  p.variant = variant;
  return p;
}

struct Expect {
  DType cache;
  int32_t seqs;
  int heads, blocks_per_sm;
};

std::string Name(DType cache, int32_t seqs) {
  return std::string(DTypeName(cache)) + " x" + std::to_string(seqs);
}

TEST(AttentionPolicyTest, BenchmarkShapesGetTheMeasuredBest) {
  // 64 x 8k, 8 x 64k, 256 x 1k: base grids of 128, 16 and 512 blocks.
  const Expect cases[] = {
      {DType::kInt8, 64, 1, 4},      {DType::kInt8, 8, 1, 4},
      {DType::kInt8, 256, 4, 4},     {DType::kFp8E4M3, 64, 4, 3},
      {DType::kFp8E4M3, 8, 1, 3},    {DType::kFp8E4M3, 256, 4, 4},
      {DType::kBFloat16, 64, 2, 3},  {DType::kBFloat16, 8, 1, 3},
      {DType::kBFloat16, 256, 1, 3}, {DType::kFloat16, 64, 2, 3},
      {DType::kFloat16, 8, 1, 3},    {DType::kFloat16, 256, 1, 3},
  };
  for (const Expect& e : cases) {
    SCOPED_TRACE(Name(e.cache, e.seqs));
    const bool occ4 = DTypeSize(e.cache) == 1;
    const AttentionKernelChoice c =
        ChooseAttentionKernel(Params(e.cache, e.seqs), occ4, kH200Sms);
    EXPECT_EQ(c.heads, e.heads);
    EXPECT_EQ(c.blocks_per_sm, e.blocks_per_sm);
    EXPECT_TRUE(c.row_copy);  // The policy copies K in row order.
    // auto_v4: the same heads and kernel, K copied in operand order.
    const AttentionKernelChoice v4 = ChooseAttentionKernel(
        Params(e.cache, e.seqs, 8, 4, 1, 8), occ4, kH200Sms);
    EXPECT_EQ(v4.heads, e.heads);
    EXPECT_EQ(v4.blocks_per_sm, e.blocks_per_sm);
    EXPECT_FALSE(v4.row_copy);
  }
}

TEST(AttentionPolicyTest, ThresholdsAroundTheShapes) {
  // few: blocks < 66; many: blocks >= 264; fp8's 4-blocks kernel: >= 396.
  struct Edge {
    DType cache;
    int32_t seqs;  // Base blocks = 2 x seqs.
    int heads, blocks_per_sm;
  };
  const Edge edges[] = {
      {DType::kFp8E4M3, 32, 1, 3},   {DType::kFp8E4M3, 33, 4, 3},
      {DType::kFp8E4M3, 197, 4, 3},  {DType::kFp8E4M3, 198, 4, 4},
      {DType::kInt8, 131, 1, 4},     {DType::kInt8, 132, 4, 4},
      {DType::kBFloat16, 32, 1, 3},  {DType::kBFloat16, 33, 2, 3},
      {DType::kBFloat16, 131, 2, 3}, {DType::kBFloat16, 132, 1, 3},
  };
  for (const Edge& e : edges) {
    SCOPED_TRACE(Name(e.cache, e.seqs));
    const AttentionKernelChoice c = ChooseAttentionKernel(
        Params(e.cache, e.seqs), DTypeSize(e.cache) == 1, kH200Sms);
    EXPECT_EQ(c.heads, e.heads);
    EXPECT_EQ(c.blocks_per_sm, e.blocks_per_sm);
  }
}

TEST(AttentionPolicyTest, WithoutTheFourBlocksKernelInt8FollowsFp8) {
  // Head size 256: no 4-blocks kernel.
  for (int32_t seqs : {64, 8, 256}) {
    SCOPED_TRACE(seqs);
    const AttentionKernelChoice i8 =
        ChooseAttentionKernel(Params(DType::kInt8, seqs), false, kH200Sms);
    const AttentionKernelChoice f8 =
        ChooseAttentionKernel(Params(DType::kFp8E4M3, seqs), false, kH200Sms);
    EXPECT_EQ(i8.blocks_per_sm, 3);
    EXPECT_EQ(f8.blocks_per_sm, 3);
    EXPECT_EQ(i8.heads, f8.heads);
    EXPECT_EQ(i8.heads, seqs == 8 ? 1 : 4);
  }
}

TEST(AttentionPolicyTest, ForcedVariants) {
  // 1 base, 2 heads1, 3 heads2, 4 occ4, 5 occ4_heads1, 6 auto_heads,
  // 7 occ4_auto_heads, 8 auto_v4 (operand-order K copies); 9 rows_base,
  // 10 rows_heads1, 11 rows_heads2, 12 rows_occ4, 13 rows_occ4_heads1 (row
  // copies); int8 at 256 x 1k (many) and 8 x 64k (few).
  struct Forced {
    int32_t variant, seqs;
    int heads, blocks_per_sm;
    bool row_copy;
  };
  const Forced forced[] = {
      {1, 256, 4, 3, false}, {1, 8, 4, 3, false},   {2, 256, 1, 3, false},
      {3, 256, 2, 3, false}, {4, 256, 4, 4, false}, {4, 8, 4, 4, false},
      {5, 256, 1, 4, false}, {6, 256, 4, 3, false}, {6, 8, 1, 3, false},
      {7, 256, 4, 4, false}, {7, 8, 1, 4, false},   {8, 256, 4, 4, false},
      {8, 8, 1, 4, false},   {9, 256, 4, 3, true},  {9, 8, 4, 3, true},
      {10, 256, 1, 3, true}, {11, 256, 2, 3, true}, {12, 256, 4, 4, true},
      {12, 8, 4, 4, true},   {13, 256, 1, 4, true}, {13, 8, 1, 4, true},
      {0, 256, 4, 4, true},  {0, 8, 1, 4, true},
  };
  for (const Forced& f : forced) {
    SCOPED_TRACE(kAttentionVariantNames[f.variant]);
    SCOPED_TRACE(f.seqs);
    const AttentionKernelChoice c = ChooseAttentionKernel(
        Params(DType::kInt8, f.seqs, 8, 4, 1, f.variant), true, kH200Sms);
    EXPECT_EQ(c.heads, f.heads);
    EXPECT_EQ(c.blocks_per_sm, f.blocks_per_sm);
    EXPECT_EQ(c.row_copy, f.row_copy);
  }
  // rows_occ4 without a 4-blocks kernel (head size 256, 16-bit caches): the
  // 3-blocks kernel, still with row copies.
  AttentionKernelChoice c = ChooseAttentionKernel(
      Params(DType::kBFloat16, 64, 8, 4, 1, 12), false, kH200Sms);
  EXPECT_EQ(c.heads, 4);
  EXPECT_EQ(c.blocks_per_sm, 3);
  EXPECT_TRUE(c.row_copy);
  // occ4 and auto_heads on a 16-bit cache: 3 blocks (none compiled); the
  // first rule's 1 head when many.
  c = ChooseAttentionKernel(Params(DType::kBFloat16, 256, 8, 4, 1, 7), false,
                            kH200Sms);
  EXPECT_EQ(c.heads, 1);
  EXPECT_EQ(c.blocks_per_sm, 3);
  c = ChooseAttentionKernel(Params(DType::kBFloat16, 64, 8, 4, 1, 4), false,
                            kH200Sms);
  EXPECT_EQ(c.heads, 4);
  EXPECT_EQ(c.blocks_per_sm, 3);
}

TEST(AttentionPolicyTest, SwappedTilesFor8BitCachesWithAtMost8Rows) {
  struct Swap {
    DType cache;
    int32_t group, query_tokens, variant;
    bool swap;
  };
  const Swap cases[] = {
      // auto: 8-bit caches whose rows per KV head (tokens x group) fit 8.
      {DType::kInt8, 4, 1, 0, true},
      {DType::kFp8E4M3, 4, 1, 0, true},
      {DType::kInt8, 8, 1, 0, true},
      {DType::kInt8, 1, 8, 0, true},
      {DType::kInt8, 4, 2, 0, true},
      {DType::kInt8, 16, 1, 0, false},
      {DType::kInt8, 4, 3, 0, false},
      {DType::kFp8E4M3, 1, 9, 0, false},
      {DType::kBFloat16, 4, 1, 0, false},
      {DType::kFloat16, 1, 1, 0, false},
      // The rows_* variants too; auto_v5 (the policy without them) and the
      // operand-order variants never.
      {DType::kInt8, 4, 1, 13, true},
      {DType::kFp8E4M3, 4, 1, 9, true},
      {DType::kInt8, 16, 1, 10, false},
      {DType::kBFloat16, 4, 1, 12, false},
      {DType::kInt8, 4, 1, 14, false},
      {DType::kInt8, 4, 1, 8, false},
      {DType::kInt8, 4, 1, 1, false},
      {DType::kFp8E4M3, 4, 1, 5, false},
  };
  for (const Swap& w : cases) {
    SCOPED_TRACE(std::string(DTypeName(w.cache)) + " group " +
                 std::to_string(w.group) + " tokens " +
                 std::to_string(w.query_tokens) + " " +
                 kAttentionVariantNames[w.variant]);
    const AttentionKernelChoice c = ChooseAttentionKernel(
        Params(w.cache, 64, 8, w.group, w.query_tokens, w.variant),
        DTypeSize(w.cache) == 1, kH200Sms);
    EXPECT_EQ(c.swap, w.swap);
    if (w.swap) {
      EXPECT_TRUE(c.row_copy);
    }
  }
  // auto_v5 makes the same heads and kernel choice as auto.
  for (int32_t seqs : {8, 64, 256}) {
    const AttentionKernelChoice a =
        ChooseAttentionKernel(Params(DType::kInt8, seqs), true, kH200Sms);
    const AttentionKernelChoice v5 = ChooseAttentionKernel(
        Params(DType::kInt8, seqs, 8, 4, 1, 14), true, kH200Sms);
    EXPECT_EQ(a.heads, v5.heads);
    EXPECT_EQ(a.blocks_per_sm, v5.blocks_per_sm);
    EXPECT_TRUE(v5.row_copy);
  }
}

TEST(AttentionPolicyTest, HeadsThatDoNotDivideFallBackToTheBase) {
  // 6 KV heads: base 2; 3 KV heads: base 1.
  AttentionKernelChoice c = ChooseAttentionKernel(
      Params(DType::kBFloat16, 64, 6, 4, 1, 1), false, kH200Sms);
  EXPECT_EQ(c.heads, 2);
  c = ChooseAttentionKernel(Params(DType::kInt8, 64, 3, 4, 1, 3), true,
                            kH200Sms);
  EXPECT_EQ(c.heads, 1);  // heads2 forced, 2 does not divide 3.
  // Policy, bf16, 6 heads x 32 sequences = 96 base blocks: 2 per block.
  c = ChooseAttentionKernel(Params(DType::kBFloat16, 32, 6), false, kH200Sms);
  EXPECT_EQ(c.heads, 2);
  // 3 KV heads, policy in the middle band: 2 does not divide, base 1.
  c = ChooseAttentionKernel(Params(DType::kBFloat16, 40, 3), false, kH200Sms);
  EXPECT_EQ(c.heads, 1);
}

TEST(AttentionPolicyTest, V10KnobsOnlyChangeSwappedTiles) {
  // The policy (0): int8 swapped tiles on the integer tensor cores, fp8 ones
  // in two chains (chains -1 below: 1 for int8, 2 for fp8), both with the
  // L2 hint; auto_v7 (15): the same heads, kernel and swap with none of them.
  struct Knobs {
    int32_t variant;
    int chains, l2_bytes;
    bool int8_mma;
  };
  const Knobs knobs[] = {{0, -1, 256, true}, {15, 1, 0, false}};
  for (const Knobs& k : knobs) {
    for (DType cache : {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16}) {
      for (int32_t group : {4, 16}) {
        for (int32_t seqs : {8, 64, 256}) {
          SCOPED_TRACE(std::string(kAttentionVariantNames[k.variant]) + " " +
                       std::string(DTypeName(cache)) + " group " +
                       std::to_string(group) + " seqs " + std::to_string(seqs));
          const bool occ4 = DTypeSize(cache) == 1;
          const AttentionKernelChoice a = ChooseAttentionKernel(
              Params(cache, seqs, 8, group), occ4, kH200Sms);
          const AttentionKernelChoice v = ChooseAttentionKernel(
              Params(cache, seqs, 8, group, 1, k.variant), occ4, kH200Sms);
          EXPECT_EQ(v.heads, a.heads);
          EXPECT_EQ(v.blocks_per_sm, a.blocks_per_sm);
          EXPECT_EQ(v.row_copy, a.row_copy);
          EXPECT_EQ(v.swap, a.swap);
          // Swapped: 8-bit caches with at most 8 rows per KV head.
          const bool swapped = occ4 && group <= 8;
          EXPECT_EQ(v.swap, swapped);
          const int chains =
              k.chains >= 0 ? k.chains : (cache == DType::kInt8 ? 1 : 2);
          EXPECT_EQ(v.chains, swapped ? chains : 1);
          EXPECT_EQ(v.l2_bytes, swapped ? k.l2_bytes : 0);
          EXPECT_EQ(v.int8_mma, swapped && cache == DType::kInt8 && k.int8_mma);
        }
      }
    }
  }
}

TEST(AttentionPolicyTest, RowTilesCountGroupsAndQueryTokens) {
  EXPECT_EQ(internal::AttentionRowTiles(Params(DType::kInt8, 1, 8, 4, 1)), 1);
  EXPECT_EQ(internal::AttentionRowTiles(Params(DType::kInt8, 1, 8, 16, 1)), 1);
  EXPECT_EQ(internal::AttentionRowTiles(Params(DType::kInt8, 1, 8, 16, 8)), 8);
  EXPECT_EQ(internal::AttentionRowTiles(Params(DType::kInt8, 1, 8, 4, 5)), 2);
  // 8 sequences of GQA 16 x 8 query tokens: 128 base blocks, not few: fp8
  // keeps 4 heads per block.
  const AttentionKernelChoice c = ChooseAttentionKernel(
      Params(DType::kFp8E4M3, 8, 8, 16, 8), true, kH200Sms);
  EXPECT_EQ(c.heads, 4);
  EXPECT_EQ(c.blocks_per_sm, 3);
}

}  // namespace
}  // namespace kvcache::testing
