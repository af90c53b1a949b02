// KV events through KVCacheManager (README "KV events"): what TakeEvents
// returns for stores, evictions and resets, checked against hashes computed
// independently from the tokens; the bounded queue's drop-oldest policy;
// ResetPrefixCache (with a host tier too); the config's checks; the msgpack
// layout, decoded field by field; and 10,000 random operations (without and
// with a host tier) whose events alone rebuild the manager's sets of cached
// hashes per medium.

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "allocator/block_hash.h"
#include "api/kv_cache_manager.h"
#include "events/external_hash.h"
#include "events/msgpack_encoder.h"
#include "gtest/gtest.h"
#include "msgpack.hpp"
#include "tests/event_test_util.h"

namespace kvcache {
namespace {

using testing::EventSetRebuilder;
using testing::ManagerHashes;
using testing::RandomCacheOps;
using testing::RunStep;
using testing::SmallEventConfig;

constexpr int32_t kBs = 4;

std::vector<TokenId> RandomTokens(std::mt19937_64& rng, size_t n) {
  std::vector<TokenId> t(n);
  for (TokenId& x : t) x = static_cast<TokenId>(rng() % 100000);
  return t;
}

// The reference: the chained hashes of a prompt's full blocks, external form.
std::vector<uint64_t> ExpectedHashes(const std::vector<TokenId>& prompt,
                                     const ExtraKey& extra, size_t blocks) {
  std::vector<uint64_t> out;
  BlockHash h = HashExtraKey(extra.adapter_id, extra.salt);
  for (size_t b = 0; b < blocks; ++b) {
    h = HashBlock(h, absl::MakeConstSpan(prompt).subspan(b * kBs, kBs));
    out.push_back(h.low);
  }
  return out;
}

std::unique_ptr<KVCacheManager> Make(const KVCacheConfig& config) {
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
      KVCacheManager::Create(config);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

std::vector<KVEventBatch> Take(KVCacheManager& m) {
  absl::StatusOr<std::vector<KVEventBatch>> b = m.TakeEvents();
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : std::vector<KVEventBatch>{};
}

TEST(KvEventsTest, OffByDefault) {
  KVCacheConfig c = SmallEventConfig(16, kBs);
  c.enable_kv_events = false;
  auto m = Make(c);
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(1);
  ASSERT_TRUE(m->AddSequence(1, RandomTokens(rng, 9)).ok());
  ASSERT_TRUE(RunStep(*m, 1, 9).ok());
  EXPECT_TRUE(Take(*m).empty());
  EXPECT_EQ(m->Metrics().kv_event_batches, 0);
  EXPECT_TRUE(m->ResetPrefixCache().ok());
  EXPECT_TRUE(Take(*m).empty());
}

TEST(KvEventsTest, StoredChainsCarryHashesTokensAndParents) {
  auto m = Make(SmallEventConfig(32, kBs));
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<TokenId> prompt = RandomTokens(rng, 3 * kBs + 2);
  ExtraKey extra;
  extra.adapter_id = 1 + static_cast<int64_t>(rng() % 1000);
  extra.salt = "tenant-" + std::to_string(rng());
  const std::vector<uint64_t> want = ExpectedHashes(prompt, extra, 3);

  // The first two blocks, then the rest: two stores, the second chained to
  // the first's last block.
  ASSERT_TRUE(m->AddSequence(1, prompt, extra).ok());
  ASSERT_TRUE(RunStep(*m, 1, 2 * kBs + 1).ok());
  ASSERT_TRUE(RunStep(*m, 1, kBs + 1).ok());
  std::vector<KVEventBatch> batches = Take(*m);
  ASSERT_EQ(batches.size(), 2u);
  for (size_t i = 0; i < batches.size(); ++i) {
    EXPECT_EQ(batches[i].sequence, i);
    EXPECT_GT(batches[i].timestamp, 1.6e9);
    ASSERT_EQ(batches[i].events.size(), 1u);
  }
  const KVEvent& first = batches[0].events[0];
  EXPECT_EQ(first.type, KVEventType::kBlockStored);
  EXPECT_EQ(first.medium, KVEventMedium::kDevice);
  EXPECT_EQ(first.block_hashes,
            std::vector<uint64_t>(want.begin(), want.begin() + 2));
  EXPECT_FALSE(first.has_parent);  // Its parent is the extra key: secret.
  EXPECT_EQ(first.token_ids,
            std::vector<TokenId>(prompt.begin(), prompt.begin() + 2 * kBs));
  EXPECT_EQ(first.block_size, kBs);
  EXPECT_EQ(first.adapter_id, extra.adapter_id);
  const KVEvent& second = batches[1].events[0];
  EXPECT_EQ(second.block_hashes, std::vector<uint64_t>{want[2]});
  EXPECT_TRUE(second.has_parent);
  EXPECT_EQ(second.parent_block_hash, want[1]);
  EXPECT_EQ(second.token_ids, std::vector<TokenId>(prompt.begin() + 2 * kBs,
                                                   prompt.begin() + 3 * kBs));

  // A prefix hit registers nothing new; its fresh block chains to the hit.
  std::vector<TokenId> longer(prompt.begin(), prompt.begin() + 3 * kBs);
  const std::vector<TokenId> tail = RandomTokens(rng, kBs + 1);
  longer.insert(longer.end(), tail.begin(), tail.end());
  absl::StatusOr<int64_t> hit = m->AddSequence(2, longer, extra);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ(*hit, 3 * kBs);
  EXPECT_TRUE(Take(*m).empty());
  ASSERT_TRUE(RunStep(*m, 2, kBs + 1).ok());
  batches = Take(*m);
  ASSERT_EQ(batches.size(), 1u);
  EXPECT_EQ(batches[0].sequence, 2u);
  ASSERT_EQ(batches[0].events.size(), 1u);
  EXPECT_EQ(batches[0].events[0].parent_block_hash, want[2]);
  EXPECT_EQ(batches[0].events[0].block_hashes,
            std::vector<uint64_t>{ExpectedHashes(longer, extra, 4)[3]});
}

TEST(KvEventsTest, EvictionsAreRemovedEventsOldestFirst) {
  auto m = Make(SmallEventConfig(4, kBs));
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<TokenId> a = RandomTokens(rng, 2 * kBs + 1);
  ASSERT_TRUE(m->AddSequence(1, a).ok());
  ASSERT_TRUE(RunStep(*m, 1, 2 * kBs + 1).ok());
  ASSERT_TRUE(m->Free(1).ok());  // Its two full blocks stay cached.
  const std::vector<uint64_t> cached = ExpectedHashes(a, {}, 2);
  EXPECT_EQ(ManagerHashes(*m, KVEventMedium::kDevice),
            std::set<uint64_t>(cached.begin(), cached.end()));
  (void)Take(*m);
  // Four fresh blocks: both cached ones are evicted, the chain's tail first.
  ASSERT_TRUE(m->AddSequence(2, RandomTokens(rng, 4 * kBs - 1)).ok());
  ASSERT_TRUE(RunStep(*m, 2, 4 * kBs - 1).ok());
  const std::vector<KVEventBatch> batches = Take(*m);
  ASSERT_GE(batches.size(), 1u);
  const KVEvent& removed = batches[0].events[0];
  EXPECT_EQ(removed.type, KVEventType::kBlockRemoved);
  EXPECT_EQ(removed.medium, KVEventMedium::kDevice);
  EXPECT_EQ(removed.block_hashes,
            (std::vector<uint64_t>{cached[1], cached[0]}));
}

TEST(KvEventsTest, ResetEmitsAllBlocksClearedAndRefusesPlansInFlight) {
  auto m = Make(SmallEventConfig(16, kBs));
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<TokenId> p = RandomTokens(rng, 2 * kBs + 1);
  ASSERT_TRUE(m->AddSequence(1, p).ok());
  ASSERT_TRUE(RunStep(*m, 1, 2 * kBs + 1).ok());
  ASSERT_TRUE(m->AddSequence(2, RandomTokens(rng, 3)).ok());
  (void)Take(*m);

  ReserveRequest r;
  r.sequence = 2;
  r.num_tokens = 3;
  absl::StatusOr<StepPlanInfo> plan = m->Reserve({r});
  ASSERT_TRUE(plan.ok());
  const absl::Status refused = m->ResetPrefixCache();
  EXPECT_TRUE(absl::IsFailedPrecondition(refused)) << refused;
  EXPECT_NE(refused.message().find("in flight"), std::string::npos);
  EXPECT_TRUE(Take(*m).empty());  // Nothing changed.
  EXPECT_EQ(*m->PeekPrefix(p), 2 * kBs);
  ASSERT_TRUE(m->Abort(plan->id).ok());

  ASSERT_TRUE(m->ResetPrefixCache().ok());
  const std::vector<KVEventBatch> batches = Take(*m);
  ASSERT_EQ(batches.size(), 1u);
  ASSERT_EQ(batches[0].events.size(), 1u);
  EXPECT_EQ(batches[0].events[0].type, KVEventType::kAllBlocksCleared);
  EXPECT_EQ(*m->PeekPrefix(p), 0);
  EXPECT_TRUE(ManagerHashes(*m, KVEventMedium::kDevice).empty());
  EXPECT_TRUE(m->Validate().ok());
}

TEST(KvEventsTest, FullQueueDropsTheOldestAndCountsIt) {
  KVCacheConfig c = SmallEventConfig(64, kBs);
  c.kv_events_queue_capacity = 2;
  auto m = Make(c);
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(std::random_device{}());
  const int kBatches = 5 + static_cast<int>(rng() % 5);
  for (int i = 0; i < kBatches; ++i) {
    ASSERT_TRUE(m->AddSequence(i, RandomTokens(rng, kBs + 1)).ok());
    ASSERT_TRUE(RunStep(*m, i, kBs + 1).ok());
  }
  const std::vector<KVEventBatch> batches = Take(*m);
  ASSERT_EQ(batches.size(), 2u);
  EXPECT_EQ(batches[0].sequence, static_cast<uint64_t>(kBatches - 2));
  EXPECT_EQ(batches[1].sequence, static_cast<uint64_t>(kBatches - 1));
  const MetricsSnapshot metrics = m->Metrics();
  EXPECT_EQ(metrics.kv_event_batches, kBatches);
  EXPECT_EQ(metrics.kv_event_batches_dropped, kBatches - 2);
  EXPECT_NE(m->MetricsText().find("kvcache_kv_event_batches_dropped_total " +
                                  std::to_string(kBatches - 2)),
            std::string::npos);
}

TEST(KvEventsTest, ConfigChecksNameTheField) {
  struct Case {
    void (*edit)(KVCacheConfig&);
    const char* want;
  };
  const Case cases[] = {
      {[](KVCacheConfig& c) { c.kv_events_queue_capacity = 0; },
       "kv_events_queue_capacity 0"},
      {[](KVCacheConfig& c) { c.kv_events_replay_batches = -1; },
       "kv_events_replay_batches -1"},
      {[](KVCacheConfig& c) { c.kv_events_data_parallel_rank = -3; },
       "kv_events_data_parallel_rank -3"},
      {[](KVCacheConfig& c) {
         c.enable_kv_events = false;
         c.kv_events_endpoint = "tcp://127.0.0.1:1";
       },
       "enable_kv_events is false"},
      {[](KVCacheConfig& c) { c.kv_events_replay_endpoint = "tcp://*:1"; },
       "without kv_events_endpoint"},
      {[](KVCacheConfig& c) { c.kv_events_endpoint = "nonsense://x"; },
       "kv_events_endpoint 'nonsense://x' cannot be bound"},
  };
  for (const Case& k : cases) {
    KVCacheConfig c = SmallEventConfig(16, kBs);
    k.edit(c);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    ASSERT_FALSE(m.ok()) << k.want;
    EXPECT_TRUE(absl::IsInvalidArgument(m.status())) << m.status();
    EXPECT_NE(m.status().message().find(k.want), std::string::npos)
        << m.status();
  }
}

// Decodes the payload with msgpack's own unpacker and checks vLLM's field
// order: [ts, [event...], dp_rank], an event [tag, fields...].
TEST(KvEventsTest, MsgpackLayoutIsVllms) {
  KVEventBatch batch;
  batch.sequence = 9;
  batch.timestamp = 1234.5;
  KVEvent stored;
  stored.block_hashes = {~uint64_t{0}, 42};
  stored.has_parent = true;
  stored.parent_block_hash = uint64_t{1} << 63;
  stored.token_ids = {1, 2, 3, 4, 5, 6, 7, -8};
  stored.block_size = 4;
  stored.adapter_id = 0;
  stored.medium = KVEventMedium::kHost;
  KVEvent removed;
  removed.type = KVEventType::kBlockRemoved;
  removed.block_hashes = {7};
  KVEvent cleared;
  cleared.type = KVEventType::kAllBlocksCleared;
  batch.events = {stored, removed, cleared};
  const std::string payload = internal::EncodeEventBatch(batch, 3);

  msgpack::object_handle oh = msgpack::unpack(payload.data(), payload.size());
  const msgpack::object& o = oh.get();
  ASSERT_EQ(o.type, msgpack::type::ARRAY);
  ASSERT_EQ(o.via.array.size, 3u);
  EXPECT_EQ(o.via.array.ptr[0].as<double>(), 1234.5);
  EXPECT_EQ(o.via.array.ptr[2].as<int>(), 3);
  const msgpack::object& events = o.via.array.ptr[1];
  ASSERT_EQ(events.via.array.size, 3u);
  const msgpack::object* s = events.via.array.ptr[0].via.array.ptr;
  ASSERT_EQ(events.via.array.ptr[0].via.array.size, 7u);
  EXPECT_EQ(s[0].as<std::string>(), "BlockStored");
  EXPECT_EQ(s[1].as<std::vector<uint64_t>>(), stored.block_hashes);
  EXPECT_EQ(s[2].as<uint64_t>(), stored.parent_block_hash);
  EXPECT_EQ(s[3].as<std::vector<int32_t>>(), stored.token_ids);
  EXPECT_EQ(s[4].as<int>(), 4);
  EXPECT_TRUE(s[5].is_nil());  // lora_id: adapter 0 is none.
  EXPECT_EQ(s[6].as<std::string>(), "CPU");
  const msgpack::object* r = events.via.array.ptr[1].via.array.ptr;
  ASSERT_EQ(events.via.array.ptr[1].via.array.size, 3u);
  EXPECT_EQ(r[0].as<std::string>(), "BlockRemoved");
  EXPECT_EQ(r[1].as<std::vector<uint64_t>>(), std::vector<uint64_t>{7});
  EXPECT_EQ(r[2].as<std::string>(), "GPU");
  ASSERT_EQ(events.via.array.ptr[2].via.array.size, 1u);
  EXPECT_EQ(events.via.array.ptr[2].via.array.ptr[0].as<std::string>(),
            "AllBlocksCleared");
}

// 10,000 random operations with evictions and resets (and, with a host tier
// of `tier_blocks` blocks, tier moves: offloads, onboards, the tier's own
// evictions; more operations while onboards are still few): the events, taken in pieces, rebuild exactly the manager's
// cached hashes of each medium; no payload carries the secret salt's bytes.
void RandomOpsRebuildTheCachedSets(int64_t tier_blocks) {
  auto m = Make(SmallEventConfig(48, kBs, tier_blocks));
  ASSERT_NE(m, nullptr);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::string salt(16, '\0');
  for (char& ch : salt) ch = static_cast<char>(rng());
  RandomCacheOps ops(*m, seed, salt);
  EventSetRebuilder rebuilt;
  int64_t removed = 0, cleared = 0, host_stored = 0, host_removed = 0;
  auto drain = [&]() {
    for (const KVEventBatch& b : Take(*m)) {
      const absl::Status s = rebuilt.Apply(b);
      ASSERT_TRUE(s.ok()) << s;
      for (const KVEvent& e : b.events) {
        removed += e.type == KVEventType::kBlockRemoved;
        cleared += e.type == KVEventType::kAllBlocksCleared;
        if (e.medium == KVEventMedium::kHost) {
          host_stored += e.type == KVEventType::kBlockStored;
          host_removed += e.type == KVEventType::kBlockRemoved;
        }
      }
      const std::string payload = internal::EncodeEventBatch(b, 0);
      ASSERT_EQ(
          std::search(payload.begin(), payload.end(), salt.begin(), salt.end()),
          payload.end());
    }
  };
  auto op = [&](int i) {
    const absl::Status s = ops.Op();
    ASSERT_TRUE(s.ok()) << "op " << i << ": " << s;
    if (i == 3000 || i == 7000) {
      ASSERT_TRUE(m->ResetPrefixCache().ok());
    }
    if (rng() % 50 == 0) {
      drain();
      ASSERT_EQ(rebuilt.hashes(KVEventMedium::kDevice),
                ManagerHashes(*m, KVEventMedium::kDevice))
          << "after op " << i;
      ASSERT_EQ(rebuilt.hashes(KVEventMedium::kHost),
                ManagerHashes(*m, KVEventMedium::kHost))
          << "after op " << i;
    }
  };
  int i = 0;
  for (; i < 10000; ++i) {
    op(i);
    if (::testing::Test::HasFatalFailure()) return;
  }
  // With a tier, a run whose draws onboarded little (how many depends on
  // when the background copies finish) goes on, up to 20,000 more ops, until
  // the tier has moved blocks both ways often enough to count as exercised.
  for (; tier_blocks > 0 && m->Metrics().tier_onboards <= 10 && i < 30000;
       ++i) {
    op(i);
    if (::testing::Test::HasFatalFailure()) return;
  }
  drain();
  EXPECT_EQ(rebuilt.hashes(KVEventMedium::kDevice),
            ManagerHashes(*m, KVEventMedium::kDevice));
  EXPECT_EQ(rebuilt.hashes(KVEventMedium::kHost),
            ManagerHashes(*m, KVEventMedium::kHost));
  EXPECT_GT(removed, 100);  // Evictions were exercised...
  EXPECT_EQ(cleared, 2);    // ...and both resets.
  const MetricsSnapshot metrics = m->Metrics();
  if (tier_blocks > 0) {  // ...and tier moves both ways.
    EXPECT_GT(host_stored, 100);
    EXPECT_GT(host_removed, 10);
    EXPECT_GT(metrics.tier_onboards, 10);
    EXPECT_FALSE(ManagerHashes(*m, KVEventMedium::kHost).empty());
  } else {
    EXPECT_EQ(host_stored + host_removed, 0);
  }
  EXPECT_EQ(metrics.kv_event_batches_dropped, 0);
  EXPECT_EQ(rebuilt.batches(), static_cast<uint64_t>(metrics.kv_event_batches));
  EXPECT_TRUE(m->Validate().ok());
}

TEST(KvEventsTest, RandomOpsEventsRebuildTheCachedSet) {
  RandomOpsRebuildTheCachedSets(0);
}

TEST(KvEventsTest, RandomOpsWithAHostTierRebuildEveryMedium) {
  RandomOpsRebuildTheCachedSets(16);
}

// ResetPrefixCache with a host tier: one AllBlocksCleared covers both media,
// the tier's slots are all freed (it fills to capacity again afterwards),
// no hash of either medium is left, and the manager stays consistent.
TEST(KvEventsTest, ResetClearsTheHostTierAndReleasesItsSlots) {
  constexpr int64_t kTier = 6;
  KVCacheConfig config = SmallEventConfig(8, kBs, kTier);
  // Every slot stored when full (copies ahead would reserve some).
  config.tier_offload_ahead_blocks = 0;
  auto m = Make(config);
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(std::random_device{}());
  // Fills the device with cached blocks of fresh prompts, evicting the older
  // ones to the tier, until the tier is full.
  SequenceId next = 1;
  auto fill = [&]() {
    for (int round = 0; round < 40; ++round) {
      const std::vector<TokenId> prompt = RandomTokens(rng, 2 * kBs);
      ASSERT_TRUE(m->AddSequence(next, prompt).ok());
      ASSERT_TRUE(RunStep(*m, next, 2 * kBs).ok());
      ASSERT_TRUE(m->Free(next).ok());
      ++next;
    }
  };
  fill();
  ASSERT_EQ(m->Metrics().host_tier_blocks_stored, kTier);
  ASSERT_EQ(ManagerHashes(*m, KVEventMedium::kHost).size(),
            static_cast<size_t>(kTier));
  EventSetRebuilder rebuilt;
  for (const KVEventBatch& b : Take(*m)) ASSERT_TRUE(rebuilt.Apply(b).ok());
  ASSERT_EQ(rebuilt.hashes(KVEventMedium::kHost).size(),
            static_cast<size_t>(kTier));

  ASSERT_TRUE(m->ResetPrefixCache().ok());
  const std::vector<KVEventBatch> reset = Take(*m);
  ASSERT_EQ(reset.size(), 1u);
  ASSERT_EQ(reset[0].events.size(), 1u);
  EXPECT_EQ(reset[0].events[0].type, KVEventType::kAllBlocksCleared);
  ASSERT_TRUE(rebuilt.Apply(reset[0]).ok());
  EXPECT_TRUE(rebuilt.hashes(KVEventMedium::kHost).empty());
  EXPECT_TRUE(ManagerHashes(*m, KVEventMedium::kHost).empty());
  EXPECT_TRUE(ManagerHashes(*m, KVEventMedium::kDevice).empty());
  MetricsSnapshot metrics = m->Metrics();
  EXPECT_EQ(metrics.host_tier_blocks_stored, 0);
  EXPECT_EQ(metrics.blocks_cached, 0);
  EXPECT_EQ(metrics.blocks_free, metrics.blocks_total);
  ASSERT_TRUE(m->Validate().ok());

  // Every slot came back: the tier fills to capacity again, and the events
  // still rebuild both media.
  fill();
  for (const KVEventBatch& b : Take(*m)) ASSERT_TRUE(rebuilt.Apply(b).ok());
  metrics = m->Metrics();
  EXPECT_EQ(metrics.host_tier_blocks_stored, kTier);
  EXPECT_EQ(rebuilt.hashes(KVEventMedium::kHost),
            ManagerHashes(*m, KVEventMedium::kHost));
  EXPECT_EQ(rebuilt.hashes(KVEventMedium::kDevice),
            ManagerHashes(*m, KVEventMedium::kDevice));
  EXPECT_TRUE(m->Validate().ok());
}

}  // namespace
}  // namespace kvcache
