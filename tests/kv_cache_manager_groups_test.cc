// KVCacheManager with layer groups on the CPU backend: a Gemma-3-like config
// (5 sliding : 1 full) and a DeepSeek-like K-only config, Append/Gather of
// every layer against the reference (tests/group_runner.h), sliding-window
// release (reads of in-window tokens stay right, released tokens are
// refused, pages held stay bounded), hybrid prefix hits against an
// independent computation, and the refusals of what groups do not offer.
// Fork, Truncate and speculative steps: kv_cache_manager_groups_fork_test.

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "tests/group_runner.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int kWindow = 16;
constexpr int kBlock = 4;

// 12 layers: layers 5 and 11 full, the others sliding (window 16).
KVCacheConfig GemmaLike() {
  KVCacheConfig c;
  c.num_layers = 12;
  c.block_size = kBlock;
  c.num_blocks = 400;
  c.input_dtype = DType::kFloat32;
  c.max_tokens_per_step = 256;
  c.max_sequences_per_step = 8;
  LayerGroup sliding, full;
  sliding.kind = AttentionKind::kSlidingWindow;
  sliding.sliding_window = kWindow;
  for (LayerGroup* g : {&sliding, &full}) {
    g->num_kv_heads = 2;
    g->head_size = 32;
    g->head_size_v = 16;
    g->cache_dtype = DType::kInt8;
  }
  for (int l = 0; l < 12; ++l)
    (l % 6 == 5 ? full : sliding).layers.push_back(l);
  c.layer_groups = {sliding, full};
  return c;
}

// DeepSeek-like MLA: one latent head of 576, no V, full attention.
KVCacheConfig DeepSeekLike(DType dtype = DType::kInt8) {
  KVCacheConfig c;
  c.num_layers = 3;
  c.block_size = kBlock;
  c.num_blocks = 64;
  c.input_dtype = DType::kFloat32;
  LayerGroup mla;
  mla.num_kv_heads = 1;
  mla.head_size = 576;
  mla.head_size_v = 0;
  mla.cache_dtype = dtype;
  mla.layers = {0, 1, 2};
  c.layer_groups = {mla};
  return c;
}

using Fixture = testing::GroupFixture;

TEST(GroupManagerTest, TablesAndViewsPerLayer) {
  Fixture f(GemmaLike(), 1);
  ASSERT_NE(f.manager, nullptr);
  KVCacheManager& m = *f.manager;
  // gcd(10, 2) = 2 layers per page: 5 sliding tables, 1 full table.
  EXPECT_EQ(m.NumBlockTables(), 6);
  EXPECT_EQ(*m.LayerBlockTable(0), 0);
  EXPECT_EQ(*m.LayerBlockTable(1), 0);
  EXPECT_EQ(*m.LayerBlockTable(2), 1);
  EXPECT_EQ(*m.LayerBlockTable(5), 5);
  EXPECT_EQ(*m.LayerBlockTable(11), 5);
  EXPECT_EQ(m.TotalBlocks(), 400);
  for (int layer = 0; layer < 12; ++layer) {
    absl::StatusOr<LayerView> v = m.GetLayerView(layer);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->head_size, 32);
    EXPECT_EQ(v->head_size_v, 16);
    EXPECT_NE(v->value_cache, nullptr);
  }
  // Layers of one slot share an allocation; the two slots differ.
  EXPECT_EQ(m.GetLayerView(0)->key_cache, m.GetLayerView(2)->key_cache);
  EXPECT_NE(m.GetLayerView(0)->key_cache, m.GetLayerView(1)->key_cache);
}

