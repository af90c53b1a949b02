// The host tier on the CPU backend (README "Host tier"; the tier is a second
// host pool there, so every path runs in CI): evicted hashed blocks are
// copied to the tier and hits come back bit-exactly, also while the offload
// copy is still in flight; the tier evicts its own oldest; a failed copy
// drops the block and leaks nothing; metrics and Validate across tiers. Every
// case runs with side scales and, for int8/fp8, with inline scales.

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "core/kv_event.h"
#include "core/shortfall.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "storage/tier_copier.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

constexpr int kBs = 4;
constexpr int kHeads = 2, kD = 16, kDv = 8, kLayers = 2;

KVCacheConfig Config(DType cache_dtype, int32_t num_blocks, int tier_blocks,
                     ScalePlacement placement = ScalePlacement::kSide) {
  KVCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_size = kD;
  c.head_size_v = kDv;
  c.block_size = kBs;
  c.cache_dtype = cache_dtype;
  c.scale_placement = placement;
  c.input_dtype = DType::kBFloat16;
  c.num_blocks = num_blocks;
  c.cpu_threads = 1;
  const int64_t block = *BlockBytesAllLayers(c);
  c.host_tier_bytes = tier_blocks * block + block / 2;
  // These tests count the moves of the plain path (every evicted block
  // offloaded and reused at once, no copies ahead); the policy's tests set
  // their own.
  c.tier_offload_min_hits = 0;
  c.tier_offload_max_in_flight_bytes = 0;
  c.tier_hold_offloads = false;
  c.tier_offload_ahead_blocks = 0;
  return c;
}

// A cache dtype and, for int8/fp8, where its scales live (with inline scales
// a block's bytes are its K and V rows of row_pitch bytes, scales inside).
struct Case {
  DType cache_dtype;
  ScalePlacement placement;
};

class HostTierTest : public ::testing::TestWithParam<Case> {
 protected:
  void Make(int32_t num_blocks, int tier_blocks, int32_t graph_max_tokens = 0,
            const std::function<void(KVCacheConfig&)>& policy = {}) {
    KVCacheConfig config = Config(GetParam().cache_dtype, num_blocks,
                                  tier_blocks, GetParam().placement);
    config.graph_max_tokens = graph_max_tokens;
    if (policy) policy(config);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config);
    ASSERT_TRUE(m.ok()) << m.status();
    m_ = *std::move(m);
    copier_ = KVCacheManagerTestPeer::HostTierCopier(*m_);
    ASSERT_NE(copier_, nullptr);
    ASSERT_EQ(m_->Metrics().host_tier_blocks_total, tier_blocks);
  }

  std::vector<int32_t> Prompt(int n) {
    std::vector<int32_t> p(n);
    for (int32_t& t : p) t = static_cast<int32_t>(rng_() % 30000);
    return p;
  }

  // Adds `id` with `prompt` and computes all of it, fresh random K/V.
  PrefixHits Compute(SequenceId id, const std::vector<int32_t>& prompt) {
    PrefixHits hits;
    absl::StatusOr<int64_t> computed = m_->AddSequence(id, prompt, {}, &hits);
    EXPECT_TRUE(computed.ok()) << computed.status();
    if (!computed.ok()) return hits;
    EXPECT_EQ(*computed, hits.device_tokens + hits.host_tokens);
    const int64_t n = static_cast<int64_t>(prompt.size()) - *computed;
    absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{id, {}, n}});
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return hits;
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<uint16_t> k(n * kHeads * kD), v(n * kHeads * kDv);
      std::normal_distribution<float> normal;
      for (uint16_t& x : k) x = testing::FloatToBf16(normal(rng_));
      for (uint16_t& x : v) x = testing::FloatToBf16(normal(rng_));
      const absl::Status s = m_->Append(
          plan->id, layer,
          TensorView::Contiguous(k.data(), DType::kBFloat16, {n, kHeads, kD}),
          TensorView::Contiguous(v.data(), DType::kBFloat16, {n, kHeads, kDv}));
      EXPECT_TRUE(s.ok()) << s;
    }
    EXPECT_TRUE(m_->Commit(plan->id).ok());
    return hits;
  }

  // Appends n tokens of zero K/V to every layer of plan `plan_id`.
  void AppendZeros(uint64_t plan_id, int64_t n) {
    std::vector<uint16_t> k(n * kHeads * kD), v(n * kHeads * kDv);
    for (int layer = 0; layer < kLayers; ++layer) {
      const absl::Status s = m_->Append(
          plan_id, layer,
          TensorView::Contiguous(k.data(), DType::kBFloat16, {n, kHeads, kD}),
          TensorView::Contiguous(v.data(), DType::kBFloat16, {n, kHeads, kDv}));
      EXPECT_TRUE(s.ok()) << s;
    }
  }

  // Tokens [0, n) of `id`, every layer's K and V, dequantized to float32.
  std::vector<float> GatherAll(SequenceId id, int64_t n) {
    std::vector<float> out;
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<float> k(n * kHeads * kD), v(n * kHeads * kDv);
      const absl::Status s = m_->Gather(
          id, layer, 0, n,
          TensorView::Contiguous(k.data(), DType::kFloat32, {n, kHeads, kD}),
          TensorView::Contiguous(v.data(), DType::kFloat32, {n, kHeads, kDv}));
      EXPECT_TRUE(s.ok()) << s;
      out.insert(out.end(), k.begin(), k.end());
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }

  static bool BitEqual(const std::vector<float>& a,
                       const std::vector<float>& b) {
    return a.size() == b.size() &&
           std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  }

  // Fills the whole pool with a sequence of fresh tokens, so every cached
  // block is evicted (offloaded); returns its plan (uncommitted).
  StepPlanInfo FillPool(SequenceId id, int32_t num_blocks) {
    const std::vector<int32_t> other = Prompt(num_blocks * kBs);
    EXPECT_TRUE(m_->AddSequence(id, other).ok());
    absl::StatusOr<StepPlanInfo> plan =
        m_->Reserve({{id, {}, num_blocks * kBs}});
    EXPECT_TRUE(plan.ok()) << plan.status();
    return plan.ok() ? *plan : StepPlanInfo{};
  }

  // Frees `id` and puts its full blocks in the tier (evicted by a
  // whole-pool plan, aborted): every device block is free after.
  void EvictToTier(SequenceId id, int32_t num_blocks) {
    ASSERT_TRUE(m_->Free(id).ok());
    const StepPlanInfo fill = FillPool(id + 100, num_blocks);
    ASSERT_TRUE(m_->Abort(fill.id).ok());
    ASSERT_TRUE(m_->Free(id + 100).ok());
    ASSERT_TRUE(copier_->Synchronize().ok());
  }

  // Offload ahead's tests: a pool of kAheadPool blocks, a tier of 8, at most
  // 4 copies ahead.
  static constexpr int kAheadPool = 16;
  void MakeWithCopiesAhead() {
    Make(kAheadPool, /*tier_blocks=*/8, 0,
         [](KVCacheConfig& c) { c.tier_offload_ahead_blocks = 4; });
  }
  // Computes `prompt` (3 full blocks and a token) as `id` and frees it, so
  // its 3 blocks are the oldest cached; returns their K/V.
  std::vector<float> CacheOldest(SequenceId id,
                                 const std::vector<int32_t>& prompt) {
    Compute(id, prompt);
    std::vector<float> kv = GatherAll(id, 3 * kBs);
    EXPECT_TRUE(m_->Free(id).ok());
    return kv;
  }
  // A step of a 3-block sequence `id`, freed after: its Reserve copies the
  // oldest cached blocks ahead (nothing is evicted).
  void StepThatCopiesAhead(SequenceId id) {
    Compute(id, Prompt(2 * kBs + 1));
    EXPECT_TRUE(m_->Free(id).ok());
  }

  // A new sequence `id` of `prompt` finds its 3 full blocks in the tier and
  // reads back `kv` bit-exactly.
  void ExpectHostHit(SequenceId id, const std::vector<int32_t>& prompt,
                     const std::vector<float>& kv) {
    const PrefixHits hits = Compute(id, prompt);
    EXPECT_EQ(hits.host_tokens, 3 * kBs);
    EXPECT_TRUE(BitEqual(GatherAll(id, 3 * kBs), kv));
  }

  // Offload bytes moved = the copies made ahead, and the offloads that used
  // neither a copy ahead nor a kept slot (each copied at its eviction).
  static int64_t ExpectedOffloadBytes(const MetricsSnapshot& s,
                                      int64_t block_bytes) {
    return (s.tier_offload_ahead_copies + s.tier_offloads -
            s.tier_offloads_ahead - s.tier_offloads_kept) *
           block_bytes;
  }

  void ExpectConsistent() {
    const absl::Status valid = m_->Validate();
    EXPECT_TRUE(valid.ok()) << valid;
    const MetricsSnapshot s = m_->Metrics();
    EXPECT_EQ(s.blocks_free + s.blocks_cached + s.blocks_in_use,
              s.blocks_total);
    EXPECT_LE(s.host_tier_blocks_stored, s.host_tier_blocks_total);
    EXPECT_EQ(s.prefix_hit_tokens_device + s.prefix_hit_tokens_host,
              s.prefix_hit_tokens);
  }

  std::mt19937_64 rng_{std::random_device{}()};
  std::unique_ptr<KVCacheManager> m_;
  TierCopier* copier_ = nullptr;
};

