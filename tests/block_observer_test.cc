// BlockObserver: a recording observer rebuilds the set of registered hashes
// from its calls alone, over thousands of random operations (shared prefixes,
// reserve, commit, abort, fork, free, evictions in a small pool, resets), and
// it must equal the prefix cache's own set after every operation. Also: calls
// are batched (at most one per kind per manager call), what a StoredBlock
// says is right, and ResetPrefixCache's contract. With a host tier the calls
// rebuild the set per medium (device, host), failed tier copies included.

#include "allocator/block_observer.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/block_hash.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

constexpr int32_t kBs = 4;

using HashKey = std::pair<uint64_t, uint64_t>;
HashKey Key(const BlockHash& h) { return {h.low, h.high}; }

class RecordingObserver : public BlockObserver {
 public:
  void OnBlocksStored(absl::Span<const StoredBlock> blocks) override {
    ++stored_calls;
    EXPECT_FALSE(blocks.empty());
    for (const StoredBlock& b : blocks) {
      std::set<HashKey>& set =
          b.medium == BlockMedium::kHost ? host_hashes : hashes;
      EXPECT_TRUE(set.insert(Key(b.hash)).second) << "stored twice";
      EXPECT_EQ(b.tokens.size(), static_cast<size_t>(kBs));
      if (b.medium == BlockMedium::kHost) {
        ++host_stored;
        EXPECT_EQ(hashes.count(Key(b.hash)), 0u) << "in both media";
      }
      EXPECT_TRUE(b.adapter_id == 0 || b.adapter_id == 7) << b.adapter_id;
      if (b.first_in_chain) {
        EXPECT_EQ(b.parent_hash, BlockHash{});
      }
      stored_blocks.push_back(b);
      stored_blocks.back().tokens = {};  // Valid only during the call.
    }
  }
  void OnBlocksRemoved(absl::Span<const BlockHash> removed,
                       BlockMedium medium) override {
    ++removed_calls;
    EXPECT_FALSE(removed.empty());
    std::set<HashKey>& set =
        medium == BlockMedium::kHost ? host_hashes : hashes;
    for (const BlockHash& h : removed)
      EXPECT_EQ(set.erase(Key(h)), 1u) << "removed but never stored";
  }
  void OnAllBlocksCleared() override {
    ++cleared_calls;
    hashes.clear();
    host_hashes.clear();
  }

  std::set<HashKey> hashes;       // Device.
  std::set<HashKey> host_hashes;  // Host tier.
  int host_stored = 0;
  std::vector<StoredBlock> stored_blocks;
  int stored_calls = 0;
  int removed_calls = 0;
  int cleared_calls = 0;
};

std::unique_ptr<BlockManager> Make(int32_t num_blocks, BlockObserver* observer,
                                   BlockHashFunction hash = nullptr,
                                   int32_t host_tier_blocks = 0) {
  BlockManagerOptions o;
  o.host_tier_blocks = host_tier_blocks;
  o.num_blocks = num_blocks;
  o.block_size = kBs;
  o.hash_function_for_testing = hash;
  o.observer = observer;
  return std::move(*BlockManager::Create(o));
}

std::set<HashKey> Registered(const BlockManager& m,
                             BlockMedium medium = BlockMedium::kDevice) {
  std::set<HashKey> out;
  for (const BlockHash& h : m.RegisteredHashesForTesting(medium))
    out.insert(Key(h));
  return out;
}

// A weak hash: only the first token counts, so distinct contents collide.
BlockHash WeakHash(const BlockHash& parent, absl::Span<const TokenId> t) {
  return BlockHash{parent.low * 31 + static_cast<uint64_t>(t[0] % 3), 0};
}

// (hash function, host-tier blocks).
class ObserverRandomTest
    : public ::testing::TestWithParam<std::tuple<BlockHashFunction, int32_t>> {
};

