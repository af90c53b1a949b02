#include "allocator/block_pool.h"

#include <vector>

#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

TEST(BlockPoolTest, StartsAllFree) {
  BlockPool pool(4);
  EXPECT_EQ(pool.num_blocks(), 4);
  EXPECT_EQ(pool.num_free(), 4);
  EXPECT_EQ(pool.num_cached(), 0);
  EXPECT_EQ(pool.num_used(), 0);
  EXPECT_TRUE(pool.Validate().ok());
}

TEST(BlockPoolTest, AllocateGivesEveryIdOnceThenFreeReturnsIt) {
  BlockPool pool(8);
  std::vector<bool> seen(8, false);
  for (int i = 0; i < 8; ++i) {
    const BlockId b = pool.AllocateFree();
    ASSERT_GE(b, 0);
    ASSERT_LT(b, 8);
    EXPECT_FALSE(seen[b]);
    seen[b] = true;
    EXPECT_EQ(pool.ref_count(b), 1);
    EXPECT_EQ(pool.state(b), BlockState::kInUse);
  }
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_EQ(pool.num_used(), 8);
  ASSERT_TRUE(pool.Validate().ok());
  pool.Release(3);
  EXPECT_EQ(pool.state(3), BlockState::kFree);
  EXPECT_EQ(pool.AllocateFree(), 3);  // Most recently freed first.
  ASSERT_TRUE(pool.Validate().ok());
}

TEST(BlockPoolTest, RefCountsShareAndRelease) {
  BlockPool pool(2);
  const BlockId b = pool.AllocateFree();
  pool.Acquire(b);
  EXPECT_EQ(pool.ref_count(b), 2);
  pool.Release(b);
  EXPECT_EQ(pool.state(b), BlockState::kInUse);
  pool.Release(b);
  EXPECT_EQ(pool.state(b), BlockState::kFree);
  EXPECT_TRUE(pool.Validate().ok());
}

TEST(BlockPoolTest, HashedBlocksAreCachedAndEvictedOldestFirst) {
  BlockPool pool(3);
  const BlockId a = pool.AllocateFree();
  const BlockId b = pool.AllocateFree();
  const BlockId c = pool.AllocateFree();
  for (BlockId x : {a, b, c}) pool.MarkHashed(x);
  pool.Release(b);
  pool.Release(a);
  pool.Release(c);
  EXPECT_EQ(pool.num_cached(), 3);
  ASSERT_TRUE(pool.Validate().ok());
  pool.Acquire(a);  // A cache hit takes it off the LRU list.
  EXPECT_EQ(pool.num_cached(), 2);
  EXPECT_EQ(pool.EvictOldest(), b);
  EXPECT_FALSE(pool.hashed(b));
  pool.Release(a);  // a is now the newest.
  EXPECT_EQ(pool.EvictOldest(), c);
  EXPECT_EQ(pool.EvictOldest(), a);
  EXPECT_EQ(pool.num_used(), 3);
  ASSERT_TRUE(pool.Validate().ok());
  for (BlockId x : {a, b, c}) pool.Release(x);
  EXPECT_EQ(pool.num_free(), 3);
  EXPECT_TRUE(pool.Validate().ok());
}

TEST(BlockPoolTest, ClearHashesFreesCachedAndUnhashesInUse) {
  BlockPool pool(4);
  const BlockId a = pool.AllocateFree();
  const BlockId b = pool.AllocateFree();
  const BlockId c = pool.AllocateFree();
  for (BlockId x : {a, b, c}) pool.MarkHashed(x);
  pool.Release(a);
  pool.Release(b);  // a, b cached; c in use, hashed.
  ASSERT_EQ(pool.num_cached(), 2);
  pool.ClearHashes();
  EXPECT_EQ(pool.num_cached(), 0);
  EXPECT_EQ(pool.num_free(), 3);
  EXPECT_EQ(pool.state(a), BlockState::kFree);
  EXPECT_EQ(pool.state(c), BlockState::kInUse);
  EXPECT_FALSE(pool.hashed(c));
  ASSERT_TRUE(pool.Validate().ok()) << pool.Validate();
  pool.Release(c);  // Unhashed now: straight to the free list.
  EXPECT_EQ(pool.state(c), BlockState::kFree);
  EXPECT_EQ(pool.num_free(), 4);
  EXPECT_TRUE(pool.Validate().ok());
}

}  // namespace
}  // namespace kvcache::internal