TEST_P(HostTierTest, HitReadsBackBitExactly) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);  // 3 full blocks.
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());  // 3 cached blocks.
  // A whole-pool sequence overwrites every device block: the 3 cached ones
  // are evicted (offloaded) first.
  Compute(2, Prompt(8 * kBs));
  ASSERT_TRUE(m_->Free(2).ok());
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.evictions, 3);
  EXPECT_EQ(s.tier_offloads, 3);
  EXPECT_EQ(s.host_tier_blocks_stored, 3);
  EXPECT_EQ(s.blocks_cached, 8);
  EXPECT_EQ(*m_->PeekPrefix(prompt), 3 * kBs);  // Peek sees the tier.
  ExpectConsistent();

  const PrefixHits hits = Compute(3, prompt);
  EXPECT_EQ(hits.host_tokens, 3 * kBs);
  EXPECT_EQ(hits.device_tokens, 0);
  EXPECT_TRUE(BitEqual(GatherAll(3, 3 * kBs), before));
  s = m_->Metrics();
  EXPECT_EQ(s.tier_onboards, 3);
  EXPECT_EQ(s.prefix_hit_tokens_host, 3 * kBs);
  // A block lives in one tier: the 3 onboarded left it, and the 4 of
  // sequence 2 evicted for them and the prompt's last token came in.
  EXPECT_EQ(s.tier_offloads, 7);
  EXPECT_EQ(s.host_tier_blocks_stored, 4);
  EXPECT_EQ(3 * s.tier_offload_bytes, 7 * s.tier_onboard_bytes);
  // A block moves as exactly its bytes in the layout (inline: rows with
  // their pitch, no scale tensors).
  EXPECT_EQ(s.tier_onboard_bytes, 3 * *BlockBytesAllLayers(m_->config()));
  ExpectConsistent();
  // Back on the device: the next hit is a device hit.
  ASSERT_TRUE(m_->Free(3).ok());
  const PrefixHits again = Compute(4, prompt);
  EXPECT_EQ(again.device_tokens, 3 * kBs);
  EXPECT_EQ(again.host_tokens, 0);
  EXPECT_TRUE(BitEqual(GatherAll(4, 3 * kBs), before));
  const std::string text = m_->MetricsText();
  EXPECT_NE(text.find("kvcache_prefix_hit_tokens_by_tier_total{tier=\"host\"} "
                      "12"),
            std::string::npos)
      << text;
}

TEST_P(HostTierTest, ChainMixesTiers) {
  // A prefix whose first blocks are on the device and later ones in the
  // tier: the hit is the longest chain across both.
  Make(/*num_blocks=*/8, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(4 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 4 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());  // Tail first: blocks 3, 2 are the oldest.
  // A 6-block sequence takes the 4 free blocks and evicts 2 cached ones.
  std::vector<int32_t> other = Prompt(6 * kBs);
  ASSERT_TRUE(m_->AddSequence(2, other).ok());
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{2, {}, 6 * kBs}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(m_->Abort(plan->id).ok());
  ASSERT_TRUE(m_->Free(2).ok());
  EXPECT_EQ(m_->Metrics().tier_offloads, 2);
  const PrefixHits hits = Compute(3, prompt);
  EXPECT_EQ(hits.device_tokens, 2 * kBs);
  EXPECT_EQ(hits.host_tokens, 2 * kBs);
  EXPECT_TRUE(BitEqual(GatherAll(3, 4 * kBs), before));
  ExpectConsistent();
}

TEST_P(HostTierTest, HitWhileOffloadIsInFlight) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());
  copier_->set_delay_for_testing(absl::Milliseconds(300));
  const StepPlanInfo plan = FillPool(2, 8);  // Evicts: offloads queued.
  ASSERT_GT(copier_->in_flight(), 0);
  // The evicted blocks go back to the free list; the hit onboards into them
  // while their offload has not run yet: the copy queue orders it after.
  ASSERT_TRUE(m_->Abort(plan.id).ok());
  ASSERT_TRUE(m_->Free(2).ok());
  PrefixHits hits;
  ASSERT_EQ(*m_->AddSequence(3, prompt, {}, &hits), 3 * kBs);
  EXPECT_EQ(hits.host_tokens, 3 * kBs);
  ASSERT_GT(copier_->in_flight(), 0) << "the offload was not in flight";
  copier_->set_delay_for_testing(absl::ZeroDuration());
  EXPECT_TRUE(BitEqual(GatherAll(3, 3 * kBs), before));  // Waits for both.
  EXPECT_EQ(copier_->in_flight(), 0);
  ExpectConsistent();
}

// The two lanes: an onboard does not queue behind offloads it does not
// depend on, and a step waits only for its own sequences' onboards.

