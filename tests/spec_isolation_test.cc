// Speculative decoding through KVCacheManager on the CPU backend: a rejected
// draft token's K/V never becomes visible to another sequence (through the
// prefix cache or a block table), a truncated registered block keeps its
// content for others, RemoveFromPlan pads the removed rows, and never-fits
// is told from not-now by code and Shortfall.
//
// Every token's K is written as one distinguishable value (accepted tokens:
// a value per sequence and position; drafts to be rejected: negative poison),
// cache bf16 so values round-trip exactly, and read back with Gather.

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int kBs = 4;
constexpr int kD = 8;

class SpecTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(/*num_blocks=*/16, /*max_blocks=*/0); }
  void Make(int64_t num_blocks, int32_t max_blocks) {
    KVCacheConfig c;
    c.num_layers = 1;
    c.num_kv_heads = 1;
    c.head_size = kD;
    c.block_size = kBs;
    c.cache_dtype = DType::kBFloat16;
    c.input_dtype = DType::kBFloat16;
    c.num_blocks = num_blocks;
    c.max_blocks_per_sequence = max_blocks;
    c.cpu_threads = 1;
    auto m = KVCacheManager::Create(c);
    ASSERT_TRUE(m.ok()) << m.status();
    m_ = *std::move(m);
  }

  // Appends one K/V row per value (every element of row i is values[i]).
  void Append(uint64_t plan, const std::vector<float>& values) {
    const int64_t t = static_cast<int64_t>(values.size());
    std::vector<uint16_t> kv(t * kD);
    for (int64_t i = 0; i < t * kD; ++i)
      kv[i] = testing::FloatToBf16(values[i / kD]);
    const TensorView view =
        TensorView::Contiguous(kv.data(), DType::kBFloat16, {t, 1, kD});
    ASSERT_TRUE(m_->Append(plan, 0, view, view).ok());
  }

  // The K value of each of a sequence's first n tokens.
  std::vector<float> Read(SequenceId id, int64_t n) {
    std::vector<float> k(n * kD), v(n * kD);
    const absl::Status s = m_->Gather(
        id, 0, 0, n,
        TensorView::Contiguous(k.data(), DType::kFloat32, {n, 1, kD}),
        TensorView::Contiguous(v.data(), DType::kFloat32, {n, 1, kD}));
    EXPECT_TRUE(s.ok()) << s;
    std::vector<float> out;
    for (int64_t i = 0; i < n; ++i) out.push_back(k[i * kD]);
    return out;
  }

  // Values of sequence `tag`'s tokens [from, to).
  static std::vector<float> Real(int tag, int64_t from, int64_t to) {
    std::vector<float> v;
    for (int64_t p = from; p < to; ++p) v.push_back(tag * 100 + p);
    return v;
  }

  // Reserves and writes [computed, computed + n) of `id`, committing all.
  void Step(SequenceId id, int tag, std::vector<TokenId> fresh, int64_t n) {
    const int64_t at = *m_->SequenceLength(id);
    auto plan = m_->Reserve({{id, fresh, n}});
    ASSERT_TRUE(plan.ok()) << plan.status();
    Append(plan->id, Real(tag, at, at + n));
    ASSERT_TRUE(m_->Commit(plan->id).ok());
  }

  std::unique_ptr<KVCacheManager> m_;
};