TEST(GroupManagerTest, GemmaLikeRoundTripAndWindowRelease) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Fixture f(GemmaLike(), seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  std::mt19937_64 rng(seed);
  const std::vector<SequenceId> ids = {1, 2, 3};
  for (SequenceId id : ids) {
    ASSERT_TRUE(r.Add(id, r.RandomTokens(20 + rng() % 30, 50)).ok());
  }
  // Prefill in chunks, then decode; check everything readable each time.
  for (int step = 0; step < 40; ++step) {
    std::vector<int64_t> n;
    for (SequenceId id : ids) {
      const int64_t len = *m.SequenceLength(id);
      const int64_t known =
          static_cast<int64_t>(r.sequences().at(id).tokens.size());
      n.push_back(len < known ? std::min<int64_t>(known - len, 1 + rng() % 9)
                              : 1);
    }
    ASSERT_TRUE(r.Step(ids, n).ok()) << "step " << step;
    ASSERT_TRUE(m.Validate().ok()) << m.Validate();
    ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
    // Sliding tables hold at most the window's blocks (+ the partial one)
    // per sequence; the full table holds every block.
    int64_t full_need = 0;
    for (SequenceId id : ids) {
      full_need += (*m.SequenceLength(id) + kBlock - 1) / kBlock;
    }
    for (int32_t t = 0; t < 5; ++t) {
      EXPECT_LE(m.HeldBlocks(t),
                static_cast<int64_t>(ids.size()) * (kWindow / kBlock + 1))
          << "table " << t;
    }
    EXPECT_EQ(m.HeldBlocks(5), full_need);
  }
  // Every sequence is long now: its first tokens left the window.
  for (SequenceId id : ids) {
    ASSERT_GT(*m.SequenceLength(id), 2 * kWindow);
    const int64_t first = r.FirstReadable(id, 0);
    EXPECT_GT(first, 0);
    EXPECT_LE(*m.SequenceLength(id) - first, kWindow + 2 * kBlock);
    // Released tokens: OutOfRange naming the window; full layers read them.
    absl::Status s = r.CheckGather(id, 0, 0, 1);
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
    EXPECT_THAT(s.message(), HasSubstr("sliding window"));
    EXPECT_TRUE(r.CheckGather(id, 5, 0, 1).ok());
    // The block table marks released blocks kNullBlock (-1).
    const std::vector<BlockId> t = *m.GroupBlockTable(id, 0);
    EXPECT_EQ(t[0], -1);
    EXPECT_GE(t.back(), 0);
    absl::StatusOr<BlockTableView> bt = m.GroupBatchBlockTable(ids, 0);
    ASSERT_TRUE(bt.ok()) << bt.status();
    EXPECT_EQ(bt->block_table[0], -1);
  }
  for (SequenceId id : ids) ASSERT_TRUE(r.Free(id).ok());
  EXPECT_EQ(m.Metrics().blocks_in_use, 0);
  ASSERT_TRUE(m.Validate().ok());
}

TEST(GroupManagerTest, HybridPrefixHitsMatchAnIndependentComputation) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Fixture f(GemmaLike(), seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  std::mt19937_64 rng(seed);
  // A: a prompt computed whole (its early sliding blocks are released to the
  // prefix cache, which is large enough never to evict).
  const std::vector<TokenId> a = r.RandomTokens(40 + rng() % 20, 1000);
  ASSERT_EQ(*r.Add(1, a), 0);
  ASSERT_TRUE(r.Step({1}, {static_cast<int64_t>(a.size())}).ok());
  for (int trial = 0; trial < 8; ++trial) {
    // B shares A's first `common` tokens, then differs.
    const int64_t common = rng() % (a.size() + 1);
    std::vector<TokenId> b(a.begin(), a.begin() + common);
    const int64_t extra = 1 + rng() % 20;
    for (int64_t i = 0; i < extra; ++i) b.push_back(2000 + trial);
    // Independent: every block of A is cached (held or released, never
    // evicted), so every table can serve any whole block of the common
    // prefix, leaving at least one token to compute.
    const int64_t want =
        std::min<int64_t>(common / kBlock,
                          (static_cast<int64_t>(b.size()) - 1) / kBlock) *
        kBlock;
    const SequenceId id = 100 + trial;
    EXPECT_EQ(*m.PeekPrefix(b), want);
    absl::StatusOr<int64_t> hit = r.Add(id, b);
    ASSERT_TRUE(hit.ok()) << hit.status();
    EXPECT_EQ(*hit, want) << "common " << common << " prompt " << b.size();
    // The hit's tokens read back as A's in every layer that still holds
    // them; then B computes the rest.
    if (want > 0) {
      ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
    }
    ASSERT_TRUE(r.Step({id}, {static_cast<int64_t>(b.size()) - want}).ok());
    ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
    ASSERT_TRUE(m.Validate().ok()) << m.Validate();
    ASSERT_TRUE(r.Free(id).ok());
  }
}