TEST_P(HostTierTest, OnboardDoesNotWaitForUnrelatedOffloads) {
  Make(/*num_blocks=*/12, /*tier_blocks=*/8);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_NO_FATAL_FAILURE(EvictToTier(1, 12));
  // Four cached blocks, then a slow offload of them: sequence 7 evicts them
  // once sequence 6 holds every free block.
  Compute(5, Prompt(4 * kBs));
  ASSERT_TRUE(m_->Free(5).ok());
  ASSERT_EQ(*m_->AddSequence(6, Prompt(8 * kBs)), 0);
  absl::StatusOr<StepPlanInfo> six = m_->Reserve({{6, {}, 8 * kBs}});
  ASSERT_TRUE(six.ok()) << six.status();
  copier_->set_delay_for_testing(absl::Seconds(2));
  ASSERT_EQ(*m_->AddSequence(7, Prompt(4 * kBs)), 0);
  absl::StatusOr<StepPlanInfo> seven = m_->Reserve({{7, {}, 4 * kBs}});
  ASSERT_TRUE(seven.ok()) << seven.status();
  copier_->set_delay_for_testing(absl::ZeroDuration());
  // (The test config reuses evicted blocks at once: their lane.)
  ASSERT_GT(copier_->in_flight(TierLane::kOffloadReused), 0);
  ASSERT_TRUE(m_->Abort(six->id).ok());  // Free blocks for the onboard.
  ASSERT_TRUE(m_->Free(6).ok());
  PrefixHits hits;
  ASSERT_EQ(*m_->AddSequence(3, prompt, {}, &hits), 3 * kBs);
  ASSERT_EQ(hits.host_tokens, 3 * kBs);
  // The onboard lands while the offload still sleeps.
  const absl::Time deadline = absl::Now() + absl::Milliseconds(1500);
  while (!*m_->PrefixLoaded(3) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_TRUE(*m_->PrefixLoaded(3));
  EXPECT_GT(copier_->in_flight(TierLane::kOffloadReused), 0)
      << "the onboard waited for the offload";
  EXPECT_TRUE(BitEqual(GatherAll(3, 3 * kBs), before));
  ASSERT_TRUE(m_->Abort(seven->id).ok());
  ExpectConsistent();
}

TEST_P(HostTierTest, StepWaitsOnlyForItsOwnSequencesOnboards) {
  Make(/*num_blocks=*/12, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_NO_FATAL_FAILURE(EvictToTier(1, 12));
  EXPECT_EQ(m_->PrefixLoaded(7).status().code(), absl::StatusCode::kNotFound);

  copier_->set_delay_for_testing(absl::Milliseconds(500));
  PrefixHits hits;
  ASSERT_EQ(*m_->AddSequence(3, prompt, {}, &hits), 3 * kBs);
  ASSERT_EQ(hits.host_tokens, 3 * kBs);
  copier_->set_delay_for_testing(absl::ZeroDuration());
  EXPECT_FALSE(*m_->PrefixLoaded(3));
  // A device hit on the blocks being onboarded waits for them too.
  ASSERT_EQ(*m_->AddSequence(4, prompt, {}, &hits), 3 * kBs);
  EXPECT_EQ(hits.device_tokens, 3 * kBs);
  EXPECT_FALSE(*m_->PrefixLoaded(4));
  // So does a fork of it.
  ASSERT_TRUE(m_->Fork(4, 6).ok());
  EXPECT_FALSE(*m_->PrefixLoaded(6));
  // Another sequence's whole step runs meanwhile (on the CPU a wait would
  // block this thread until the onboard is done).
  ASSERT_EQ(*m_->AddSequence(5, Prompt(2 * kBs)), 0);
  EXPECT_TRUE(*m_->PrefixLoaded(5));
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{5, {}, 2 * kBs}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  AppendZeros(plan->id, 2 * kBs);
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  EXPECT_GT(copier_->in_flight(TierLane::kOnboard), 0)
      << "sequence 5's step waited for sequence 3's onboard";
  EXPECT_FALSE(*m_->PrefixLoaded(3));
  // Sequence 3's own step waits for it.
  plan = m_->Reserve({{3, {}, 1}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  AppendZeros(plan->id, 1);
  EXPECT_EQ(copier_->in_flight(TierLane::kOnboard), 0);
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  EXPECT_TRUE(*m_->PrefixLoaded(3));
  EXPECT_TRUE(*m_->PrefixLoaded(4));
  EXPECT_TRUE(*m_->PrefixLoaded(6));
  EXPECT_TRUE(BitEqual(GatherAll(3, 3 * kBs), before));
  EXPECT_TRUE(BitEqual(GatherAll(4, 3 * kBs), before));
  ExpectConsistent();
}

// A sequence freed before its prefix landed: its blocks may go to anyone,
// so every later step waits for the onboard that fills them.
TEST_P(HostTierTest, FreeBeforeThePrefixLandedOrdersEveryoneAfterIt) {
  // Evicted blocks are dropped, not offloaded (an onboarded block counts
  // one hit): only the rule above orders the step after the onboard.
  Make(/*num_blocks=*/8, /*tier_blocks=*/6, 0,
       [](KVCacheConfig& c) { c.tier_offload_min_hits = 3; });
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  {
    // With min_hits 3 the prompt must be hit three times to be offloaded.
    Compute(1, prompt);
    ASSERT_TRUE(m_->Free(1).ok());
    for (SequenceId id : {11, 12, 13}) {
      ASSERT_EQ(*m_->AddSequence(id, prompt), 3 * kBs);
      ASSERT_TRUE(m_->Free(id).ok());
    }
    const StepPlanInfo fill = FillPool(2, 8);
    ASSERT_TRUE(m_->Abort(fill.id).ok());
    ASSERT_TRUE(m_->Free(2).ok());
    ASSERT_TRUE(copier_->Synchronize().ok());
    ASSERT_EQ(m_->Metrics().host_tier_blocks_stored, 3);
  }
  copier_->set_delay_for_testing(absl::Milliseconds(300));
  ASSERT_EQ(*m_->AddSequence(3, prompt), 3 * kBs);
  copier_->set_delay_for_testing(absl::ZeroDuration());
  ASSERT_TRUE(m_->Free(3).ok());
  ASSERT_GT(copier_->in_flight(TierLane::kOnboard), 0);
  // A whole-pool step reuses the onboarded blocks: it must not write them
  // before the onboard is done.
  ASSERT_EQ(*m_->AddSequence(4, Prompt(8 * kBs)), 0);
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{4, {}, 8 * kBs}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  AppendZeros(plan->id, 8 * kBs);
  EXPECT_EQ(copier_->in_flight(TierLane::kOnboard), 0);
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  const std::vector<float> zeros(static_cast<size_t>(kLayers) * 8 * kBs *
                                 kHeads * (kD + kDv));
  EXPECT_TRUE(BitEqual(GatherAll(4, 8 * kBs), zeros));
  ExpectConsistent();
}

TEST_P(HostTierTest, AppendToAnEvictedBlockWaitsForItsOffload) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());
  copier_->set_delay_for_testing(absl::Milliseconds(200));
  // Computes a whole-pool sequence: its Appends overwrite the evicted
  // blocks, which must reach the tier first.
  Compute(2, Prompt(8 * kBs));
  copier_->set_delay_for_testing(absl::ZeroDuration());
  ASSERT_TRUE(m_->Free(2).ok());
  const PrefixHits hits = Compute(3, prompt);
  EXPECT_EQ(hits.host_tokens, 3 * kBs);
  EXPECT_TRUE(BitEqual(GatherAll(3, 3 * kBs), before));
  ExpectConsistent();
}

// The same through a graph step: its Appends wait on nothing (so that they
// can be captured), so ReserveGraphStep must order the step after the
// offloads of the blocks it evicted.
TEST_P(HostTierTest, GraphStepToAnEvictedBlockWaitsForItsOffload) {
  constexpr int kTokens = 8 * kBs;
  Make(/*num_blocks=*/8, /*tier_blocks=*/6, /*graph_max_tokens=*/kTokens);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());
  copier_->set_delay_for_testing(absl::Milliseconds(200));
  ASSERT_EQ(*m_->AddSequence(2, Prompt(kTokens)), 0);
  absl::StatusOr<StepPlanInfo> plan =
      m_->ReserveGraphStep({{2, {}, kTokens}}, kTokens);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(m_->Metrics().tier_offloads, 3);
  std::normal_distribution<float> normal;
  for (int layer = 0; layer < kLayers; ++layer) {
    std::vector<uint16_t> k(kTokens * kHeads * kD), v(kTokens * kHeads * kDv);
    for (uint16_t& x : k) x = testing::FloatToBf16(normal(rng_));
    for (uint16_t& x : v) x = testing::FloatToBf16(normal(rng_));
    const absl::Status s =
        m_->Append(plan->id, layer,
                   TensorView::Contiguous(k.data(), DType::kBFloat16,
                                          {kTokens, kHeads, kD}),
                   TensorView::Contiguous(v.data(), DType::kBFloat16,
                                          {kTokens, kHeads, kDv}));
    ASSERT_TRUE(s.ok()) << s;
  }
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  copier_->set_delay_for_testing(absl::ZeroDuration());
  ASSERT_TRUE(m_->Free(2).ok());
  const PrefixHits hits = Compute(3, prompt);
  EXPECT_EQ(hits.host_tokens, 3 * kBs);
  EXPECT_TRUE(BitEqual(GatherAll(3, 3 * kBs), before));
  ExpectConsistent();
}

TEST_P(HostTierTest, TierEvictsItsOldest) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/2);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  const std::vector<float> before = GatherAll(1, 3 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());
  // Device LRU evicts block 2, then 1, then 0 (a chain's tail first); the
  // tier keeps the two newest, 1 and 0, and drops 2.
  const StepPlanInfo plan = FillPool(2, 8);
  ASSERT_TRUE(m_->Abort(plan.id).ok());
  ASSERT_TRUE(m_->Free(2).ok());
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.tier_offloads, 3);
  EXPECT_EQ(s.host_tier_evictions, 1);
  EXPECT_EQ(s.host_tier_blocks_stored, 2);
  ExpectConsistent();
  const PrefixHits hits = Compute(3, prompt);
  EXPECT_EQ(hits.host_tokens, 2 * kBs);
  EXPECT_EQ(hits.device_tokens, 0);
  const std::vector<float> after = GatherAll(3, 2 * kBs);
  // Every layer's K then V: compare the first two blocks of each.
  std::vector<float> expected;
  const int64_t full_k = 3 * kBs * kHeads * kD, full_v = 3 * kBs * kHeads * kDv;
  for (int layer = 0; layer < kLayers; ++layer) {
    const float* k = before.data() + layer * (full_k + full_v);
    expected.insert(expected.end(), k, k + 2 * kBs * kHeads * kD);
    expected.insert(expected.end(), k + full_k,
                    k + full_k + 2 * kBs * kHeads * kDv);
  }
  EXPECT_TRUE(BitEqual(after, expected));
  ExpectConsistent();
}

