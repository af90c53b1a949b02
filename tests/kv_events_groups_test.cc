// KV events of a KVCacheManager with layer groups (README "KV events", layer
// groups): one BlockStored per block hash when the first table registers it,
// one BlockRemoved when the last table's block for it is evicted, so a
// consumer that replays them holds exactly the hashes some table caches.
// Random operations (adds sharing prefixes, chunked and speculative steps,
// forks, truncations, frees, evictions in a small pool, a reset now and
// then) are replayed by EventSetRebuilder (tests/event_test_util.h) and the
// rebuilt set is compared with the manager's own after every operation.

#include <algorithm>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "tests/event_test_util.h"
#include "tests/group_runner.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int kBlock = 4;

// Layers 0, 2 sliding (window 6), 1 full: three tables (one layer a page).
KVCacheConfig Config(int64_t num_blocks) {
  testing::HybridSpec spec;
  spec.num_layers = 3;
  spec.sliding_layers = {0, 2};
  spec.full_layers = {1};
  spec.window = 6;
  spec.num_blocks = num_blocks;
  spec.block_size = kBlock;
  spec.max_tokens_per_step = 128;
  KVCacheConfig c = testing::HybridConfig(spec);
  c.enable_kv_events = true;
  c.kv_events_queue_capacity = 100000;
  return c;
}

struct Fixture : testing::GroupFixture {
  using GroupFixture::GroupFixture;
  testing::EventSetRebuilder rebuilt;

  // Drains the events into `rebuilt`; the events of each kind, counted.
  absl::Status Drain(std::vector<KVEvent>* events = nullptr) {
    absl::StatusOr<std::vector<KVEventBatch>> batches = manager->TakeEvents();
    if (!batches.ok()) return batches.status();
    for (const KVEventBatch& b : *batches) {
      if (absl::Status st = rebuilt.Apply(b); !st.ok()) return st;
      if (events != nullptr) {
        events->insert(events->end(), b.events.begin(), b.events.end());
      }
    }
    return absl::OkStatus();
  }
};

TEST(GroupEventsTest, OneEventPerHashAcrossTables) {
  Fixture f(Config(64), 1);
  ASSERT_NE(f.manager, nullptr);
  KVCacheManager& m = *f.manager;
  ASSERT_EQ(m.NumBlockTables(), 3);
  ASSERT_TRUE(f.runner->Add(1, f.runner->RandomTokens(10, 50)).ok());
  ASSERT_TRUE(f.runner->Step({1}, {10}).ok());
  // Two full blocks, registered in all three tables: two hashes, stored once.
  std::vector<KVEvent> events;
  ASSERT_TRUE(f.Drain(&events).ok());
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KVEventType::kBlockStored);
  EXPECT_EQ(events[0].block_hashes.size(), 2u);
  EXPECT_FALSE(events[0].has_parent);
  EXPECT_EQ(events[0].token_ids.size(), 8u);
  EXPECT_EQ(f.rebuilt.hashes(KVEventMedium::kDevice),
            testing::ManagerHashes(m, KVEventMedium::kDevice));
  // A fork and its steps register nothing new for the shared blocks.
  ASSERT_TRUE(f.runner->Fork(1, 2).ok());
  ASSERT_TRUE(f.runner->Step({2}, {1}).ok());
  events.clear();
  ASSERT_TRUE(f.Drain(&events).ok());
  EXPECT_TRUE(events.empty());
  // Reset: one AllBlocksCleared, nothing cached; refused while a plan is in
  // flight.
  ReserveRequest r;
  r.sequence = 1;
  r.num_tokens = 1;
  r.new_token_ids = {7};
  absl::StatusOr<StepPlanInfo> plan = m.Reserve({r});
  ASSERT_TRUE(plan.ok()) << plan.status();
  const absl::Status refused = m.ResetPrefixCache();
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.message(), HasSubstr("in flight"));
  ASSERT_TRUE(m.Abort(plan->id).ok());
  ASSERT_TRUE(m.ResetPrefixCache().ok());
  events.clear();
  ASSERT_TRUE(f.Drain(&events).ok());
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KVEventType::kAllBlocksCleared);
  EXPECT_TRUE(testing::ManagerHashes(m, KVEventMedium::kDevice).empty());
  EXPECT_TRUE(f.rebuilt.hashes(KVEventMedium::kDevice).empty());
  ASSERT_TRUE(m.Validate().ok()) << m.Validate();
  // The sequences alive across the reset register nothing more (a
  // truncation does not change that); a new one does, and its prompt gets
  // no hit from before the reset.
  ASSERT_TRUE(f.runner->Truncate(1, 9).ok());
  ASSERT_TRUE(f.runner->Step({1}, {5}).ok());
  events.clear();
  ASSERT_TRUE(f.Drain(&events).ok());
  EXPECT_TRUE(events.empty());
  const std::vector<TokenId> prompt = f.runner->sequences().at(1).tokens;
  EXPECT_EQ(*f.runner->Add(3, prompt), 0);
  ASSERT_TRUE(f.runner->Step({3}, {static_cast<int64_t>(prompt.size())}).ok());
  ASSERT_TRUE(f.Drain().ok());
  EXPECT_EQ(f.rebuilt.hashes(KVEventMedium::kDevice).size(),
            prompt.size() / kBlock);
  EXPECT_EQ(f.rebuilt.hashes(KVEventMedium::kDevice),
            testing::ManagerHashes(m, KVEventMedium::kDevice));
  EXPECT_EQ(m.Metrics().kv_event_batches, 3);
}