TEST_P(ObserverRandomTest, CallsRebuildTheRegisteredHashes) {
  RecordingObserver obs;
  std::mt19937_64 rng(42);
  const int32_t tier = std::get<1>(GetParam());
  auto m = Make(/*num_blocks=*/40, &obs, std::get<0>(GetParam()), tier);
  int onboard_failures = 0, offload_failures = 0, host_hits = 0;
  // Three base prompts: new sequences share their prefixes.
  std::vector<std::vector<TokenId>> bases(3);
  for (auto& base : bases) {
    for (int i = 0; i < 24; ++i) base.push_back(rng() % 50);
  }
  std::vector<SequenceId> live;
  std::map<uint64_t, std::vector<SequenceId>> plans;
  SequenceId next_id = 1;
  int resets = 0, evictions_seen = 0;
  auto rand = [&](int n) { return static_cast<int>(rng() % n); };
  for (int op = 0; op < 6000; ++op) {
    SCOPED_TRACE(absl::StrCat("op ", op));
    const int before_stored = obs.stored_calls;
    const int before_removed = obs.removed_calls;
    const int kind = rand(100);
    if (kind < 20 && live.size() < 12) {  // Add, sharing a prefix.
      std::vector<TokenId> prompt = bases[rand(3)];
      prompt.resize(1 + rand(24));
      for (int i = rand(6); i > 0; --i) prompt.push_back(rng() % 50);
      ExtraKey extra;
      if (rand(4) == 0) extra.adapter_id = 7;
      if (rand(5) == 0) extra.salt = std::string("s\0t", 3);
      PrefixHitSplit split;
      absl::StatusOr<int64_t> hit =
          m->AddSequence(next_id, prompt, extra, &split);
      ASSERT_TRUE(hit.ok()) << hit.status();
      ASSERT_EQ(*hit, split.device_tokens + split.host_tokens);
      host_hits += split.host_tokens > 0;
      bool onboards = false;
      for (const TierCopy& c : m->tier_copies()) onboards |= c.onboard;
      if (tier > 0 && onboards && rand(8) == 0) {  // The copy failed.
        const std::vector<TierCopy> copies(m->tier_copies().begin(),
                                           m->tier_copies().end());
        m->DropFailedOffloads(copies);
        ASSERT_TRUE(m->DropFailedOnboards(next_id, copies).ok());
        ++onboard_failures;
        ++next_id;
      } else {
        live.push_back(next_id++);
      }
    } else if (kind < 55 && !live.empty()) {  // Reserve a random batch.
      std::vector<ReserveRequest> batch;
      for (SequenceId id : live) {
        if (m->PendingPlan(id) != 0 || rand(2) == 0) continue;
        const int64_t todo = *m->KnownLength(id) - *m->ComputedLength(id);
        ReserveRequest r{id, {}, 0};
        if (todo > 0 && rand(2) == 0) {
          r.num_tokens = 1 + rand(static_cast<int>(todo));
        } else {
          for (int i = 1 + rand(5); i > 0; --i)
            r.new_token_ids.push_back(rand(50));
          r.num_tokens = todo + 1 + rand(r.new_token_ids.size());
        }
        batch.push_back(r);
      }
      if (batch.empty()) continue;
      const int64_t evicted = m->PrefixStats().evictions;
      absl::StatusOr<StepPlan> plan = m->Reserve(batch);
      if (plan.ok() && !m->tier_copies().empty() && rand(8) == 0) {
        m->DropFailedOffloads(m->tier_copies());  // The copy failed.
        ++offload_failures;
      }
      if (plan.ok()) {
        for (const ReserveRequest& r : batch)
          plans[plan->id].push_back(r.sequence);
        if (m->PrefixStats().evictions > evicted) {
          ++evictions_seen;
          if (tier == 0) {
            EXPECT_EQ(obs.removed_calls, before_removed + 1);
          }
        }
      } else {
        ASSERT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted)
            << plan.status();
        // The pool is full: preempt a sequence, as an engine would.
        const size_t k = rand(live.size());
        ASSERT_TRUE(m->Free(live[k]).ok());
        live.erase(live.begin() + k);
      }
    } else if (kind < 80 && !plans.empty()) {  // Commit or abort.
      auto it = std::next(plans.begin(), rand(plans.size()));
      const bool commit = rand(4) != 0;
      ASSERT_TRUE((commit ? m->Commit(it->first) : m->Abort(it->first)).ok());
      plans.erase(it);
    } else if (kind < 88 && !live.empty()) {  // Fork.
      const SequenceId parent = live[rand(live.size())];
      if (m->Fork(parent, next_id).ok()) live.push_back(next_id++);
    } else if (kind < 98 && !live.empty()) {  // Free.
      const size_t k = rand(live.size());
      ASSERT_TRUE(m->Free(live[k]).ok());
      live.erase(live.begin() + k);
    } else {  // Reset.
      const absl::Status s = m->ResetPrefixCache();
      if (plans.empty()) {
        ASSERT_TRUE(s.ok()) << s;
        ++resets;
      } else {
        ASSERT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
      }
    }
    // At most one call of each kind per manager call (without a tier; with
    // one, a call may store on one medium and remove from another).
    if (tier == 0) {
      ASSERT_LE(obs.stored_calls, before_stored + 1);
      ASSERT_LE(obs.removed_calls, before_removed + 1);
    }
    const absl::Status valid = m->Validate();
    ASSERT_TRUE(valid.ok()) << valid;
    ASSERT_EQ(obs.hashes, Registered(*m));
    ASSERT_EQ(obs.host_hashes, Registered(*m, BlockMedium::kHost));
    ASSERT_LE(m->HostTierUsage().stored_blocks, tier);
  }
  EXPECT_GT(obs.stored_calls, 100);
  EXPECT_GT(evictions_seen, 20);
  EXPECT_GT(resets, 3);
  EXPECT_EQ(obs.cleared_calls, resets);
  if (tier > 0) {
    EXPECT_GT(obs.host_stored, 50);
    EXPECT_GT(host_hits, 5);
    EXPECT_GT(m->PrefixStats().host_evictions, 5);
    EXPECT_GT(onboard_failures + offload_failures, 3);
  }
}