// A chain's head dropped while its tail stays in the tier (the head was
// onboarded, then evicted unselected), then the chain computed anew: the
// commit registers the tail on the device without looking it up in the tier
// (only the first block after a registration made anew could match there),
// so the tier's stale entries stay until the tail's own offload replaces
// them; a later prompt then hits the new content across the tier.
TEST_P(HostTierTest, StaleTierEntriesGiveWayToTheChainComputedAnew) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/3, 0,
       [](KVCacheConfig& c) { c.tier_offload_min_hits = 2; });
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  // Computed as `id`, then hit twice on the device (as id + 1, id + 2, the
  // last left running), so that its three full blocks are selected for
  // offload; returns their K/V.
  auto compute_and_hit_twice = [&](SequenceId id) {
    Compute(id, prompt);
    std::vector<float> kv = GatherAll(id, 3 * kBs);
    EXPECT_TRUE(m_->Free(id).ok());
    for (SequenceId hit = id + 1; hit <= id + 2; ++hit) {
      EXPECT_EQ(Compute(hit, prompt).device_tokens, 3 * kBs);
      if (hit < id + 2) {
        EXPECT_TRUE(m_->Free(hit).ok());
      }
    }
    return kv;
  };
  compute_and_hit_twice(1);
  EvictToTier(3, 8);
  EXPECT_EQ(m_->Metrics().host_tier_blocks_stored, 3);
  // The head alone comes back (one hit: below the selection), and leaves.
  std::vector<int32_t> head(prompt.begin(), prompt.begin() + kBs);
  head.push_back(7);
  EXPECT_EQ(Compute(4, head).host_tokens, kBs);
  EvictToTier(4, 8);
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.host_tier_blocks_stored, 2);  // The tail, under a dead parent.
  ExpectConsistent();
  // Computed anew: nothing hits (the head is gone), the tail's stale
  // entries stay beside the new registrations.
  const int64_t evictions_before = s.host_tier_evictions;
  const std::vector<float> kv = compute_and_hit_twice(10);
  s = m_->Metrics();
  EXPECT_EQ(s.host_tier_blocks_stored, 2);
  ExpectConsistent();
  // Their offloads replace the stale entries (dropped as evictions).
  EvictToTier(12, 8);
  s = m_->Metrics();
  EXPECT_EQ(s.host_tier_blocks_stored, 3);
  EXPECT_EQ(s.host_tier_evictions, evictions_before + 2);
  ExpectConsistent();
  const PrefixHits hits = Compute(20, prompt);
  EXPECT_EQ(hits.host_tokens, 3 * kBs);
  EXPECT_TRUE(BitEqual(GatherAll(20, 3 * kBs), kv));
  ExpectConsistent();
}

TEST_P(HostTierTest, FailedOffloadDropsTheBlocks) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  ASSERT_TRUE(m_->Free(1).ok());
  copier_->fail_next_for_testing(1);
  const StepPlanInfo plan = FillPool(2, 8);  // Reserve itself succeeds.
  ASSERT_NE(plan.id, 0u);
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.tier_copy_failures, 3);
  EXPECT_EQ(s.host_tier_blocks_stored, 0);
  EXPECT_EQ(s.tier_offload_bytes, 0);
  ExpectConsistent();
  ASSERT_TRUE(m_->Abort(plan.id).ok());
  ASSERT_TRUE(m_->Free(2).ok());
  EXPECT_EQ(*m_->PeekPrefix(prompt), 0);
  const PrefixHits hits = Compute(3, prompt);
  EXPECT_EQ(hits.device_tokens + hits.host_tokens, 0);
  ASSERT_TRUE(m_->Free(3).ok());
  s = m_->Metrics();
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_EQ(s.sequences, 0);
  ExpectConsistent();
}

TEST_P(HostTierTest, FailedOnboardFailsAddSequenceAndLeaksNothing) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/6);
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  Compute(1, prompt);
  ASSERT_TRUE(m_->Free(1).ok());
  const StepPlanInfo plan = FillPool(2, 8);
  ASSERT_TRUE(m_->Abort(plan.id).ok());
  ASSERT_TRUE(m_->Free(2).ok());
  ASSERT_EQ(m_->Metrics().host_tier_blocks_stored, 3);
  copier_->fail_next_for_testing(1);
  absl::StatusOr<int64_t> added = m_->AddSequence(3, prompt);
  ASSERT_FALSE(added.ok());
  EXPECT_EQ(added.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(added.status().message().find("sequence 3"), std::string::npos)
      << added.status();
  EXPECT_FALSE(m_->SequenceLength(3).ok());  // Not added.
  const MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.host_tier_blocks_stored, 0);  // Dropped, never half-copied.
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_EQ(s.blocks_cached, 0);
  EXPECT_EQ(s.blocks_free, 8);
  EXPECT_EQ(s.tier_copy_failures, 3);
  ExpectConsistent();
  EXPECT_EQ(*m_->AddSequence(3, prompt), 0);  // The id is free again.
  ExpectConsistent();
}

// ---- The offload policy (README "Host tier": tier_offload_min_hits,
// tier_offload_max_in_flight_bytes, tier_hold_offloads) ----

// Every event of the batches taken, in order, flattened.
std::vector<KVEvent> TakeAllEvents(KVCacheManager& m) {
  std::vector<KVEvent> out;
  absl::StatusOr<std::vector<KVEventBatch>> batches = m.TakeEvents();
  EXPECT_TRUE(batches.ok()) << batches.status();
  if (!batches.ok()) return out;
  for (KVEventBatch& b : *batches) {
    for (KVEvent& e : b.events) out.push_back(std::move(e));
  }
  return out;
}

std::set<uint64_t> EventHashes(const std::vector<KVEvent>& events,
                               KVEventType type, KVEventMedium medium) {
  std::set<uint64_t> out;
  for (const KVEvent& e : events) {
    if (e.type == type && e.medium == medium)
      out.insert(e.block_hashes.begin(), e.block_hashes.end());
  }
  return out;
}

