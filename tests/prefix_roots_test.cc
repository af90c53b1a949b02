// The prefix index's roots (one per extra key: adapter id and salt) are
// reference counted by the sequences and registered blocks that use them, so
// the index stays bounded however many distinct salts come and go (issue #12
// item 7: 100,000 add/free cycles with distinct 1 KB salts left 112 MB).

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

std::unique_ptr<BlockManager> Make(int32_t num_blocks) {
  BlockManagerOptions o;
  o.num_blocks = num_blocks;
  o.block_size = 4;
  return std::move(*BlockManager::Create(o));
}

// A distinct 1 KB binary salt (zero bytes included).
std::string Salt(int i) {
  std::string salt(1024, '\0');
  const std::string tag = absl::StrCat(i);
  salt.replace(512, tag.size(), tag);
  return salt;
}

TEST(PrefixRootsTest, DistinctSaltsLeaveNoRootBehind) {
  std::unique_ptr<BlockManager> m = Make(16);
  const size_t initial = m->num_prefix_roots();
  const std::vector<TokenId> prompt = {1, 2, 3, 4, 5, 6};
  for (int i = 0; i < 100000; ++i) {
    ExtraKey extra;
    extra.salt = Salt(i);
    extra.adapter_id = i % 3;
    ASSERT_TRUE(m->AddSequence(1, prompt, extra).ok());
    ASSERT_EQ(m->num_prefix_roots(), initial + 1);
    ASSERT_TRUE(m->Free(1).ok());
  }
  EXPECT_EQ(m->num_prefix_roots(), initial);
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
}

TEST(PrefixRootsTest, CachedBlocksKeepTheirRootUntilEvicted) {
  std::unique_ptr<BlockManager> m = Make(8);
  const std::vector<TokenId> prompt = {1, 2, 3, 4, 5};
  auto compute = [&](SequenceId id, const std::string& salt) {
    ExtraKey extra;
    extra.salt = salt;
    absl::StatusOr<int64_t> hit = m->AddSequence(id, prompt, extra);
    EXPECT_TRUE(hit.ok()) << hit.status();
    absl::StatusOr<StepPlan> plan = m->Reserve({{id, {}, 5 - *hit}});
    EXPECT_TRUE(plan.ok()) << plan.status();
    EXPECT_TRUE(m->Commit(plan->id).ok());
    return *hit;
  };
  EXPECT_EQ(compute(1, "tenant"), 0);
  ASSERT_TRUE(m->Fork(1, 2).ok());
  ASSERT_TRUE(m->Free(1).ok());
  ASSERT_TRUE(m->Free(2).ok());
  // The cached first block names the root: a later sequence of the same
  // tenant still hits it.
  EXPECT_EQ(m->num_prefix_roots(), 1u);
  EXPECT_EQ(compute(3, "tenant"), 4);
  ASSERT_TRUE(m->Free(3).ok());
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
  // Many other tenants evict it: the roots stay bounded by the pool.
  for (int i = 0; i < 1000; ++i) {
    compute(100 + i, Salt(i));
    ASSERT_TRUE(m->Free(100 + i).ok());
    ASSERT_LE(m->num_prefix_roots(), 8u);
  }
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
}

TEST(PrefixRootsTest, EmptyAndZeroByteSaltsAreDifferentTenants) {
  std::unique_ptr<BlockManager> m = Make(16);
  const std::vector<TokenId> prompt = {1, 2, 3, 4, 5};
  const std::vector<std::string> salts = {
      "", std::string(1, '\0'), std::string(2, '\0'), std::string("\0Alice", 6),
      std::string("\0Bob", 4)};
  SequenceId id = 1;
  for (const std::string& salt : salts) {
    ExtraKey extra;
    extra.salt = salt;
    absl::StatusOr<int64_t> hit = m->AddSequence(id, prompt, extra);
    ASSERT_TRUE(hit.ok());
    EXPECT_EQ(*hit, 0) << "salt of " << salt.size() << " bytes";
    absl::StatusOr<StepPlan> plan = m->Reserve({{id, {}, 5}});
    ASSERT_TRUE(plan.ok());
    ASSERT_TRUE(m->Commit(plan->id).ok());
    ++id;
  }
  EXPECT_EQ(m->num_prefix_roots(), salts.size());
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
}

}  // namespace
}  // namespace kvcache
