#include <memory>
#include <numeric>
#include <vector>

#include "allocator/block_hash.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

std::vector<TokenId> Tokens(int n, TokenId first = 1) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<TokenId> Concat(std::vector<TokenId> a,
                            const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::unique_ptr<BlockManager> Make(int32_t num_blocks,
                                   BlockHashFunction hash = nullptr,
                                   bool prefix = true) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = 4;
  o.enable_prefix_caching = prefix;
  o.hash_function_for_testing = hash;
  return std::move(*BlockManager::Create(o));
}

// Creates `id`, computes its whole prompt and returns the prefix hit in tokens.
int64_t Compute(BlockManager& m, SequenceId id,
                const std::vector<TokenId>& prompt,
                const ExtraKey& extra = {}) {
  absl::StatusOr<int64_t> hit = m.AddSequence(id, prompt, extra);
  EXPECT_TRUE(hit.ok()) << hit.status();
  auto plan = m.Reserve(
      {ReserveRequest{id, {}, static_cast<int64_t>(prompt.size()) - *hit}});
  EXPECT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(m.Commit(plan->id).ok());
  EXPECT_TRUE(m.Validate().ok()) << m.Validate();
  return *hit;
}

BlockHash ConstantHash(const BlockHash&, absl::Span<const TokenId>) {
  return BlockHash{7, 7};
}
BlockHash TokensOnlyHash(const BlockHash&, absl::Span<const TokenId> tokens) {
  return HashBlock(BlockHash{}, tokens);
}

TEST(PrefixCacheTest, SharesCommittedFullBlocksAndCountsStats) {
  auto m = Make(16);
  const auto prompt = Tokens(10);
  EXPECT_EQ(Compute(*m, 1, prompt), 0);
  EXPECT_EQ(Compute(*m, 2, prompt),
            8);  // Two full blocks shared while sequence 1 holds them.
  EXPECT_EQ((*m->BlockTable(1))[0], (*m->BlockTable(2))[0]);
  EXPECT_EQ((*m->BlockTable(1))[1], (*m->BlockTable(2))[1]);
  ASSERT_TRUE(m->Free(1).ok());
  ASSERT_TRUE(m->Free(2).ok());
  EXPECT_EQ(m->Usage().cached_blocks, 2);
  EXPECT_EQ(Compute(*m, 3, Concat(Tokens(8), Tokens(5, 100))),
            8);  // Shared from the LRU list.
  const PrefixCacheStats s = m->PrefixStats();
  EXPECT_EQ(s.queries, 3);
  EXPECT_EQ(s.query_tokens, 10 + 10 + 13);
  EXPECT_EQ(s.hit_tokens, 16);
  EXPECT_EQ(s.evictions, 0);
}

TEST(PrefixCacheTest, AlwaysLeavesOneTokenToCompute) {
  auto m = Make(16);
  EXPECT_EQ(Compute(*m, 1, Tokens(8)), 0);
  EXPECT_EQ(Compute(*m, 2, Tokens(8)),
            4);  // Not 8: the last token must be computed.
  EXPECT_EQ(Compute(*m, 3, Tokens(9)), 8);
  EXPECT_EQ(Compute(*m, 4, Tokens(4)), 0);
  EXPECT_EQ(*m->ComputedLength(2), 8);
}