// A block never hit is not selected: its eviction drops it as without a tier
// (BlockRemoved of the device medium, nothing stored on the host); the same
// content hit once is offloaded.
TEST_P(HostTierTest, UnselectedBlocksAreDroppedCleanly) {
  Make(/*num_blocks=*/8, /*tier_blocks=*/6, 0, [](KVCacheConfig& c) {
    c.tier_offload_min_hits = 1;
    c.tier_hold_offloads = false;
    c.enable_kv_events = true;
  });
  const std::vector<int32_t> cold = Prompt(3 * kBs + 1);
  Compute(1, cold);
  ASSERT_TRUE(m_->Free(1).ok());
  (void)TakeAllEvents(*m_);
  StepPlanInfo plan = FillPool(2, 8);
  std::vector<KVEvent> events = TakeAllEvents(*m_);
  EXPECT_EQ(
      EventHashes(events, KVEventType::kBlockRemoved, KVEventMedium::kDevice)
          .size(),
      3u);
  EXPECT_TRUE(
      EventHashes(events, KVEventType::kBlockStored, KVEventMedium::kHost)
          .empty());
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.tier_offloads, 0);
  EXPECT_EQ(s.tier_offloads_unselected, 3);
  EXPECT_EQ(s.tier_offload_bytes, 0);
  EXPECT_EQ(s.host_tier_blocks_stored, 0);
  ExpectConsistent();
  ASSERT_TRUE(m_->Abort(plan.id).ok());
  ASSERT_TRUE(m_->Free(2).ok());
  EXPECT_EQ(*m_->PeekPrefix(cold), 0);

  // Hit once on the device (sequence 4), then evicted: offloaded.
  const std::vector<int32_t> warm = Prompt(3 * kBs + 1);
  Compute(3, warm);
  const std::vector<float> before = GatherAll(3, 3 * kBs);
  ASSERT_TRUE(m_->Free(3).ok());
  ASSERT_EQ(*m_->AddSequence(4, warm), 3 * kBs);
  ASSERT_TRUE(m_->Free(4).ok());
  (void)TakeAllEvents(*m_);
  plan = FillPool(5, 8);
  events = TakeAllEvents(*m_);
  const std::set<uint64_t> removed =
      EventHashes(events, KVEventType::kBlockRemoved, KVEventMedium::kDevice);
  EXPECT_EQ(removed.size(), 3u);
  EXPECT_EQ(
      EventHashes(events, KVEventType::kBlockStored, KVEventMedium::kHost),
      removed);
  s = m_->Metrics();
  EXPECT_EQ(s.tier_offloads, 3);
  EXPECT_EQ(s.tier_offloads_unselected, 3);
  ASSERT_TRUE(m_->Abort(plan.id).ok());
  ASSERT_TRUE(m_->Free(5).ok());
  const PrefixHits hits = Compute(6, warm);
  EXPECT_EQ(hits.host_tokens, 3 * kBs);
  EXPECT_TRUE(BitEqual(GatherAll(6, 3 * kBs), before));
  ExpectConsistent();
}

// With holding, an offloaded block is not handed out while its copy is in
// flight: the call evicts further blocks instead, within the in-flight
// budget, past which evicted blocks are dropped; nothing waits for the
// copies, and the held blocks come back (free) once their copy is done.
TEST_P(HostTierTest, HeldOffloadsStayOutOfUseAndWithinTheBudget) {
  constexpr int kBlocks = 16;
  int64_t block_bytes = 0;
  Make(kBlocks, /*tier_blocks=*/8, 0, [&](KVCacheConfig& c) {
    block_bytes = *BlockBytesAllLayers(c);
    c.tier_offload_min_hits = 0;
    c.tier_offload_max_in_flight_bytes = 2 * block_bytes;
    c.tier_hold_offloads = true;
  });
  // The oldest cached blocks: `warm` (2 blocks), then 6 of `other`.
  const std::vector<int32_t> warm = Prompt(2 * kBs + 1);
  Compute(1, warm);
  const std::vector<float> before = GatherAll(1, 2 * kBs);
  ASSERT_TRUE(m_->Free(1).ok());
  Compute(2, Prompt(6 * kBs + 1));
  ASSERT_TRUE(m_->Free(2).ok());
  ASSERT_EQ(m_->Metrics().blocks_cached, 8);
  ASSERT_EQ(m_->Metrics().blocks_free, 8);

  copier_->set_delay_for_testing(absl::Milliseconds(300));
  // 9 blocks: the 8 free ones and one eviction. The two oldest (warm's) are
  // offloaded and held (the budget: two blocks), the third is dropped and
  // handed out.
  const std::vector<int32_t> fresh = Prompt(9 * kBs);
  ASSERT_TRUE(m_->AddSequence(3, fresh).ok());
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{3, {}, 9 * kBs}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.tier_offloads, 2);
  EXPECT_EQ(s.tier_offloads_skipped, 1);
  EXPECT_EQ(s.tier_offloads_waited, 0);
  EXPECT_EQ(s.evictions, 3);
  EXPECT_EQ(s.blocks_in_use, 9 + 2);  // The two held ones too.
  EXPECT_LE(copier_->in_flight_bytes(), 2 * block_bytes);
  ASSERT_GT(copier_->in_flight(), 0);
  ExpectConsistent();
  // The plan's Appends do not wait for the copies (they write other blocks).
  const auto start = std::chrono::steady_clock::now();
  for (int layer = 0; layer < kLayers; ++layer) {
    const int64_t n = 9 * kBs;
    std::vector<uint16_t> k(n * kHeads * kD), v(n * kHeads * kDv);
    for (uint16_t& x : k) x = testing::FloatToBf16(0.5f);
    for (uint16_t& x : v) x = testing::FloatToBf16(-0.25f);
    ASSERT_TRUE(m_->Append(plan->id, layer,
                           TensorView::Contiguous(k.data(), DType::kBFloat16,
                                                  {n, kHeads, kD}),
                           TensorView::Contiguous(v.data(), DType::kBFloat16,
                                                  {n, kHeads, kDv}))
                    .ok());
  }
  EXPECT_GT(copier_->in_flight(), 0) << "an Append waited for the offload";
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  ASSERT_TRUE(m_->Free(3).ok());
  copier_->set_delay_for_testing(absl::ZeroDuration());
  ASSERT_TRUE(copier_->Synchronize().ok());
  (void)start;
  // The next call frees the held blocks; warm's blocks read back exactly.
  PrefixHits hits;
  ASSERT_EQ(*m_->AddSequence(4, warm, {}, &hits), 2 * kBs);
  EXPECT_EQ(hits.host_tokens, 2 * kBs);
  s = m_->Metrics();
  EXPECT_EQ(s.blocks_in_use, 2);
  EXPECT_TRUE(BitEqual(GatherAll(4, 2 * kBs), before));
  ExpectConsistent();
}

