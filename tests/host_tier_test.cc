// The host tier on the CPU backend (README "Host tier"; the tier is a second
// host pool there, so every path runs in CI): evicted hashed blocks are
// copied to the tier and hits come back bit-exactly, also while the offload
// copy is still in flight; the tier evicts its own oldest; a failed copy
// drops the block and leaks nothing; metrics and Validate across tiers. Every
// case runs with side scales and, for int8/fp8, with inline scales.

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
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
  // offloaded and reused at once); the policy's tests set their own.
  c.tier_offload_min_hits = 0;
  c.tier_offload_max_in_flight_bytes = 0;
  c.tier_hold_offloads = false;
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
  void Make(int32_t num_blocks, int tier_blocks, int32_t graph_max_tokens = 0) {
    KVCacheConfig config = Config(GetParam().cache_dtype, num_blocks,
                                  tier_blocks, GetParam().placement);
    config.graph_max_tokens = graph_max_tokens;
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

}  // namespace
}  // namespace kvcache