TEST(PrefixCacheTest, UncommittedBlocksAreNotShared) {
  auto m = Make(16);
  ASSERT_TRUE(m->AddSequence(1, Tokens(9)).ok());
  auto plan = m->Reserve({ReserveRequest{1, {}, 9}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(*m->AddSequence(2, Tokens(9)), 0);
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_EQ(*m->AddSequence(3, Tokens(9)), 8);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(PrefixCacheTest, DuplicateContentStaysUnhashedAndIsFreedAtOnce) {
  auto m = Make(16);
  ASSERT_TRUE(m->AddSequence(1, Tokens(9)).ok());
  ASSERT_TRUE(
      m->AddSequence(2, Tokens(9)).ok());  // Both miss: nothing committed yet.
  auto plan = m->Reserve({ReserveRequest{1, {}, 9}, ReserveRequest{2, {}, 9}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  ASSERT_TRUE(m->Validate().ok());
  ASSERT_TRUE(m->Free(2).ok());
  EXPECT_EQ(m->Usage().cached_blocks,
            0);  // Sequence 2's copies went to the free list.
  EXPECT_EQ(m->Usage().used_blocks, 3);
  EXPECT_EQ(Compute(*m, 3, Tokens(13)), 8);
  EXPECT_EQ((*m->BlockTable(3))[1], (*m->BlockTable(1))[1]);
}

TEST(PrefixCacheTest, EvictsLeastRecentlyUsedFirst) {
  auto m = Make(3);
  const auto a = Tokens(4, 10), b = Tokens(4, 20), c = Tokens(4, 30);
  EXPECT_EQ(Compute(*m, 1, a), 0);
  EXPECT_EQ(Compute(*m, 2, b), 0);
  EXPECT_EQ(Compute(*m, 3, c), 0);
  for (SequenceId id : {1, 2, 3})
    ASSERT_TRUE(m->Free(id).ok());  // LRU: a, b, c.
  EXPECT_EQ(m->Usage().cached_blocks, 3);
  // Hitting a takes it off the LRU list; its extra token needs a block: b, the
  // oldest, goes.
  EXPECT_EQ(Compute(*m, 4, Concat(a, {1})), 4);
  EXPECT_EQ(m->PrefixStats().evictions, 1);
  ASSERT_TRUE(
      m->Free(4)
          .ok());  // LRU: c, a. The unhashed extra block is freed at once.
  EXPECT_EQ(m->Usage().free_blocks, 1);
  // b missed; its two blocks are the free one and c, now the oldest.
  EXPECT_EQ(Compute(*m, 5, Concat(b, {1})), 0);
  EXPECT_EQ(m->PrefixStats().evictions, 2);
  ASSERT_TRUE(m->Free(5).ok());  // LRU: a, b.
  EXPECT_EQ(*m->AddSequence(6, Concat(a, {1})), 4);
  EXPECT_EQ(*m->AddSequence(7, Concat(b, {1})), 4);
  EXPECT_EQ(*m->AddSequence(8, Concat(c, {1})), 0);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(PrefixCacheTest, DifferentSaltsOrAdaptersNeverShare) {
  auto m = Make(32);
  const auto prompt = Tokens(9);
  EXPECT_EQ(Compute(*m, 1, prompt, {0, "tenant-a"}), 0);
  EXPECT_EQ(Compute(*m, 2, prompt, {0, "tenant-b"}), 0);
  EXPECT_EQ(Compute(*m, 3, prompt, {1, "tenant-a"}), 0);
  EXPECT_EQ(Compute(*m, 4, prompt, {}), 0);
  EXPECT_EQ(Compute(*m, 5, prompt, {0, "tenant-a"}), 8);
  EXPECT_EQ(Compute(*m, 6, prompt, {1, "tenant-a"}), 8);
}

TEST(PrefixCacheTest, ForgedCollisionNeverSharesData) {
  auto m = Make(16, &ConstantHash);  // Every block hashes alike.
  EXPECT_EQ(Compute(*m, 1, Tokens(9)), 0);
  EXPECT_EQ(Compute(*m, 2, Tokens(9, 50)),
            0);  // Same hash, other tokens: no hit.
  const absl::Span<const BlockId> t1 = *m->BlockTable(1);
  const absl::Span<const BlockId> t2 = *m->BlockTable(2);
  for (BlockId b : t2) {
    for (BlockId a : t1) EXPECT_NE(a, b);
  }
  EXPECT_EQ(Compute(*m, 3, Tokens(9)),
            4);  // The registered block still matches exactly.
  EXPECT_EQ(Compute(*m, 4, Tokens(9), {0, "salt"}), 0);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(PrefixCacheTest, ForgedCollisionWithAnotherParentNeverSharesData) {
  auto m = Make(32, &TokensOnlyHash);  // The parent no longer enters the hash.
  const auto x = Tokens(4, 10), y = Tokens(4, 20), w = Tokens(4, 30);
  EXPECT_EQ(Compute(*m, 1, Concat(Concat(x, y), {1})), 0);
  // Block y after w hashes like y after x; the exact parent check refuses it.
  EXPECT_EQ(Compute(*m, 2, Concat(Concat(w, y), {1})), 0);
  EXPECT_EQ(Compute(*m, 3, Concat(Concat(w, y), {1})), 4);
  EXPECT_NE((*m->BlockTable(3))[1], (*m->BlockTable(1))[1]);
  EXPECT_EQ(Compute(*m, 4, Concat(Concat(x, y), {1})), 8);
  // A salt only enters the chain at its root; the parent check still tells the
  // roots apart.
  EXPECT_EQ(Compute(*m, 5, Concat(x, {1}), {0, "other"}), 0);
  EXPECT_TRUE(m->Validate().ok());
}

TEST(PrefixCacheTest, CanBeSwitchedOff) {
  auto m = Make(16, nullptr, /*prefix=*/false);
  EXPECT_EQ(Compute(*m, 1, Tokens(9)), 0);
  EXPECT_EQ(Compute(*m, 2, Tokens(9)), 0);
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Usage().cached_blocks, 0);
  EXPECT_EQ(m->PrefixStats().queries, 0);
}

}  // namespace
}  // namespace kvcache