// A Reserve that needs the held blocks waits for their copies rather than
// failing: they are the pool's, only not yet reusable.
TEST_P(HostTierTest, ReserveThatNeedsHeldBlocksWaitsForThem) {
  constexpr int kBlocks = 8;
  Make(kBlocks, /*tier_blocks=*/8, 0, [](KVCacheConfig& c) {
    c.tier_offload_min_hits = 0;
    c.tier_offload_max_in_flight_bytes = 0;
    c.tier_hold_offloads = true;
  });
  Compute(1, Prompt(4 * kBs + 1));
  ASSERT_TRUE(m_->Free(1).ok());  // 4 cached, 4 free.
  // Long enough that the copies are still running at the probe below.
  copier_->set_delay_for_testing(absl::Milliseconds(1000));
  ASSERT_TRUE(m_->AddSequence(2, Prompt(6 * kBs)).ok());
  absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{2, {}, 5 * kBs}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  // 5 blocks of 8: three to spare, so three evicted blocks are held.
  EXPECT_EQ(m_->Metrics().blocks_in_use, 5 + 3);
  // A probe that would not fit even with the held blocks free (4 blocks
  // against 3 held, none free or evictable) fails at once: it waits for no
  // copy, so the held blocks are still held (waiting would have freed them).
  ASSERT_TRUE(m_->AddSequence(3, Prompt(4 * kBs)).ok());
  const absl::Status probe = m_->CanReserve({{3, {}, 4 * kBs}});
  ASSERT_TRUE(absl::IsResourceExhausted(probe)) << probe;
  const std::optional<Shortfall> shortfall = GetShortfall(probe);
  ASSERT_TRUE(shortfall.has_value());
  EXPECT_EQ(shortfall->blocks_free + shortfall->blocks_evictable, 0);
  EXPECT_EQ(m_->Metrics().blocks_in_use, 5 + 3);
  ASSERT_TRUE(m_->Free(3).ok());
  AppendZeros(plan->id, 5 * kBs);
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  copier_->set_delay_for_testing(absl::ZeroDuration());
  // The sixth block: only a held block can give it.
  ASSERT_TRUE(m_->CanReserve({{2, {}, kBs}}).ok());
  plan = m_->Reserve({{2, {}, kBs}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  AppendZeros(plan->id, kBs);
  ASSERT_TRUE(m_->Commit(plan->id).ok());
  ExpectConsistent();
}

// The selection against an independent model: random adds of prompts that
// share prefixes, computed and freed in a small pool, with min_hits 1 and 2;
// the model counts each registration's hits from AddSequence's results and
// the events (a block stored on the device is new, 0 hits, unless the same
// call removed it from the host tier: 1), and predicts which evicted blocks
// must be stored on the host in the same call.
TEST_P(HostTierTest, SelectionMatchesAModelOfHitCounts) {
  for (const int min_hits : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("min_hits ", min_hits));
    Make(/*num_blocks=*/12, /*tier_blocks=*/64, 0, [&](KVCacheConfig& c) {
      c.tier_offload_min_hits = min_hits;
      c.tier_offload_max_in_flight_bytes = 0;
      c.tier_hold_offloads = false;  // No budget, no hold: selection alone.
      c.enable_kv_events = true;
    });
    std::vector<std::vector<int32_t>> roots;
    for (int i = 0; i < 4; ++i) roots.push_back(Prompt(3 * kBs));
    // (parent hash or 0 for a first block, tokens) -> hash, from events.
    std::map<std::pair<uint64_t, std::vector<int32_t>>, uint64_t> hash_of;
    std::map<uint64_t, int> hits;
    int64_t checked_offloads = 0, checked_drops = 0;
    SequenceId id = 1;
    for (int op = 0; op < 300; ++op) {
      std::vector<int32_t> prompt = roots[rng_() % roots.size()];
      const int extra = static_cast<int>(rng_() % (3 * kBs));
      const std::vector<int32_t> tail = Prompt(extra + 1);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      // Each manager call's events, modelled in order.
      auto model = [&](int64_t computed) {
        const std::vector<KVEvent> events = TakeAllEvents(*m_);
        std::set<uint64_t> from_host, expect_host, stored_host;
        std::set<uint64_t> stored_device;
        for (const KVEvent& e : events) {
          if (e.type == KVEventType::kBlockRemoved &&
              e.medium == KVEventMedium::kHost) {
            from_host.insert(e.block_hashes.begin(), e.block_hashes.end());
          } else if (e.type == KVEventType::kBlockRemoved) {
            for (uint64_t h : e.block_hashes) {
              if (hits[h] >= min_hits) {
                expect_host.insert(h);
              } else {
                ++checked_drops;
              }
            }
          } else if (e.type == KVEventType::kBlockStored) {
            uint64_t parent = e.has_parent ? e.parent_block_hash : 0;
            for (size_t k = 0; k < e.block_hashes.size(); ++k) {
              const uint64_t h = e.block_hashes[k];
              hash_of[{parent,
                       std::vector<int32_t>(
                           e.token_ids.begin() + k * e.block_size,
                           e.token_ids.begin() + (k + 1) * e.block_size)}] = h;
              parent = h;
              if (e.medium == KVEventMedium::kHost) {
                stored_host.insert(h);
              } else {
                stored_device.insert(h);
                hits[h] = from_host.count(h) ? 1 : 0;
              }
            }
          }
        }
        EXPECT_EQ(stored_host, expect_host);
        checked_offloads += static_cast<int64_t>(expect_host.size());
        // AddSequence: its device hits (not brought back by this call).
        uint64_t parent = 0;
        for (int64_t b = 0; b < computed / kBs; ++b) {
          auto it = hash_of.find(
              {parent, std::vector<int32_t>(prompt.begin() + b * kBs,
                                            prompt.begin() + (b + 1) * kBs)});
          ASSERT_NE(it, hash_of.end()) << "a hit block never stored";
          if (!stored_device.count(it->second)) ++hits[it->second];
          parent = it->second;
        }
      };
      absl::StatusOr<int64_t> computed = m_->AddSequence(id, prompt);
      ASSERT_TRUE(computed.ok()) << computed.status();
      model(*computed);
      const int64_t n = static_cast<int64_t>(prompt.size()) - *computed;
      absl::StatusOr<StepPlanInfo> plan = m_->Reserve({{id, {}, n}});
      ASSERT_TRUE(plan.ok()) << plan.status();
      model(0);
      for (int layer = 0; layer < kLayers; ++layer) {
        std::vector<uint16_t> k(n * kHeads * kD), v(n * kHeads * kDv);
        ASSERT_TRUE(
            m_->Append(plan->id, layer,
                       TensorView::Contiguous(k.data(), DType::kBFloat16,
                                              {n, kHeads, kD}),
                       TensorView::Contiguous(v.data(), DType::kBFloat16,
                                              {n, kHeads, kDv}))
                .ok());
      }
      ASSERT_TRUE(m_->Commit(plan->id).ok());
      model(0);
      ASSERT_TRUE(m_->Free(id).ok());
      model(0);
      ++id;
    }
    ExpectConsistent();
    const MetricsSnapshot s = m_->Metrics();
    EXPECT_EQ(s.tier_offloads, checked_offloads);
    EXPECT_EQ(s.tier_offloads_unselected, checked_drops);
    EXPECT_GT(checked_offloads, 10);
    EXPECT_GT(checked_drops, 10);
  }
}

TEST(HostTierConfigTest, PolicyFieldsAreCheckedByName) {
  KVCacheConfig c = Config(DType::kInt8, 8, 4);
  c.tier_offload_min_hits = 256;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("tier_offload_min_hits 256"),
            std::string::npos)
      << m.status();
  c.tier_offload_min_hits = -1;
  EXPECT_FALSE(KVCacheManager::Create(c).ok());
  c.tier_offload_min_hits = 0;
  c.tier_offload_max_in_flight_bytes = -5;
  m = KVCacheManager::Create(c);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("tier_offload_max_in_flight_bytes -5"),
            std::string::npos)
      << m.status();
  c.tier_offload_max_in_flight_bytes = 0;
  EXPECT_TRUE(KVCacheManager::Create(c).ok());
}

// Offload ahead (tier_offload_ahead_blocks): the cached blocks next in
// line for eviction are copied to the tier by a step's Reserve while they
// stay cached; their eviction then registers them in the tier without a copy
// of its own, and a hit reads them back bit-exactly.
TEST_P(HostTierTest, OffloadAheadCopiesBlocksBeforeTheirEviction) {
  MakeWithCopiesAhead();
  const int64_t block_bytes = *BlockBytesAllLayers(m_->config());
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  const std::vector<float> before = CacheOldest(1, prompt);
  // Another sequence's step copies them ahead (nothing is evicted yet); its
  // own 2 full blocks are cached after it, newer.
  StepThatCopiesAhead(2);
  ASSERT_TRUE(copier_->Synchronize().ok());
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.tier_offload_ahead_copies, 3);
  EXPECT_EQ(s.tier_offloads, 0);
  EXPECT_EQ(s.host_tier_blocks_stored, 0);
  EXPECT_EQ(s.tier_offload_bytes, 3 * block_bytes);
  EXPECT_EQ(s.blocks_cached, 5);
  ExpectConsistent();
  // A whole-pool sequence evicts all 5: the 3 copied ahead move to the tier
  // with no copy of their own, the 2 others are copied now.
  Compute(3, Prompt(kAheadPool * kBs));
  ASSERT_TRUE(copier_->Synchronize().ok());
  s = m_->Metrics();
  EXPECT_EQ(s.evictions, 5);
  EXPECT_EQ(s.tier_offloads, 5);
  EXPECT_EQ(s.tier_offloads_ahead, 3);
  EXPECT_EQ(s.host_tier_blocks_stored, 5);
  EXPECT_EQ(s.tier_offload_bytes, 5 * block_bytes);
  ExpectConsistent();
  ASSERT_TRUE(m_->Free(3).ok());
  ExpectHostHit(4, prompt, before);
  ExpectConsistent();
}

