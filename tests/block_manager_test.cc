#include "allocator/block_manager.h"

#include <memory>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<TokenId> Tokens(int n, TokenId first = 1) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::unique_ptr<BlockManager> Make(int32_t num_blocks, int32_t block_size = 4,
                                   bool prefix = true) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = block_size;
  o.enable_prefix_caching = prefix;
  auto m = BlockManager::Create(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(*m);
}

// Reserves the uncomputed prompt of `id` and commits it.
void Prefill(BlockManager& m, SequenceId id) {
  const int64_t n = *m.KnownLength(id) - *m.ComputedLength(id);
  auto plan = m.Reserve({ReserveRequest{id, {}, n}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(m.Commit(plan->id).ok());
}

TEST(BlockManagerTest, CreateRejectsBadOptions) {
  BlockManagerOptions o;
  o.num_blocks = 0;
  EXPECT_THAT(BlockManager::Create(o).status().message(),
              HasSubstr("num_blocks 0"));
  o.num_blocks = 4;
  o.block_size = 0;
  EXPECT_EQ(BlockManager::Create(o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BlockManagerTest, AddSequenceAndLookups) {
  auto m = Make(8);
  EXPECT_EQ(*m->AddSequence(1, Tokens(6)), 0);
  EXPECT_TRUE(m->Contains(1));
  EXPECT_EQ(m->num_sequences(), 1);
  EXPECT_EQ(*m->KnownLength(1), 6);
  EXPECT_EQ(*m->ComputedLength(1), 0);
  EXPECT_TRUE(m->BlockTable(1)->empty());
  EXPECT_EQ(m->AddSequence(1, Tokens(3)).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m->AddSequence(2, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, UnknownSequenceIsNotFoundEverywhere) {
  auto m = Make(8);
  EXPECT_EQ(m->Free(17).message(), "sequence 17 not found");
  EXPECT_EQ(m->BlockTable(17).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->ComputedLength(17).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->KnownLength(17).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->TokensThatFit(17).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->BatchTable({17}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->Reserve({ReserveRequest{17, {}, 1}}).status().message(),
            "sequence 17 not found");
  EXPECT_FALSE(m->Contains(17));
}

TEST(BlockManagerTest, ReserveProducesSlotsInBatchOrderAndCommitAdvances) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(5)).ok());
  ASSERT_TRUE(m->AddSequence(2, Tokens(2, 100)).ok());
  auto plan = m->Reserve({ReserveRequest{2, {}, 2}, ReserveRequest{1, {}, 5}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->sequences, ElementsAre(2, 1));
  EXPECT_THAT(plan->num_tokens, ElementsAre(2, 5));
  const std::vector<BlockId> t2(m->BlockTable(2)->begin(),
                                m->BlockTable(2)->end());
  const std::vector<BlockId> t1(m->BlockTable(1)->begin(),
                                m->BlockTable(1)->end());
  ASSERT_EQ(t2.size(), 1u);
  ASSERT_EQ(t1.size(), 2u);
  std::vector<int64_t> expected = {t2[0] * 4 + 0, t2[0] * 4 + 1};
  for (int p = 0; p < 5; ++p) expected.push_back(t1[p / 4] * 4 + p % 4);
  EXPECT_EQ(plan->slot_mapping, expected);
  EXPECT_TRUE(plan->copies.empty());
  EXPECT_EQ(*m->ComputedLength(1), 0);
  ASSERT_TRUE(m->Validate().ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_EQ(*m->ComputedLength(1), 5);
  EXPECT_EQ(*m->ComputedLength(2), 2);
  // Decode: append a sampled token and reserve it.
  auto step = m->Reserve({ReserveRequest{1, {42}, 1}});
  ASSERT_TRUE(step.ok());
  EXPECT_EQ(*m->KnownLength(1), 6);
  EXPECT_THAT(step->slot_mapping, ElementsAre(t1[1] * 4 + 1));
  ASSERT_TRUE(m->Commit(step->id).ok());
  EXPECT_EQ(m->Usage().used_blocks, 3);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, ReserveErrorsNameTheBadValue) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(3, Tokens(4)).ok());
  auto zero = m->Reserve({ReserveRequest{3, {}, 0}});
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(zero.status().message(),
            "reserve of 0 tokens for sequence 3: num_tokens must be >= 1");
  auto beyond_known = m->Reserve({ReserveRequest{3, {}, 5}});
  EXPECT_EQ(beyond_known.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(beyond_known.status().message(), HasSubstr("4 known tokens"));
  auto twice = m->Reserve({ReserveRequest{3, {}, 1}, ReserveRequest{3, {}, 1}});
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m->Reserve({}).status().code(), absl::StatusCode::kInvalidArgument);
  auto plan = m->Reserve({ReserveRequest{3, {}, 2}});
  ASSERT_TRUE(plan.ok());
  auto again = m->Reserve({ReserveRequest{3, {}, 1}});
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->Fork(3, 4).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->TokensThatFit(3).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, ReserveBeyondCapacityChangesNothing) {
  auto m = Make(4);
  ASSERT_TRUE(m->AddSequence(1, Tokens(8)).ok());
  ASSERT_TRUE(m->AddSequence(2, Tokens(12, 50)).ok());
  Prefill(*m, 1);  // 2 blocks used, 2 free (the prompt's blocks are cached once
                   // hashed).
  const PoolUsage before = m->Usage();
  const std::vector<BlockId> table(m->BlockTable(1)->begin(),
                                   m->BlockTable(1)->end());
  // Sequence 2 alone would fit in 3 blocks, but not together with a new block
  // for sequence 1.
  auto plan = m->Reserve(
      {ReserveRequest{1, {7, 7, 7, 7, 7}, 5}, ReserveRequest{2, {}, 8}});
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(plan.status().message(), HasSubstr("needs 4 new blocks, only 2"));
  EXPECT_EQ(m->CanReserve({ReserveRequest{1, {7, 7, 7, 7, 7}, 5},
                           ReserveRequest{2, {}, 8}})
                .code(),
            absl::StatusCode::kResourceExhausted);
  const PoolUsage after = m->Usage();
  EXPECT_EQ(after.free_blocks, before.free_blocks);
  EXPECT_EQ(after.cached_blocks, before.cached_blocks);
  EXPECT_EQ(after.used_blocks, before.used_blocks);
  EXPECT_EQ(*m->KnownLength(1), 8);  // new_token_ids were not appended.
  EXPECT_EQ(
      std::vector<BlockId>(m->BlockTable(1)->begin(), m->BlockTable(1)->end()),
      table);
  EXPECT_TRUE(m->BlockTable(2)->empty());
  EXPECT_TRUE(m->CanReserve({ReserveRequest{2, {}, 8}}).ok());
  EXPECT_EQ(*m->TokensThatFit(2), 8);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, CommitOrAbortOfAPlanUsedTwice) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(4)).ok());
  auto plan = m->Reserve({ReserveRequest{1, {}, 4}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  const absl::Status again = m->Commit(plan->id);
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(again.message(), HasSubstr(absl::StrCat("plan ", plan->id)));
  EXPECT_EQ(m->Abort(plan->id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->Commit(12345).code(),
            absl::StatusCode::kNotFound);  // Never issued.
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, CommitWithoutAReservationIsNotFound) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(4)).ok());
  EXPECT_EQ(m->Commit(1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m->Abort(1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*m->ComputedLength(1), 0);
}

TEST(BlockManagerTest, AbortRestoresEverything) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(4)).ok());
  auto plan = m->Reserve({ReserveRequest{1, {9, 9}, 6}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(m->Usage().used_blocks, 2);
  ASSERT_TRUE(m->Abort(plan->id).ok());
  EXPECT_EQ(m->Usage().free_blocks, 8);
  EXPECT_EQ(*m->KnownLength(1), 4);
  EXPECT_EQ(*m->ComputedLength(1), 0);
  EXPECT_TRUE(m->BlockTable(1)->empty());
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, FreeReturnsBlocksAndDoubleFreeIsNotFound) {
  auto m = Make(8, 4, /*prefix=*/false);
  ASSERT_TRUE(m->AddSequence(1, Tokens(9)).ok());
  Prefill(*m, 1);
  EXPECT_EQ(m->Usage().used_blocks, 3);
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Usage().free_blocks,
            8);  // Unhashed blocks go straight to the free list.
  EXPECT_EQ(m->Free(1).message(), "sequence 1 not found");
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, FreeDuringAPendingPlanCancelsItsPart) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(4)).ok());
  ASSERT_TRUE(m->AddSequence(2, Tokens(4, 20)).ok());
  auto plan = m->Reserve({ReserveRequest{1, {}, 4}, ReserveRequest{2, {}, 4}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Free(1).ok());
  ASSERT_TRUE(m->Validate().ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_EQ(*m->ComputedLength(2), 4);
  EXPECT_EQ(m->Usage().used_blocks, 1);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, ForkSharesBlocksAndCopiesThePartialLastBlockOnWrite) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(6)).ok());
  Prefill(*m, 1);
  ASSERT_TRUE(m->Fork(1, 2).ok());
  EXPECT_EQ(m->Fork(1, 2).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m->Fork(99, 3).message(), "fork: parent sequence 99 not found");
  const std::vector<BlockId> shared(m->BlockTable(1)->begin(),
                                    m->BlockTable(1)->end());
  EXPECT_EQ(
      std::vector<BlockId>(m->BlockTable(2)->begin(), m->BlockTable(2)->end()),
      shared);
  EXPECT_EQ(m->Usage().used_blocks, 2);
  ASSERT_TRUE(m->Validate().ok());
  // The child writes into the shared partial block: it gets a copy.
  auto plan = m->Reserve({ReserveRequest{2, {5}, 1}});
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->copies.size(), 1u);
  EXPECT_EQ(plan->copies[0].src, shared[1]);
  const BlockId copy = plan->copies[0].dst;
  EXPECT_NE(copy, shared[1]);
  EXPECT_THAT(plan->slot_mapping, ElementsAre(copy * 4 + 2));
  EXPECT_EQ(*m->BlockTable(2),
            absl::Span<const BlockId>(std::vector<BlockId>{shared[0], copy}));
  ASSERT_TRUE(m->Validate().ok());
  // Abort undoes the copy.
  ASSERT_TRUE(m->Abort(plan->id).ok());
  EXPECT_EQ(
      std::vector<BlockId>(m->BlockTable(2)->begin(), m->BlockTable(2)->end()),
      shared);
  EXPECT_EQ(m->Usage().used_blocks, 2);
  ASSERT_TRUE(m->Validate().ok());
  // Commit keeps it; the parent then owns the original alone and writes in
  // place.
  plan = m->Reserve({ReserveRequest{2, {5}, 1}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  auto parent_step = m->Reserve({ReserveRequest{1, {6}, 1}});
  ASSERT_TRUE(parent_step.ok());
  EXPECT_TRUE(parent_step->copies.empty());
  EXPECT_THAT(parent_step->slot_mapping, ElementsAre(shared[1] * 4 + 2));
  ASSERT_TRUE(m->Commit(parent_step->id).ok());
  EXPECT_TRUE(m->Validate().ok());
}

TEST(BlockManagerTest, BatchTableIsPaddedRowMajor) {
  auto m = Make(8);
  ASSERT_TRUE(m->AddSequence(1, Tokens(9)).ok());
  ASSERT_TRUE(m->AddSequence(2, Tokens(3, 40)).ok());
  Prefill(*m, 1);
  Prefill(*m, 2);
  auto t = m->BatchTable({2, 1});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->num_sequences, 2);
  EXPECT_EQ(t->max_blocks, 3);
  EXPECT_THAT(t->num_blocks, ElementsAre(1, 3));
  EXPECT_THAT(t->seq_lens, ElementsAre(3, 9));
  const auto t1 = *m->BlockTable(1);
  EXPECT_THAT(t->table,
              ElementsAre((*m->BlockTable(2))[0], 0, 0, t1[0], t1[1], t1[2]));
}

TEST(BlockManagerTest, TokensThatFitAndUsage) {
  auto m = Make(4);
  ASSERT_TRUE(m->AddSequence(1, Tokens(6)).ok());
  EXPECT_EQ(*m->TokensThatFit(1), 16);
  Prefill(*m, 1);
  EXPECT_EQ(*m->TokensThatFit(1), 2 + 2 * 4);
  ASSERT_TRUE(m->Fork(1, 2).ok());
  EXPECT_EQ(*m->TokensThatFit(1), 2 + 1 * 4);  // One block goes to the copy.
  const PoolUsage u = m->Usage();
  EXPECT_EQ(u.total_blocks, 4);
  EXPECT_EQ(u.used_blocks, 2);
  EXPECT_EQ(u.free_blocks + u.cached_blocks + u.used_blocks, 4);
}

}  // namespace
}  // namespace kvcache