TEST(GroupManagerTest, BoundedBlocksAtSteadyStateDecode) {
  // A long decode under a small pool: sliding layers only keep their
  // window, so 4 sequences of 300 tokens fit in a pool the full layers
  // alone nearly fill.
  KVCacheConfig c = GemmaLike();
  c.num_blocks = 4 * (300 / kBlock + 1) + 4 * 5 * (kWindow / kBlock + 2);
  Fixture f(c, 7);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  const std::vector<SequenceId> ids = {1, 2, 3, 4};
  for (SequenceId id : ids) ASSERT_TRUE(r.Add(id, r.RandomTokens(8, 9)).ok());
  ASSERT_TRUE(r.Step(ids, {8, 8, 8, 8}).ok());
  for (int step = 0; step < 292; ++step) {
    ASSERT_TRUE(r.Step(ids, {1, 1, 1, 1}).ok()) << "step " << step;
    for (int32_t t = 0; t < 5; ++t) {
      ASSERT_LE(m.HeldBlocks(t), 4 * (kWindow / kBlock + 1));
    }
  }
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  ASSERT_TRUE(m.Validate().ok());
}

class KOnlyTest : public ::testing::TestWithParam<DType> {};

TEST_P(KOnlyTest, DeepSeekLikeRoundTrip) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Fixture f(DeepSeekLike(GetParam()), seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  for (int layer = 0; layer < 3; ++layer) {
    const LayerView v = *m.GetLayerView(layer);
    EXPECT_EQ(v.value_cache, nullptr);
    EXPECT_EQ(v.value_scale, nullptr);
    EXPECT_EQ(v.head_size_v, 0);
  }
  ASSERT_TRUE(r.Add(1, r.RandomTokens(13, 100)).ok());
  ASSERT_TRUE(r.Add(2, r.RandomTokens(6, 100)).ok());
  ASSERT_TRUE(r.Step({1, 2}, {13, 6}).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(r.Step({1, 2}, {1, 2}).ok());
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  ASSERT_TRUE(r.CheckGather(1, 2, 3, 7).ok());
  ASSERT_TRUE(m.Validate().ok());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KOnlyTest,
                         ::testing::Values(DType::kInt8, DType::kFp8E4M3));

TEST(GroupManagerTest, KOnlyRefusesV) {
  Fixture f(DeepSeekLike(), 3);
  ASSERT_NE(f.manager, nullptr);
  KVCacheManager& m = *f.manager;
  ASSERT_TRUE(m.AddSequence(1, std::vector<TokenId>{1, 2, 3}).ok());
  ReserveRequest req;
  req.sequence = 1;
  req.num_tokens = 3;
  absl::StatusOr<StepPlanInfo> plan = m.Reserve({req});
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<float> k(3 * 576), v(3 * 576);
  const TensorView key =
      TensorView::Contiguous(k.data(), DType::kFloat32, {3, 1, 576});
  const TensorView value =
      TensorView::Contiguous(v.data(), DType::kFloat32, {3, 1, 576});
  absl::Status s = m.Append(plan->id, 0, key, value);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("K-only"));
  ASSERT_TRUE(m.Validate().ok());
  for (int layer = 0; layer < 3; ++layer) {
    ASSERT_TRUE(m.Append(plan->id, layer, key, TensorView()).ok());
  }
  ASSERT_TRUE(m.Commit(plan->id).ok());
  std::vector<float> ko(3 * 576), vo(3 * 576);
  s = m.Gather(1, 0, 0, 3,
               TensorView::Contiguous(ko.data(), DType::kFloat32, {3, 1, 576}),
               TensorView::Contiguous(vo.data(), DType::kFloat32, {3, 1, 576}));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("K-only"));
}