// A block hit on the device after its copy ahead keeps the copy (its content
// cannot change while it is registered): evicted later, it needs no copy.
// Every offload's bytes are moved exactly once, ahead or at eviction.
TEST_P(HostTierTest, CopyAheadSurvivesADeviceHit) {
  MakeWithCopiesAhead();
  const int64_t block_bytes = *BlockBytesAllLayers(m_->config());
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  const std::vector<float> before = CacheOldest(1, prompt);
  StepThatCopiesAhead(2);  // Copies prompt's 3 blocks ahead.
  ASSERT_TRUE(copier_->Synchronize().ok());
  ASSERT_EQ(m_->Metrics().tier_offload_ahead_copies, 3);
  // A device hit takes them out of the LRU; freed, they come back newest.
  const PrefixHits hit = Compute(3, prompt);
  EXPECT_EQ(hit.device_tokens, 3 * kBs);
  ASSERT_TRUE(m_->Free(3).ok());
  ASSERT_TRUE(copier_->Synchronize().ok());
  ExpectConsistent();
  Compute(4, Prompt(kAheadPool * kBs));  // Evicts every cached block.
  ASSERT_TRUE(copier_->Synchronize().ok());
  MetricsSnapshot s = m_->Metrics();
  EXPECT_GE(s.tier_offloads_ahead, 3);
  EXPECT_LE(s.tier_offloads_ahead, s.tier_offload_ahead_copies);
  EXPECT_EQ(s.tier_offloads_kept, 0);  // No block came from the tier.
  EXPECT_EQ(s.tier_offload_bytes, ExpectedOffloadBytes(s, block_bytes));
  ExpectConsistent();
  ASSERT_TRUE(m_->Free(4).ok());
  ExpectHostHit(5, prompt, before);
  ExpectConsistent();
}

// A block evicted while its copy ahead is still running is reused at once:
// its next write waits for that copy, so the tier gets the old content and
// the new owner's writes land after it.
TEST_P(HostTierTest, EvictionDuringACopyAheadWaitsForIt) {
  MakeWithCopiesAhead();
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  const std::vector<float> before = CacheOldest(1, prompt);
  copier_->set_delay_for_testing(absl::Milliseconds(200));
  StepThatCopiesAhead(2);  // Its Reserve copies 3 blocks ahead.
  ASSERT_GT(copier_->in_flight(TierLane::kOffload), 0);
  copier_->set_delay_for_testing(absl::ZeroDuration());
  // Evicted at once, while the copies still wait out their delay: the
  // whole-pool sequence's Appends write the same blocks.
  Compute(3, Prompt(kAheadPool * kBs));
  EXPECT_EQ(m_->Metrics().tier_offloads_ahead, 3);
  ASSERT_TRUE(copier_->Synchronize().ok());
  ExpectConsistent();
  ASSERT_TRUE(m_->Free(3).ok());
  ExpectHostHit(4, prompt, before);
  ExpectConsistent();
}

// An eviction passes over cached blocks whose copy ahead is still running
// (they become the newest instead) when other cached blocks can go: no
// step's writes wait for those copies. The passed-over blocks stay cached
// and hit on the device bit-exactly; their copies still land in the tier.
TEST_P(HostTierTest, EvictionPassesOverACopyAheadStillRunning) {
  MakeWithCopiesAhead();
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  const std::vector<float> before = CacheOldest(1, prompt);
  copier_->set_delay_for_testing(absl::Milliseconds(300));
  StepThatCopiesAhead(2);  // Copies prompt's 3 blocks ahead; 2 more cached.
  ASSERT_GT(copier_->in_flight(TierLane::kOffload), 0);
  copier_->set_delay_for_testing(absl::ZeroDuration());
  ASSERT_EQ(m_->Metrics().blocks_cached, 5);
  // 13 blocks with 11 free: two evictions, taken from the two blocks that
  // have no copy ahead, though prompt's 3 are older.
  Compute(3, Prompt(13 * kBs));
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.evictions, 2);
  EXPECT_EQ(s.tier_evictions_deferred, 3);
  EXPECT_EQ(s.tier_offloads_ahead, 0);
  EXPECT_EQ(s.blocks_cached, 3);
  ASSERT_TRUE(copier_->Synchronize().ok());
  ExpectConsistent();
  ASSERT_TRUE(m_->Free(3).ok());
  const PrefixHits hits = Compute(4, prompt);
  EXPECT_EQ(hits.device_tokens, 3 * kBs);
  EXPECT_TRUE(BitEqual(GatherAll(4, 3 * kBs), before));
  ASSERT_TRUE(m_->Free(4).ok());
  ExpectConsistent();
  // Their copies finished: evicted now (with every other cached block),
  // they move to the tier with no copy of their own and read back
  // bit-exactly.
  Compute(5, Prompt(kAheadPool * kBs));
  s = m_->Metrics();
  EXPECT_EQ(s.evictions, 2 + 3 + 13);
  EXPECT_GE(s.tier_offloads_ahead, 3);
  ASSERT_TRUE(copier_->Synchronize().ok());
  ASSERT_TRUE(m_->Free(5).ok());
  ExpectHostHit(6, prompt, before);
  ExpectConsistent();
}

// A reset while copies ahead are in flight, and a failed batch of copies
// ahead: nothing is registered, the reserved slots come back, and the
// manager stays consistent (Validate counts every reserved slot).
TEST_P(HostTierTest, CopiesAheadSurviveResetAndFailure) {
  MakeWithCopiesAhead();
  CacheOldest(1, Prompt(3 * kBs + 1));
  copier_->set_delay_for_testing(absl::Milliseconds(100));
  StepThatCopiesAhead(2);  // 3 copies ahead, in flight.
  ASSERT_EQ(m_->Metrics().tier_offload_ahead_copies, 3);
  ASSERT_TRUE(m_->ResetPrefixCache().ok());
  ExpectConsistent();
  copier_->set_delay_for_testing(absl::ZeroDuration());
  ASSERT_TRUE(copier_->Synchronize().ok());
  // A failed batch of copies ahead drops them (never registered).
  CacheOldest(3, Prompt(3 * kBs + 1));
  copier_->fail_next_for_testing(1);
  StepThatCopiesAhead(4);
  EXPECT_EQ(m_->Metrics().tier_offload_ahead_copies, 3);  // Only the first.
  ExpectConsistent();
  // Then the tier works on: every block reaches it, and the slots of the
  // copies the reset made unused are free again (the tier fills up).
  for (SequenceId id = 10; id < 20; ++id) {
    Compute(id, Prompt(3 * kBs + 1));
    ASSERT_TRUE(m_->Free(id).ok());
    ASSERT_TRUE(copier_->Synchronize().ok());
  }
  Compute(20, Prompt(kAheadPool * kBs));
  ASSERT_TRUE(copier_->Synchronize().ok());
  MetricsSnapshot s = m_->Metrics();
  EXPECT_GT(s.tier_offloads_ahead, 0);
  EXPECT_GE(s.host_tier_blocks_stored, 8 - 4);
  ExpectConsistent();
}

