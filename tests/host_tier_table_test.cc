// HostTier's lookups (allocator/host_tier.h) against a plain map of the
// hashes stored: random inserts, drops, takes, keeps and reserved inserts,
// with the default filter and with a two-bucket filter that saturates
// (every counter stuck, so Find must fall through to the table).

#include <cstdint>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/host_tier.h"
#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

constexpr int32_t kBlockSize = 4;

class HostTierTable {
 public:
  HostTierTable(int32_t slots, int64_t filter_buckets, uint64_t seed)
      : tier_(slots, kBlockSize, filter_buckets), rng_(seed) {}

  BlockHash RandomHash() { return BlockHash{rng_(), rng_()}; }

  void Insert() {
    TierEntry e;
    e.hash = RandomHash();
    e.content_id = rng_();
    const std::vector<TokenId> tokens(kBlockSize, 7);
    const int32_t slot = tier_.Insert(e, tokens.data());
    stored_[Key(e.hash)] = slot;
  }
  void DropOldest() {
    const int32_t slot = tier_.Oldest();
    ASSERT_GE(slot, 0);
    stored_.erase(Key(tier_.Drop(slot).hash));
  }
  // A random stored slot: taken (pinned) or kept (reserved).
  void TakeOrKeep(bool keep) {
    auto it = stored_.begin();
    std::advance(it, rng_() % stored_.size());
    const int32_t slot = it->second;
    const TierEntry e = keep ? tier_.Keep(slot) : tier_.Take(slot);
    EXPECT_EQ(Key(e.hash), it->first);
    stored_.erase(it);
    (keep ? reserved_ : pinned_).push_back(slot);
  }
  void ReleasePinned() {
    tier_.ReleasePinned();
    pinned_.clear();
  }
  void UnreserveOrStore() {
    if (reserved_.empty()) return;
    const int32_t slot = reserved_.back();
    reserved_.pop_back();
    if (rng_() % 2 == 0) {
      tier_.Unreserve(slot);
      return;
    }
    TierEntry e;
    e.hash = RandomHash();
    const std::vector<TokenId> tokens(kBlockSize, 3);
    tier_.InsertReserved(slot, e, tokens.data());
    stored_[Key(e.hash)] = slot;
  }

  // Every stored hash found in its slot, fresh hashes not found.
  void Check() {
    for (const auto& [key, slot] : stored_) {
      ASSERT_EQ(tier_.Find(BlockHash{key.first, key.second}), slot);
    }
    for (int i = 0; i < 64; ++i) ASSERT_EQ(tier_.Find(RandomHash()), -1);
    ASSERT_EQ(tier_.num_stored(), static_cast<int32_t>(stored_.size()));
    const absl::Status valid = tier_.Validate();
    ASSERT_TRUE(valid.ok()) << valid;
  }

  HostTier& tier() { return tier_; }
  std::mt19937_64& rng() { return rng_; }
  size_t num_stored() const { return stored_.size(); }

 private:
  static std::pair<uint64_t, uint64_t> Key(const BlockHash& h) {
    return {h.low, h.high};
  }
  HostTier tier_;
  std::mt19937_64 rng_;
  std::map<std::pair<uint64_t, uint64_t>, int32_t> stored_;
  std::vector<int32_t> pinned_, reserved_;
};

void RunRandomOps(int32_t slots, int64_t filter_buckets) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed, ", ", slots, " slots, filter ",
                            filter_buckets));
  HostTierTable t(slots, filter_buckets, seed);
  for (int op = 0; op < 20000; ++op) {
    const uint64_t r = t.rng()() % 100;
    if (r < 50) {
      if (!t.tier().HasFreeSlot()) t.DropOldest();
      if (t.tier().HasFreeSlot()) t.Insert();
    } else if (r < 65 && t.num_stored() > 0) {
      t.DropOldest();
    } else if (r < 75 && t.num_stored() > 0) {
      t.TakeOrKeep(/*keep=*/r % 2 == 0);
    } else if (r < 85) {
      t.ReleasePinned();
    } else {
      t.UnreserveOrStore();
    }
    if (op % 500 == 0) {
      ASSERT_NO_FATAL_FAILURE(t.Check());
    }
  }
  ASSERT_NO_FATAL_FAILURE(t.Check());
  // Emptied, nothing is found.
  t.ReleasePinned();
  while (t.num_stored() > 0) t.DropOldest();
  ASSERT_NO_FATAL_FAILURE(t.Check());
}

TEST(HostTierTableTest, FindMatchesAMapOfTheStoredHashes) {
  RunRandomOps(/*slots=*/64, /*filter_buckets=*/0);
  RunRandomOps(/*slots=*/1000, /*filter_buckets=*/0);
}

// Two buckets for every hash: past 255 stored in one it sticks, and lookups
// still answer right through the table, after drops too.
TEST(HostTierTableTest, SaturatedFilterStillFindsEveryHash) {
  RunRandomOps(/*slots=*/1200, /*filter_buckets=*/2);
}

// A filter of several buckets a hash shares counters between hashes:
// dropping one of two hashes in a bucket must keep the other findable.
TEST(HostTierTableTest, SharedBucketsKeepTheirOtherHashes) {
  RunRandomOps(/*slots=*/256, /*filter_buckets=*/4);
}

}  // namespace
}  // namespace kvcache::internal
