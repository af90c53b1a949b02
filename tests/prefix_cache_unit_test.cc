// PrefixCache on its own (BlockManager's use of it is in prefix_cache_test.cc
// and block_observer_test.cc): matching, registration, eviction, clearing,
// and what it tells its observer.

#include <memory>
#include <vector>

#include "allocator/block_pool.h"
#include "allocator/prefix_cache.h"
#include "allocator/sequence_table.h"
#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

constexpr int32_t kBs = 4;
constexpr int32_t kBlocks = 8;

struct Counter : BlockObserver {
  void OnBlocksStored(absl::Span<const StoredBlock> b) override {
    stored += b.size();
  }
  void OnBlocksRemoved(absl::Span<const BlockHash> h,
                       BlockMedium /*medium*/) override {
    removed += h.size();
  }
  void OnAllBlocksCleared() override { ++cleared; }
  size_t stored = 0, removed = 0;
  int cleared = 0;
};

class PrefixCacheUnitTest : public ::testing::Test {
 protected:
  PrefixCacheUnitTest() : pool_(kBlocks), cache_(Opts(&observer_)) {}
  static PrefixCache::Options Opts(BlockObserver* observer) {
    PrefixCache::Options o;
    o.num_blocks = kBlocks;
    o.block_size = kBs;
    o.observer = observer;
    return o;
  }
  // A sequence with `prompt` matched, then every token computed in new blocks
  // and registered, as AddSequence + Reserve + Commit would.
  Sequence& Computed(SequenceId id, const std::vector<TokenId>& prompt) {
    auto seq = std::make_unique<Sequence>();
    seq->id = id;
    cache_.AcquireRoot(ExtraKey{}, *seq);
    cache_.Match(*seq, prompt, pool_);
    pool_.AcquireAll(seq->blocks.data(), seq->blocks.size());
    Sequence& s = sequences_.Insert(std::move(seq));
    s.tokens.assign(prompt.begin() + s.computed, prompt.end());
    const int64_t end = static_cast<int64_t>(prompt.size());
    while (static_cast<int64_t>(s.blocks.size()) * kBs < end)
      s.blocks.push_back(pool_.AllocateFree());
    s.tail_block = s.blocks.back();
    s.reserved = end - s.computed;
    s.hashes.reserve(s.blocks.size());
    cache_.PrepareRegistration(s, pool_);
    s.computed = end;
    s.reserved = 0;
    cache_.RegisterFilled(s, pool_);
    cache_.Flush();
    return s;
  }

  Counter observer_;
  BlockPool pool_;
  PrefixCache cache_;
  SequenceTable sequences_;
};

TEST_F(PrefixCacheUnitTest, RegistersFullBlocksAndMatchesThem) {
  Sequence& a = Computed(1, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  EXPECT_EQ(a.chained_blocks, 2);
  EXPECT_TRUE(pool_.hashed(a.blocks[0]));
  EXPECT_TRUE(pool_.hashed(a.blocks[1]));
  EXPECT_FALSE(pool_.hashed(a.blocks[2]));  // Partial.
  EXPECT_EQ(observer_.stored, 2u);
  EXPECT_EQ(cache_.RegisteredHashes().size(), 2u);
  // The same prompt matches both full blocks (never the last token).
  Sequence& b = Computed(2, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  EXPECT_EQ(b.prefix_blocks, 2);
  EXPECT_EQ(b.blocks[0], a.blocks[0]);
  EXPECT_EQ(observer_.stored, 2u);  // Nothing new.
  EXPECT_TRUE(cache_.ValidateIndex(pool_).ok());
  EXPECT_TRUE(cache_.ValidateRoots(sequences_).ok());
  EXPECT_TRUE(cache_.ValidateChain(a, "a: ").ok());
}

TEST_F(PrefixCacheUnitTest, EvictUnregistersTheOldestCachedBlock) {
  Sequence& a = Computed(1, {1, 2, 3, 4, 5});
  const BlockId first = a.blocks[0];
  for (BlockId b : a.blocks) pool_.Release(b);
  a.blocks.clear();
  ASSERT_EQ(pool_.num_cached(), 1);
  EXPECT_EQ(cache_.Evict(pool_), first);
  cache_.Flush();
  EXPECT_EQ(observer_.removed, 1u);
  EXPECT_EQ(cache_.stats().evictions, 1);
  EXPECT_TRUE(cache_.RegisteredHashes().empty());
}

TEST_F(PrefixCacheUnitTest, ClearDropsEverythingAndCutsLiveChains) {
  Sequence& a = Computed(1, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  cache_.Clear(pool_, sequences_);
  EXPECT_EQ(observer_.cleared, 1);
  EXPECT_TRUE(cache_.RegisteredHashes().empty());
  EXPECT_FALSE(pool_.hashed(a.blocks[0]));
  EXPECT_TRUE(cache_.ValidateIndex(pool_).ok());
  // A new sequence with the same prompt hits nothing.
  Sequence& b = Computed(2, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  EXPECT_EQ(b.prefix_blocks, 0);
  EXPECT_EQ(cache_.RegisteredHashes().size(), 2u);
  EXPECT_TRUE(cache_.ValidateRoots(sequences_).ok());
}

}  // namespace
}  // namespace kvcache::internal