TEST_F(SpecTest, RejectedDraftsAreNeverVisibleThroughThePrefixCache) {
  const std::vector<TokenId> prompt = {1, 2, 3, 4, 5, 6};
  ASSERT_EQ(*m_->AddSequence(1, prompt), 0);
  Step(1, 1, {}, 6);
  // The sampled token 7 and drafts 8, 9, 10: their K/V fill block 1 (tokens
  // 4..7) and start block 2. Only the sampled token is accepted.
  auto plan = m_->Reserve({{1, {7, 8, 9, 10}, 4}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->sequences.size(), 1u);
  EXPECT_EQ(plan->sequences[0].first_position, 6);
  EXPECT_EQ(plan->sequences[0].num_tokens, 4);
  Append(plan->id, {106, -1, -2, -3});
  const int64_t free_before = m_->FreeBlocks();
  ASSERT_TRUE(m_->Commit(plan->id, std::vector<int64_t>{1}).ok());
  EXPECT_EQ(m_->FreeBlocks(), free_before + 1);  // Block 2 came back.
  EXPECT_EQ(*m_->SequenceLength(1), 7);
  EXPECT_EQ(m_->Metrics().tokens_rejected, 3);
  ASSERT_TRUE(m_->Validate().ok());

  // Another sequence whose prompt is the prefix plus the rejected drafts:
  // only block 0 (full of accepted tokens) may be shared.
  const std::vector<TokenId> other = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const MetricsSnapshot before = m_->Metrics();
  ASSERT_EQ(*m_->PeekPrefix(other), 4);
  EXPECT_EQ(m_->Metrics().prefix_queries, before.prefix_queries);
  EXPECT_EQ(m_->Metrics().blocks_in_use, before.blocks_in_use);
  ASSERT_EQ(*m_->AddSequence(2, other), 4);
  Step(2, 2, {}, 7);
  std::vector<float> want = Real(1, 0, 4);
  for (float v : Real(2, 4, 11)) want.push_back(v);
  EXPECT_EQ(Read(2, 11), want);

  // Sequence 1 goes on from its accepted tokens: block 1 fills with accepted
  // tokens only and becomes shareable.
  Step(1, 1, {20}, 1);
  EXPECT_EQ(Read(1, 8), Real(1, 0, 8));
  ASSERT_EQ(*m_->PeekPrefix({1, 2, 3, 4, 5, 6, 7, 20, 1}), 8);
  ASSERT_TRUE(m_->Validate().ok());
}

TEST_F(SpecTest, TruncatedRegisteredBlockKeepsItsContentForOthers) {
  const std::vector<TokenId> prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  ASSERT_EQ(*m_->AddSequence(1, prompt), 0);
  Step(1, 1, {}, 9);  // Blocks 0 and 1 full and registered.
  ASSERT_TRUE(m_->Fork(1, 3).ok());
  EXPECT_EQ(m_->Truncate(1, 10).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_->Truncate(1, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_->Truncate(99, 1).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(m_->Truncate(1, 6).ok());
  EXPECT_EQ(*m_->SequenceLength(1), 6);
  EXPECT_EQ(m_->BlockTable(1)->size(), 2u);
  // Rewriting tokens 6 and 7 copies block 1 first.
  auto plan = m_->Reserve({{1, {50, 51}, 2}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->num_block_copies, 1);
  Append(plan->id, {-6, -7});
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  std::vector<float> mine = Real(1, 0, 6);
  mine.push_back(-6);
  mine.push_back(-7);
  EXPECT_EQ(Read(1, 8), mine);
  // The fork and a new sequence with the original prompt see the original.
  EXPECT_EQ(Read(3, 9), Real(1, 0, 9));
  ASSERT_EQ(*m_->AddSequence(2, prompt), 8);
  EXPECT_EQ(Read(2, 8), Real(1, 0, 8));
  ASSERT_TRUE(m_->Validate().ok());
}

TEST_F(SpecTest, RemoveFromPlanPadsTheRemovedRows) {
  ASSERT_EQ(*m_->AddSequence(1, {1, 2, 3}), 0);
  ASSERT_EQ(*m_->AddSequence(2, {4, 5, 6}), 0);
  auto plan = m_->Reserve({{1, {}, 3}, {2, {}, 3}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->sequences[1].slot_offset, 3);
  EXPECT_EQ(m_->RemoveFromPlan(plan->id, 7).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(m_->RemoveFromPlan(plan->id + 1, 1).code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(m_->RemoveFromPlan(plan->id, 1).ok());
  EXPECT_EQ(m_->RemoveFromPlan(plan->id, 1).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_->PlanLayout(plan->id)->at(0).num_tokens, 0);
  ASSERT_TRUE(m_->Validate().ok());
  // The engine still appends the whole batch; sequence 1's rows are skipped.
  std::vector<float> rows = {-1, -2, -3};
  for (float v : Real(2, 0, 3)) rows.push_back(v);
  Append(plan->id, rows);
  // Its entry of accepted is ignored.
  ASSERT_TRUE(m_->Commit(plan->id, std::vector<int64_t>{99, 3}).ok());
  EXPECT_EQ(*m_->SequenceLength(1), 0);
  EXPECT_EQ(Read(2, 3), Real(2, 0, 3));
  Step(1, 1, {}, 3);
  EXPECT_EQ(Read(1, 3), Real(1, 0, 3));
  ASSERT_TRUE(m_->Validate().ok());
}

TEST_F(SpecTest, NeverFitsIsToldFromNotNow) {
  Make(/*num_blocks=*/8, /*max_blocks=*/0);
  std::vector<TokenId> huge(8 * kBs + 1, 3);
  absl::StatusOr<int64_t> added = m_->AddSequence(1, huge);
  ASSERT_EQ(added.status().code(), absl::StatusCode::kOutOfRange);
  std::optional<Shortfall> s = GetShortfall(added.status());
  ASSERT_TRUE(s.has_value());
  EXPECT_TRUE(s->never_fits);
  EXPECT_EQ(s->blocks_needed, 9);
  EXPECT_EQ(s->blocks_total, 8);

  ASSERT_TRUE(m_->AddSequence(1, std::vector<TokenId>(6 * kBs, 1)).ok());
  ASSERT_TRUE(m_->AddSequence(2, std::vector<TokenId>(3 * kBs, 2)).ok());
  Step(1, 1, {}, 6 * kBs);  // 6 of 8 blocks.
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{2, {}, 3 * kBs}});
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
  s = GetShortfall(plan.status());
  ASSERT_TRUE(s.has_value());
  EXPECT_FALSE(s->never_fits);
  EXPECT_EQ(s->blocks_needed, 3);
  EXPECT_EQ(s->blocks_free, 2);
  EXPECT_EQ(s->blocks_evictable, 0);
  EXPECT_EQ(s->blocks_total, 8);
  // Sequence 1 growing past the whole pool can never fit.
  plan = m_->Reserve({{1, std::vector<TokenId>(3 * kBs, 1), 3 * kBs}});
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(plan.status().message(), HasSubstr("can never fit"));
  EXPECT_TRUE(GetShortfall(plan.status())->never_fits);
  EXPECT_EQ(GetShortfall(plan.status())->blocks_needed, 9);
  ASSERT_TRUE(m_->Validate().ok());
}

TEST_F(SpecTest, MaxBlocksPerSequenceIsEnforcedAtReserve) {
  Make(/*num_blocks=*/16, /*max_blocks=*/2);
  ASSERT_TRUE(m_->AddSequence(1, std::vector<TokenId>(3 * kBs, 1)).ok());
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{1, {}, 2 * kBs + 1}});
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("3 blocks"));
  EXPECT_THAT(plan.status().message(), HasSubstr("max_blocks_per_sequence 2"));
  Step(1, 1, {}, 2 * kBs);
  EXPECT_EQ(m_->Reserve({{1, {}, 1}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(m_->Validate().ok());
}

TEST_F(SpecTest, CommitAcceptedRefusesBadCounts) {
  ASSERT_EQ(*m_->AddSequence(1, {1, 2}), 0);
  auto plan = m_->Reserve({{1, {}, 2}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(m_->Commit(plan->id, std::vector<int64_t>{1}).code(),
            absl::StatusCode::kFailedPrecondition);  // Not appended yet.
  Append(plan->id, Real(1, 0, 2));
  EXPECT_EQ(m_->Commit(plan->id, std::vector<int64_t>{}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_->Commit(plan->id, std::vector<int64_t>{3}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_->Commit(plan->id, std::vector<int64_t>{-1}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_->Truncate(1, 0).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(m_->Commit(plan->id, std::vector<int64_t>{0}).ok());
  EXPECT_EQ(*m_->SequenceLength(1), 0);
  EXPECT_EQ(m_->Metrics().tokens_committed, 0);
  EXPECT_EQ(m_->Metrics().tokens_rejected, 2);
  ASSERT_TRUE(m_->Validate().ok());
}

}  // namespace
}  // namespace kvcache
