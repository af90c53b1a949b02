// BlockHashTable (allocator/block_hash_table.h) against an
// absl::flat_hash_map reference: random FindOrInsert, Find and Erase keep the
// same contents, with keys drawn so that many share a home slot (backward-
// shift deletion must keep every probe run reachable); Touch returns -1 or
// the block of a key the table holds, the block of a key alone at its home
// slot, and -1 in an empty table. KVCACHE_TEST_SEED=<n> reruns one seed.

#include "allocator/block_hash_table.h"

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_hash.h"
#include "gtest/gtest.h"
#include "testing/test_seed.h"

namespace kvcache::internal {
namespace {

TEST(BlockHashTableTest, MatchesAReferenceMapAndTouchReadsAHeldBlock) {
  const uint64_t seed = kvcache::testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed,
                            " (rerun with KVCACHE_TEST_SEED=", seed, ")"));
  std::mt19937_64 rng(seed);
  const int32_t max_entries =
      std::uniform_int_distribution<int32_t>(8, 3000)(rng);
  BlockHashTable table(max_entries, rng());
  // Few distinct low words: many keys collide on low ^ high patterns.
  std::vector<BlockHash> keys(2 * max_entries);
  for (BlockHash& k : keys) {
    k.low = rng() % 64;
    k.high = rng();
  }
  for (const BlockHash& k : keys) EXPECT_EQ(table.Touch(k), -1);

  absl::flat_hash_map<BlockHash, int32_t> ref;
  int32_t next_block = 0;
  for (int op = 0; op < 20000; ++op) {
    const BlockHash& k = keys[rng() % keys.size()];
    const int kind = static_cast<int>(rng() % 3);
    if (kind == 0 && static_cast<int32_t>(ref.size()) < max_entries) {
      const int32_t block = next_block++;
      const int32_t got = table.FindOrInsert(k, block);
      auto it = ref.find(k);
      if (it == ref.end()) {
        ASSERT_EQ(got, -1) << "op " << op;
        ref.emplace(k, block);
      } else {
        ASSERT_EQ(got, it->second) << "op " << op;
      }
    } else if (kind == 1) {
      ASSERT_EQ(table.Erase(k), ref.erase(k) == 1) << "op " << op;
    } else {
      auto it = ref.find(k);
      ASSERT_EQ(table.Find(k), it == ref.end() ? -1 : it->second)
          << "op " << op;
    }
    ASSERT_EQ(table.size(), ref.size()) << "op " << op;
    // Touch reads the home slot: empty, or some held key's block.
    const int32_t touched = table.Touch(keys[rng() % keys.size()]);
    if (touched >= 0) {
      bool held = false;
      for (const auto& [key, block] : ref) held = held || block == touched;
      ASSERT_TRUE(held) << "op " << op << ": Touch gave block " << touched;
    }
  }
  int visited = 0;
  table.ForEach([&](const BlockHash& h, int32_t block) {
    ++visited;
    auto it = ref.find(h);
    ASSERT_NE(it, ref.end());
    EXPECT_EQ(it->second, block);
  });
  EXPECT_EQ(visited, static_cast<int>(ref.size()));

  // A key alone in the table sits at its home slot, which Touch reads.
  BlockHashTable single(max_entries, rng());
  const BlockHash& k = keys[rng() % keys.size()];
  ASSERT_EQ(single.FindOrInsert(k, 7), -1);
  EXPECT_EQ(single.Touch(k), 7);
}

}  // namespace
}  // namespace kvcache::internal