TEST(GroupEventsTest, RandomOperationsRebuildTheCachedSet) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  // Small enough that blocks are evicted.
  Fixture f(Config(48), seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  std::mt19937_64 rng(seed);
  auto rand = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  const std::vector<TokenId> base = r.RandomTokens(32, 3);
  std::vector<SequenceId> live;
  SequenceId next = 1;
  int64_t stored = 0, removed = 0, cleared = 0;
  // 400 operations, and up to 4,000 more while none has removed a block
  // (a draw whose resets came before any eviction: 1 in a few hundred).
  for (int op = 0; op < 400 || (removed == 0 && op < 4400); ++op) {
    SCOPED_TRACE(absl::StrCat("operation ", op));
    const int64_t kind = rand(0, 19);
    if (kind < 3 || live.empty()) {
      if (live.size() >= 4) continue;
      std::vector<TokenId> prompt(base.begin(), base.begin() + rand(0, 32));
      const std::vector<TokenId> tail = r.RandomTokens(rand(1, 8), 3);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      absl::StatusOr<int64_t> hit = r.Add(next, prompt);
      ASSERT_TRUE(hit.ok()) << hit.status();
      live.push_back(next++);
    } else if (kind < 13) {
      const SequenceId id = live[rand(0, live.size() - 1)];
      const int64_t len = *m.SequenceLength(id);
      const int64_t known = *m.KnownLength(id);
      const int64_t n = known > len
                            ? rand(1, std::min<int64_t>(known - len, 12))
                            : rand(1, 3);
      std::vector<int64_t> accepted;
      testing::GroupStepOptions o;
      if (rand(0, 3) == 0) {
        accepted.push_back(rand(0, n));
        o.accepted = &accepted;
      }
      const absl::Status st = r.Step({id}, {n}, o);
      if (absl::IsResourceExhausted(st)) {
        const SequenceId gone = live[rand(0, live.size() - 1)];
        ASSERT_TRUE(r.Free(gone).ok());
        live.erase(std::find(live.begin(), live.end(), gone));
      } else {
        ASSERT_TRUE(st.ok()) << st;
      }
    } else if (kind < 15) {
      if (live.size() >= 4) continue;
      ASSERT_TRUE(r.Fork(live[rand(0, live.size() - 1)], next).ok());
      live.push_back(next++);
    } else if (kind < 17) {
      const SequenceId id = live[rand(0, live.size() - 1)];
      const int64_t len = *m.SequenceLength(id);
      // Refused or not, it changes no registration.
      r.Truncate(id, std::max<int64_t>(0, len - rand(0, 6))).IgnoreError();
    } else if (kind < 19) {
      const SequenceId gone = live[rand(0, live.size() - 1)];
      ASSERT_TRUE(r.Free(gone).ok());
      live.erase(std::find(live.begin(), live.end(), gone));
    } else if (rand(0, 4) == 0) {
      ASSERT_TRUE(m.ResetPrefixCache().ok());
    }
    std::vector<KVEvent> events;
    ASSERT_TRUE(f.Drain(&events).ok());
    for (const KVEvent& e : events) {
      stored += e.type == KVEventType::kBlockStored;
      removed += e.type == KVEventType::kBlockRemoved;
      cleared += e.type == KVEventType::kAllBlocksCleared;
    }
    ASSERT_EQ(f.rebuilt.hashes(KVEventMedium::kDevice),
              testing::ManagerHashes(m, KVEventMedium::kDevice));
    ASSERT_TRUE(m.Validate().ok()) << m.Validate();
  }
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  std::printf("%lld stored, %lld removed, %lld cleared events\n",
              static_cast<long long>(stored), static_cast<long long>(removed),
              static_cast<long long>(cleared));
  EXPECT_GT(stored, 0);
  EXPECT_GT(removed, 0);
  EXPECT_EQ(m.Metrics().kv_event_batches_dropped, 0);
}

}  // namespace
}  // namespace kvcache