// A block onboarded from the tier keeps its slot as its copy ahead (the
// slot's bytes are its content): evicted again, it goes back to the tier with
// no copy at all (tier_offloads_kept), and a hit reads it back bit-exactly.
// Kept slots have a window of their own, min(tier_offload_ahead_blocks, a
// quarter of the tier): past it, an onboarded slot is freed as before.
TEST_P(HostTierTest, OnboardedBlockGoesBackToItsKeptSlotWithoutACopy) {
  for (const int tier_blocks : {12, 8}) {  // Kept window 3, then 2.
    SCOPED_TRACE(absl::StrCat("tier of ", tier_blocks, " blocks"));
    Make(kAheadPool, tier_blocks, 0,
         [](KVCacheConfig& c) { c.tier_offload_ahead_blocks = 4; });
    const int kept_window = std::min(4, tier_blocks / 4);
    const int64_t block_bytes = *BlockBytesAllLayers(m_->config());
    const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
    const std::vector<float> before = CacheOldest(1, prompt);
    Compute(2, Prompt(kAheadPool * kBs));  // Evicts them to the tier.
    ASSERT_TRUE(m_->Free(2).ok());
    ASSERT_TRUE(copier_->Synchronize().ok());
    ExpectHostHit(3, prompt, before);  // Onboards the 3.
    ASSERT_TRUE(copier_->Synchronize().ok());
    ExpectConsistent();
    MetricsSnapshot s = m_->Metrics();
    EXPECT_EQ(s.tier_onboards, 3);
    EXPECT_EQ(s.tier_offloads_kept, 0);
    ASSERT_TRUE(m_->Free(3).ok());
    Compute(4, Prompt(kAheadPool * kBs));  // Evicts them again.
    ASSERT_TRUE(copier_->Synchronize().ok());
    s = m_->Metrics();
    EXPECT_EQ(s.tier_offloads_kept, kept_window);
    EXPECT_EQ(s.tier_offload_bytes, ExpectedOffloadBytes(s, block_bytes));
    ExpectConsistent();
    ASSERT_TRUE(m_->Free(4).ok());
    ExpectHostHit(5, prompt, before);
    ExpectConsistent();
    ASSERT_TRUE(m_->Free(5).ok());
  }
}

// A kept slot whose block leaves the device otherwise is freed: by a reset
// (the slot comes back to the tier), and by a failed onboard (the onboarded
// blocks are dropped, their kept slots with them); nothing leaks and the
// tier keeps working.
TEST_P(HostTierTest, KeptSlotsSurviveResetAndFailedOnboards) {
  Make(kAheadPool, /*tier_blocks=*/12, 0,
       [](KVCacheConfig& c) { c.tier_offload_ahead_blocks = 4; });
  const std::vector<int32_t> prompt = Prompt(3 * kBs + 1);
  const std::vector<float> before = CacheOldest(1, prompt);
  Compute(2, Prompt(kAheadPool * kBs));
  ASSERT_TRUE(m_->Free(2).ok());
  ASSERT_TRUE(copier_->Synchronize().ok());
  ExpectHostHit(3, prompt, before);  // 3 kept slots.
  ASSERT_TRUE(m_->Free(3).ok());
  ASSERT_TRUE(m_->ResetPrefixCache().ok());
  ASSERT_TRUE(copier_->Synchronize().ok());
  ExpectConsistent();
  MetricsSnapshot s = m_->Metrics();
  EXPECT_EQ(s.host_tier_blocks_stored, 0);
  // The tier fills up again (no slot stayed reserved).
  for (SequenceId id = 10; id < 30; ++id) {
    Compute(id, Prompt(3 * kBs + 1));
    ASSERT_TRUE(m_->Free(id).ok());
    ASSERT_TRUE(copier_->Synchronize().ok());
  }
  Compute(30, Prompt(kAheadPool * kBs));
  ASSERT_TRUE(m_->Free(30).ok());
  ASSERT_TRUE(copier_->Synchronize().ok());
  EXPECT_GE(m_->Metrics().host_tier_blocks_stored, 12 - 4);
  ExpectConsistent();

  // A failed onboard: the sequence is not added and its blocks (and their
  // kept slots) are dropped.
  const std::vector<int32_t> second = Prompt(3 * kBs + 1);
  const std::vector<float> second_kv = CacheOldest(40, second);
  Compute(41, Prompt(kAheadPool * kBs));
  ASSERT_TRUE(m_->Free(41).ok());
  ASSERT_TRUE(copier_->Synchronize().ok());
  ASSERT_EQ(*m_->PeekPrefix(second), 3 * kBs);
  const int64_t failures = m_->Metrics().tier_copy_failures;
  const int64_t offloads = m_->Metrics().tier_offloads;
  copier_->fail_next_for_testing(2);  // The call's offloads and onboards.
  EXPECT_FALSE(m_->AddSequence(42, second).ok());
  EXPECT_FALSE(m_->SequenceLength(42).ok());
  EXPECT_GT(m_->Metrics().tier_copy_failures, failures);
  ExpectConsistent();
  ASSERT_TRUE(copier_->Synchronize().ok());
  // The content is gone from both tiers; recomputed, it caches as new.
  EXPECT_EQ(*m_->PeekPrefix(second), 0);
  Compute(43, second);
  ASSERT_TRUE(m_->Free(43).ok());
  Compute(44, Prompt(kAheadPool * kBs));
  ASSERT_TRUE(copier_->Synchronize().ok());
  EXPECT_GT(m_->Metrics().tier_offloads, offloads);
  ExpectConsistent();
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, HostTierTest,
    ::testing::Values(Case{DType::kInt8, ScalePlacement::kSide},
                      Case{DType::kFp8E4M3, ScalePlacement::kSide},
                      Case{DType::kBFloat16, ScalePlacement::kSide},
                      Case{DType::kInt8, ScalePlacement::kInline},
                      Case{DType::kFp8E4M3, ScalePlacement::kInline}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return absl::StrCat(DTypeName(info.param.cache_dtype), "_",
                          ScalePlacementName(info.param.placement));
    });

TEST(HostTierConfigTest, BadSizesAreRefusedByName) {
  KVCacheConfig c = Config(DType::kInt8, 8, 4);
  c.host_tier_bytes = -1;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("host_tier_bytes -1"), std::string::npos)
      << m.status();
  c.host_tier_bytes = 100;  // Less than one block.
  m = KVCacheManager::Create(c);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("holds no block"), std::string::npos)
      << m.status();
  c = Config(DType::kInt8, 8, 4);
  c.enable_prefix_caching = false;
  m = KVCacheManager::Create(c);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("enable_prefix_caching"),
            std::string::npos)
      << m.status();
  c.host_tier_bytes = 0;  // Off: no tier metrics.
  m = KVCacheManager::Create(c);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->Metrics().host_tier_blocks_total, 0);
  EXPECT_EQ((*m)->MetricsText().find("tier"), std::string::npos);
}

// The copy knobs are range-checked by name: offload ahead -1 (1/16 of the
// pool), 0 (off) or a count; 0 (the copy engines) to 1024 copy thread
// blocks.
TEST(HostTierConfigTest, BadCopyKnobsAreRefusedByName) {
  struct Bad {
    std::function<void(KVCacheConfig&)> set;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {[](KVCacheConfig& c) { c.tier_offload_ahead_blocks = -2; },
       "tier_offload_ahead_blocks -2"},
      {[](KVCacheConfig& c) { c.tier_copy_thread_blocks = -1; },
       "tier_copy_thread_blocks -1"},
      {[](KVCacheConfig& c) { c.tier_copy_thread_blocks = 1025; },
       "tier_copy_thread_blocks 1025"},
  };
  for (const Bad& b : bad) {
    KVCacheConfig c = Config(DType::kInt8, 8, 4);
    b.set(c);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    ASSERT_FALSE(m.ok()) << b.message;
    EXPECT_NE(m.status().message().find(b.message), std::string::npos)
        << m.status();
  }
  for (int64_t ahead : {int64_t{-1}, int64_t{0}, int64_t{3}}) {
    KVCacheConfig c = Config(DType::kInt8, 8, 4);
    c.tier_offload_ahead_blocks = ahead;
    c.tier_copy_thread_blocks = ahead == 3 ? 0 : 1024;
    EXPECT_TRUE(KVCacheManager::Create(c).ok()) << ahead;
  }
}

}  // namespace
}  // namespace kvcache