INSTANTIATE_TEST_SUITE_P(Hashes, ObserverRandomTest,
                         ::testing::Combine(::testing::Values(nullptr,
                                                              &WeakHash),
                                            ::testing::Values(0, 12)));

// Creates `id` with `prompt` and computes all of it in one step.
void Compute(BlockManager& m, SequenceId id, const std::vector<TokenId>& prompt,
             const ExtraKey& extra = {}) {
  absl::StatusOr<int64_t> hit = m.AddSequence(id, prompt, extra);
  ASSERT_TRUE(hit.ok()) << hit.status();
  auto plan = m.Reserve(
      {ReserveRequest{id, {}, static_cast<int64_t>(prompt.size()) - *hit}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(m.Commit(plan->id).ok());
}

TEST(BlockObserverTest, StoredBlocksDescribeTheChain) {
  RecordingObserver obs;
  auto m = Make(16, &obs);
  const std::vector<TokenId> prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  ExtraKey extra{7, "secret"};
  Compute(*m, 1, prompt, extra);
  ASSERT_EQ(obs.stored_calls, 1);  // Both full blocks in one call.
  ASSERT_EQ(obs.stored_blocks.size(), 2u);
  const StoredBlock& a = obs.stored_blocks[0];
  const StoredBlock& b = obs.stored_blocks[1];
  EXPECT_TRUE(a.first_in_chain);
  EXPECT_FALSE(b.first_in_chain);
  EXPECT_EQ(b.parent_hash, a.hash);
  EXPECT_EQ(a.adapter_id, 7);
  const auto table = *m->BlockTable(1);
  EXPECT_EQ(a.block, table[0]);
  EXPECT_EQ(b.block, table[1]);
  EXPECT_NE(a.hash, b.hash);
  // Same content again: a hit, nothing stored.
  Compute(*m, 2, prompt, extra);
  EXPECT_EQ(obs.stored_calls, 1);
}

TEST(BlockObserverTest, StoredTokensAreTheBlocksOwn) {
  struct TokenObserver : RecordingObserver {
    void OnBlocksStored(absl::Span<const StoredBlock> blocks) override {
      for (const StoredBlock& b : blocks)
        tokens.emplace_back(b.tokens.begin(), b.tokens.end());
      RecordingObserver::OnBlocksStored(blocks);
    }
    std::vector<std::vector<TokenId>> tokens;
  } obs;
  auto m = Make(16, &obs);
  Compute(*m, 1, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  ASSERT_EQ(obs.tokens.size(), 2u);
  EXPECT_EQ(obs.tokens[0], (std::vector<TokenId>{1, 2, 3, 4}));
  EXPECT_EQ(obs.tokens[1], (std::vector<TokenId>{5, 6, 7, 8}));
}

TEST(BlockObserverTest, EvictionsOfOneReserveComeInOneCall) {
  RecordingObserver obs;
  auto m = Make(8, &obs);
  Compute(*m, 1, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13});  // 4 blocks.
  ASSERT_TRUE(m->Free(1).ok());                                 // 3 cached.
  ASSERT_EQ(obs.hashes.size(), 3u);
  ASSERT_TRUE(m->AddSequence(2, std::vector<TokenId>(28, 99)).ok());
  auto plan = m->Reserve({ReserveRequest{2, {}, 28}});  // 7 blocks: evicts 2.
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(obs.removed_calls, 1);
  EXPECT_EQ(obs.hashes.size(), 1u);
  EXPECT_EQ(obs.hashes, Registered(*m));
}

TEST(ResetPrefixCacheTest, FailsWhileAPlanIsInFlight) {
  RecordingObserver obs;
  auto m = Make(16, &obs);
  ASSERT_TRUE(m->AddSequence(1, {1, 2, 3, 4, 5}).ok());
  auto plan = m->Reserve({ReserveRequest{1, {}, 5}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(m->ResetPrefixCache().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(obs.cleared_calls, 0);
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_TRUE(m->ResetPrefixCache().ok());
  EXPECT_EQ(obs.cleared_calls, 1);
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
}

TEST(ResetPrefixCacheTest, DropsCachedAndLiveRegistrations) {
  RecordingObserver obs;
  auto m = Make(16, &obs);
  const std::vector<TokenId> a = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const std::vector<TokenId> b = {11, 12, 13, 14, 15, 16, 17, 18, 19};
  Compute(*m, 1, a);
  Compute(*m, 2, b);
  ASSERT_TRUE(m->Free(1).ok());  // a's 2 full blocks cached; b's in use.
  ASSERT_EQ(m->Usage().cached_blocks, 2);
  const int32_t free_before = m->Usage().free_blocks;
  ASSERT_TRUE(m->ResetPrefixCache().ok());
  EXPECT_EQ(m->Usage().cached_blocks, 0);
  EXPECT_EQ(m->Usage().free_blocks, free_before + 2);
  EXPECT_TRUE(m->RegisteredHashesForTesting().empty());
  EXPECT_TRUE(obs.hashes.empty());
  EXPECT_EQ(obs.removed_calls, 0);  // AllBlocksCleared subsumes them.
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
  // No hit on either, cached before or in use.
  EXPECT_EQ(*m->AddSequence(3, a), 0);
  EXPECT_EQ(*m->AddSequence(4, b), 0);
  // Sequence 2, alive across the reset, registers none of its later blocks;
  // a sequence made after it does.
  const int stored = obs.stored_calls;
  auto plan = m->Reserve({ReserveRequest{2, {20, 21, 22, 23}, 4}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_EQ(obs.stored_calls, stored);
  plan = m->Reserve({ReserveRequest{3, {}, 9}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(m->Commit(plan->id).ok());
  EXPECT_EQ(obs.stored_calls, stored + 1);
  EXPECT_EQ(obs.hashes, Registered(*m));
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
  ASSERT_TRUE(m->Free(2).ok());
  ASSERT_TRUE(m->Free(3).ok());
  EXPECT_EQ(*m->AddSequence(5, a), 8);  // Sequence 3's blocks hit again.
  EXPECT_TRUE(m->Validate().ok()) << m->Validate();
}

TEST(ResetPrefixCacheTest, WithoutPrefixCachingOrObserverIsANoOp) {
  BlockManagerOptions o;
  o.num_blocks = 8;
  o.block_size = kBs;
  o.enable_prefix_caching = false;
  auto m = std::move(*BlockManager::Create(o));
  ASSERT_TRUE(m->AddSequence(1, {1, 2, 3, 4, 5}).ok());
  EXPECT_TRUE(m->ResetPrefixCache().ok());
  EXPECT_TRUE(m->Validate().ok());
  auto n = Make(8, nullptr);
  Compute(*n, 1, {1, 2, 3, 4, 5});
  EXPECT_TRUE(n->ResetPrefixCache().ok());
  EXPECT_TRUE(n->Validate().ok()) << n->Validate();
}

}  // namespace
}  // namespace kvcache