TEST(GroupManagerTest, RefusesWhatGroupsDoNotOffer) {
  Fixture f(GemmaLike(), 5);
  ASSERT_NE(f.manager, nullptr);
  KVCacheManager& m = *f.manager;
  ASSERT_TRUE(m.AddSequence(1, std::vector<TokenId>{1, 2, 3, 4, 5}).ok());
  const std::vector<SequenceId> ids = {1};
  auto expect = [](absl::Status s, absl::StatusCode code,
                   const std::string& text) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_THAT(s.message(), HasSubstr(text));
  };
  expect(m.GroupBatchBlockTable(ids, 6).status(),
         absl::StatusCode::kInvalidArgument, "block table 6");
  expect(m.GroupBatchBlockTable(ids, -1).status(),
         absl::StatusCode::kInvalidArgument, "block table -1");
  expect(m.GroupBlockTable(1, 9).status(), absl::StatusCode::kInvalidArgument,
         "block table 9");
  expect(m.BatchBlockTable(ids).status(), absl::StatusCode::kInvalidArgument,
         "6 block tables");
  expect(m.BlockTable(1).status(), absl::StatusCode::kInvalidArgument,
         "6 block tables");
  expect(m.LayerBlockTable(12).status(), absl::StatusCode::kInvalidArgument,
         "layer 12");
  expect(m.GetLayerView(-1).status(), absl::StatusCode::kInvalidArgument,
         "layer -1");
  expect(m.Truncate(1, 3), absl::StatusCode::kInvalidArgument,
         "expected 0 to its 0 computed tokens");
  EXPECT_TRUE(m.ResetPrefixCache().ok());
  // graph_max_tokens 0: no graph step; GraphStep needs a table named.
  expect(m.GroupGraphStep(0).status(), absl::StatusCode::kFailedPrecondition,
         "graph_max_tokens 0");
  expect(m.GroupGraphStep(6).status(), absl::StatusCode::kInvalidArgument,
         "block table 6");
  expect(m.GraphStep().status(), absl::StatusCode::kInvalidArgument,
         "6 block tables");
  expect(m.GroupBlockTable(77, 0).status(), absl::StatusCode::kNotFound, "77");
  ReserveRequest req;
  req.sequence = 1;
  req.num_tokens = 5;
  absl::StatusOr<StepPlanInfo> plan = m.Reserve({req});
  ASSERT_TRUE(plan.ok()) << plan.status();
  expect(m.Commit(plan->id, std::vector<int64_t>{5}),
         absl::StatusCode::kFailedPrecondition, "layer 0 holds 0");
  expect(m.Fork(1, 2), absl::StatusCode::kFailedPrecondition, "in flight");
  expect(m.Truncate(1, 0), absl::StatusCode::kFailedPrecondition, "in flight");
  expect(m.ResetPrefixCache(), absl::StatusCode::kFailedPrecondition,
         "in flight");
  expect(m.Commit(plan->id), absl::StatusCode::kFailedPrecondition,
         "layer 0 holds 0");
  expect(m.Free(1), absl::StatusCode::kFailedPrecondition, "in flight");
  expect(m.Reserve({req}).status(), absl::StatusCode::kFailedPrecondition,
         "in flight");
  std::vector<float> k(5 * 2 * 32), v(5 * 2 * 16);
  const TensorView key =
      TensorView::Contiguous(k.data(), DType::kFloat32, {5, 2, 32});
  const TensorView value =
      TensorView::Contiguous(v.data(), DType::kFloat32, {5, 2, 16});
  expect(m.Append(plan->id, 12, key, value), absl::StatusCode::kInvalidArgument,
         "layer 12");
  expect(m.Append(plan->id, 0, key, TensorView()),
         absl::StatusCode::kInvalidArgument, "value");
  ASSERT_TRUE(m.Append(plan->id, 0, key, value).ok());
  expect(m.Append(plan->id, 0, key, value), absl::StatusCode::kInvalidArgument,
         "exceeds its reservation");
  ASSERT_TRUE(m.Abort(plan->id).ok());
  ASSERT_TRUE(m.Validate().ok());
  ASSERT_TRUE(m.Free(1).ok());
  EXPECT_EQ(m.FreeBlocks(), 400);
}

TEST(GroupManagerTest, CreateRefusesByName) {
  KVCacheConfig c = GemmaLike();
  c.host_tier_bytes = 1 << 20;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  EXPECT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("host_tier_bytes"));
}

TEST(GroupManagerTest, UniformManagerHasOneTable) {
  KVCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 1;
  c.head_size = 16;
  c.block_size = 4;
  c.num_blocks = 8;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->NumBlockTables(), 1);
  EXPECT_EQ(*(*m)->LayerBlockTable(1), 0);
  ASSERT_TRUE((*m)->AddSequence(1, std::vector<TokenId>{1, 2}).ok());
  EXPECT_TRUE((*m)->GroupBlockTable(1, 0).ok());
  EXPECT_EQ((*m)->GroupBlockTable(1, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<SequenceId> ids = {1};
  EXPECT_EQ((*m)->GroupBatchBlockTable(ids, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvcache
