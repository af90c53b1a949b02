// KVCacheManager on the CPU backend: config validation, every kind of bad input
// (each must name the bad value and leave the manager exactly as it was),
// lookups, views, DLPack input and metrics.

#include "api/kv_cache_manager.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "dlpack/dlpack.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

KVCacheConfig SmallConfig() {
  KVCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_size = 16;
  c.head_size_v = 8;
  c.block_size = 4;
  c.cache_dtype = DType::kInt8;
  c.input_dtype = DType::kBFloat16;
  c.num_blocks = 16;
  return c;
}

// K/V of `tokens` tokens for SmallConfig, bf16 on the host.
struct KV {
  explicit KV(int64_t tokens, int heads = 2, int d = 16, int dv = 8)
      : k(tokens * heads * d), v(tokens * heads * dv) {
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = testing::FloatToBf16(0.01f * static_cast<float>(i % 97) - 0.4f);
    }
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = testing::FloatToBf16(0.02f * static_cast<float>(i % 89) - 0.8f);
    }
    key =
        TensorView::Contiguous(k.data(), DType::kBFloat16, {tokens, heads, d});
    value =
        TensorView::Contiguous(v.data(), DType::kBFloat16, {tokens, heads, dv});
  }
  std::vector<uint16_t> k, v;
  TensorView key, value;
};

class ManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(SmallConfig());
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = *std::move(m);
  }

  // Everything observable about the manager, to compare before and after a
  // failed call.
  std::string Snapshot() {
    // Refused reservations are counted (an observation, not state): leave that
    // counter out.
    MetricsSnapshot metrics = manager_->Metrics();
    metrics.reserve_failures = 0;
    std::string s = ToPrometheusText(metrics);
    for (SequenceId id = 0; id < 40; ++id) {
      absl::StatusOr<std::vector<BlockId>> table = manager_->BlockTable(id);
      if (!table.ok()) continue;
      absl::StrAppend(&s, "seq ", id, " len ", *manager_->SequenceLength(id),
                      " blocks");
      for (BlockId b : *table) absl::StrAppend(&s, " ", b);
      absl::StrAppend(&s, "\n");
    }
    return s;
  }

  // Adds sequence `id` with `n` prompt tokens and writes them (one step, all
  // layers).
  void AddAndPrefill(SequenceId id, int n, int first_token = 1) {
    std::vector<TokenId> prompt(n);
    for (int i = 0; i < n; ++i) prompt[i] = first_token + i;
    absl::StatusOr<int64_t> computed = manager_->AddSequence(id, prompt);
    ASSERT_TRUE(computed.ok()) << computed.status();
    const int64_t todo = n - *computed;
    absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{id, {}, todo}});
    ASSERT_TRUE(plan.ok()) << plan.status();
    KV kv(todo);
    for (int layer = 0; layer < 2; ++layer) {
      ASSERT_TRUE(manager_->Append(plan->id, layer, kv.key, kv.value).ok());
    }
    ASSERT_TRUE(manager_->Commit(plan->id).ok());
  }

  void ExpectError(const absl::Status& status, absl::StatusCode code,
                   absl::string_view substring, const std::string& before) {
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_THAT(std::string(status.message()),
                HasSubstr(std::string(substring)));
    EXPECT_EQ(Snapshot(), before) << "a failed call changed the manager";
    EXPECT_TRUE(manager_->Validate().ok());
  }

  std::unique_ptr<KVCacheManager> manager_;
};

TEST(ManagerConfigTest, RejectsBadConfigsByName) {
  struct Bad {
    std::function<void(KVCacheConfig&)> change;
    std::string message;
  };
  const std::vector<Bad> cases = {
      {[](KVCacheConfig& c) { c.head_size = 100; }, "head_size 100"},
      {[](KVCacheConfig& c) { c.head_size = 2048; }, "head_size 2048"},
      {[](KVCacheConfig& c) { c.head_size_v = 12; }, "head_size_v 12"},
      {[](KVCacheConfig& c) { c.num_layers = 0; }, "num_layers 0"},
      {[](KVCacheConfig& c) { c.num_kv_heads = -3; }, "num_kv_heads -3"},
      {[](KVCacheConfig& c) { c.block_size = 0; }, "block_size 0"},
      {[](KVCacheConfig& c) { c.memory_budget_bytes = 1 << 20; },
       "exactly one of"},
      {[](KVCacheConfig& c) { c.num_blocks = 0; }, "exactly one of"},
      {[](KVCacheConfig& c) {
         c.cache_dtype = DType::kBFloat16;
         c.input_dtype = DType::kFloat16;
       },
       "must equal cache_dtype"},
      {[](KVCacheConfig& c) { c.cache_dtype = DType::kFloat32; },
       "cache_dtype"},
      {[](KVCacheConfig& c) { c.input_dtype = DType::kInt8; }, "input_dtype"},
      {[](KVCacheConfig& c) { c.cache_dtype = static_cast<DType>(42); },
       "cache_dtype 42"},
      {[](KVCacheConfig& c) { c.max_inflight_plans = 0; },
       "max_inflight_plans 0"},
      {[](KVCacheConfig& c) {
         c.scale_placement = static_cast<ScalePlacement>(3);
       },
       "scale_placement 3"},
      {[](KVCacheConfig& c) {
         c.cache_dtype = c.input_dtype = DType::kFloat16;
         c.scale_placement = ScalePlacement::kInline;
       },
       "scale_placement inline needs an int8 or fp8_e4m3 cache; cache_dtype "
       "is float16"},
  };
  for (const Bad& bad : cases) {
    KVCacheConfig config = SmallConfig();
    bad.change(config);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument)
        << bad.message;
    EXPECT_THAT(std::string(m.status().message()), HasSubstr(bad.message));
  }
}

TEST(ManagerConfigTest, CapacityFromAMemoryBudget) {
  KVCacheConfig config = SmallConfig();
  config.num_blocks = 0;
  // One block of both layers: 2 * (4 * 2 * (16 + 8) bytes + 2 * 4 * 2 * 4 bytes
  // of scales) = 512.
  config.memory_budget_bytes = 2 * 1024 + 100 * 512 + 10;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
      KVCacheManager::Create(config);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->TotalBlocks(), 100);
  config.memory_budget_bytes = 1000;
  m = KVCacheManager::Create(config);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("holds no block"));
}

TEST(ManagerConfigTest, InlineScalesCountInTheRowsOfACapacity) {
  KVCacheConfig config = SmallConfig();
  config.scale_placement = ScalePlacement::kInline;
  config.num_blocks = 0;
  // Inline rows of max(16, 8) codes + 4 bytes of scale, padded to 32 bytes:
  // one block of both layers is 2 * (4 * 2 * 2 * 32) = 1024 bytes.
  ASSERT_EQ(config.head_size, 16);
  ASSERT_EQ(config.head_size_v, 8);
  EXPECT_EQ(*BlockBytesAllLayers(config), 1024);
  config.memory_budget_bytes = 2 * 1024 + 100 * 1024 + 10;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
      KVCacheManager::Create(config);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->TotalBlocks(), 100);
}

TEST(ManagerConfigTest, CapacityFromAFractionOfFreeMemory) {
  KVCacheConfig config = SmallConfig();
  config.num_blocks = 0;
  config.memory_fraction = 1e-6;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
      KVCacheManager::Create(config);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_GT((*m)->TotalBlocks(), 0);
}

TEST_F(ManagerTest, UnknownIdsAreNotFound) {
  AddAndPrefill(1, 6);
  const std::string before = Snapshot();
  ExpectError(manager_->Reserve({{99, {}, 1}}).status(),
              absl::StatusCode::kNotFound, "99", before);
  ExpectError(manager_->Free(77), absl::StatusCode::kNotFound, "77", before);
  ExpectError(manager_->Fork(55, 56), absl::StatusCode::kNotFound, "55",
              before);
  ExpectError(manager_->BlockTable(44).status(), absl::StatusCode::kNotFound,
              "44", before);
  ExpectError(manager_->BatchBlockTable({1, 33}).status(),
              absl::StatusCode::kNotFound, "33", before);
  KV kv(1);
  ExpectError(manager_->Append(12345, 0, kv.key, kv.value),
              absl::StatusCode::kNotFound, "plan 12345", before);
  ExpectError(manager_->Commit(12345), absl::StatusCode::kNotFound,
              "plan 12345", before);
  ExpectError(manager_->Abort(12345), absl::StatusCode::kNotFound, "plan 12345",
              before);
}

TEST_F(ManagerTest, DuplicateIdsAndEmptyInputsAreRejected) {
  AddAndPrefill(1, 6);
  const std::string before = Snapshot();
  ExpectError(manager_->AddSequence(1, std::vector<TokenId>{1, 2}).status(),
              absl::StatusCode::kAlreadyExists, "1", before);
  ExpectError(manager_->AddSequence(2, std::vector<TokenId>{}).status(),
              absl::StatusCode::kInvalidArgument, "2", before);
  ExpectError(manager_->Fork(1, 1), absl::StatusCode::kAlreadyExists, "1",
              before);
  ExpectError(manager_->Reserve({{1, {7}, 0}}).status(),
              absl::StatusCode::kInvalidArgument, "0", before);
  ExpectError(manager_->Reserve({}).status(),
              absl::StatusCode::kInvalidArgument, "empty batch", before);
}

TEST_F(ManagerTest, ReserveBeyondCapacityChangesNothing) {
  AddAndPrefill(1, 6);
  // 200 tokens can never fit in 16 blocks of 4 (issue #15: that is not a
  // shortage to preempt for): OutOfRange, nothing changed.
  std::vector<TokenId> huge(200, 5);
  EXPECT_EQ(manager_->AddSequence(2, huge).status().code(),
            absl::StatusCode::kOutOfRange);
  // 60 tokens (15 blocks) fit the pool, not the 14 blocks left now.
  std::vector<TokenId> prompt(60, 5);
  ASSERT_TRUE(manager_->AddSequence(2, prompt).ok());
  const std::string before = Snapshot();
  ExpectError(manager_->Reserve({{1, {3}, 1}, {2, {}, 60}}).status(),
              absl::StatusCode::kResourceExhausted, "", before);
  EXPECT_EQ(manager_->CanReserve({{2, {}, 60}}).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(manager_->CanReserve({{2, {}, 20}}).ok());
  absl::StatusOr<int64_t> fit = manager_->TokensThatFit(2);
  ASSERT_TRUE(fit.ok());
  EXPECT_GT(*fit, 0);
  EXPECT_LT(*fit, 60);
  EXPECT_EQ(manager_->Metrics().reserve_failures, 1);
}

TEST_F(ManagerTest, BadTensorsAreRejectedByName) {
  AddAndPrefill(1, 6);
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {9, 10}, 2}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::string before = Snapshot();
  KV kv(2);
  auto expect_bad = [&](const TensorView& k, const TensorView& v,
                        absl::string_view substring, int layer = 0) {
    ExpectError(manager_->Append(plan->id, layer, k, v),
                absl::StatusCode::kInvalidArgument, substring, before);
  };
  expect_bad(kv.key, kv.value, "layer -1", -1);
  expect_bad(kv.key, kv.value, "layer 2", 2);
  TensorView k = kv.key;
  k.data = nullptr;
  expect_bad(k, kv.value, "key data is null");
  k = kv.key;
  k.shape[1] = 3;
  expect_bad(k, kv.value, "3 heads");
  k = kv.key;
  k.shape[2] = 8;
  expect_bad(k, kv.value, "head size 8");
  k = kv.key;
  k.dtype = DType::kFloat16;
  expect_bad(k, kv.value, "dtype float16");
  k = kv.key;
  k.strides[2] = 2;
  expect_bad(k, kv.value, "stride 2");
  k = kv.key;
  k.ndim = 2;
  expect_bad(k, kv.value, "2 dimensions");
  k = kv.key;
  k.memory = MemoryKind::kCuda;
  expect_bad(k, kv.value, "CUDA device");
  TensorView v = kv.value;
  v.shape[0] = 1;
  expect_bad(kv.key, v, "value has 1 tokens");
  v = kv.value;
  v.shape[2] = 16;
  expect_bad(kv.key, v, "value head size 16");
  KV three(3);
  expect_bad(three.key, three.value, "exceeds its reservation");
  // Nothing was written: the plan still takes exactly its two tokens.
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(manager_->Append(plan->id, layer, kv.key, kv.value).ok());
  }
  EXPECT_EQ(manager_->Append(plan->id, 0, kv.key, kv.value).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
}

TEST_F(ManagerTest, PlanLifeCycleErrors) {
  AddAndPrefill(1, 6);
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {9}, 1}});
  ASSERT_TRUE(plan.ok());
  KV kv(1);
  ASSERT_TRUE(manager_->Append(plan->id, 0, kv.key, kv.value).ok());
  std::string before = Snapshot();
  ExpectError(manager_->Commit(plan->id), absl::StatusCode::kFailedPrecondition,
              "layer 1", before);
  ExpectError(manager_->Free(1), absl::StatusCode::kFailedPrecondition,
              "in flight", before);
  ExpectError(manager_->Fork(1, 2), absl::StatusCode::kFailedPrecondition,
              "in flight", before);
  ExpectError(manager_->Reserve({{1, {}, 1}}).status(),
              absl::StatusCode::kFailedPrecondition, "is in flight", before);
  ASSERT_TRUE(manager_->Append(plan->id, 1, kv.key, kv.value).ok());
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
  before = Snapshot();
  ExpectError(manager_->Commit(plan->id), absl::StatusCode::kNotFound,
              absl::StrCat("plan ", plan->id), before);
  ExpectError(manager_->Append(plan->id, 0, kv.key, kv.value),
              absl::StatusCode::kNotFound, absl::StrCat("plan ", plan->id),
              before);
  EXPECT_EQ(*manager_->SequenceLength(1), 7);
}

TEST_F(ManagerTest, AbortGivesTheRoomBack) {
  AddAndPrefill(1, 6);
  const std::string before = Snapshot();
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {}, 0}});
  EXPECT_FALSE(plan.ok());
  plan = manager_->Reserve({{1, {9, 10, 11}, 3}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(manager_->Abort(plan->id).ok());
  EXPECT_EQ(*manager_->SequenceLength(1), 6);
  EXPECT_EQ(manager_->FreeBlocks() + manager_->EvictableBlocks(), 16 - 2);
  (void)before;
}

TEST_F(ManagerTest, TooManyPlansInFlight) {
  for (SequenceId id = 1; id <= 5; ++id) AddAndPrefill(id, 3, 100 * id);
  std::vector<uint64_t> plans;
  for (SequenceId id = 1; id <= 4; ++id) {
    absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{id, {1}, 1}});
    ASSERT_TRUE(plan.ok()) << plan.status();
    plans.push_back(plan->id);
  }
  const std::string before = Snapshot();
  ExpectError(manager_->Reserve({{5, {1}, 1}}).status(),
              absl::StatusCode::kFailedPrecondition, "max_inflight_plans",
              before);
  ASSERT_TRUE(manager_->Abort(plans[0]).ok());
  EXPECT_TRUE(manager_->Reserve({{5, {1}, 1}}).ok());
}

TEST_F(ManagerTest, GatherChecksItsRange) {
  AddAndPrefill(1, 6);
  std::vector<float> k(7 * 2 * 16), v(7 * 2 * 8);
  TensorView kt = TensorView::Contiguous(k.data(), DType::kFloat32, {7, 2, 16});
  TensorView vt = TensorView::Contiguous(v.data(), DType::kFloat32, {7, 2, 8});
  const std::string before = Snapshot();
  ExpectError(manager_->Gather(1, 0, 0, 7, kt, vt),
              absl::StatusCode::kInvalidArgument, "6 computed tokens", before);
  ExpectError(manager_->Gather(1, 0, -1, 2, kt, vt),
              absl::StatusCode::kInvalidArgument, "6 computed tokens", before);
  ExpectError(manager_->Gather(1, 5, 0, 2, kt, vt),
              absl::StatusCode::kInvalidArgument, "layer 5", before);
  ExpectError(manager_->Gather(1, 0, 0, 6, kt, vt),
              absl::StatusCode::kInvalidArgument, "7 tokens", before);
  kt.shape[0] = vt.shape[0] = 6;
  EXPECT_TRUE(manager_->Gather(1, 0, 0, 6, kt, vt).ok());
}

TEST_F(ManagerTest, ForkCopiesTheSharedPartialBlockOnWrite) {
  AddAndPrefill(1, 6);  // Blocks: one full, one with 2 of 4 tokens.
  ASSERT_TRUE(manager_->Fork(1, 2).ok());
  EXPECT_EQ(*manager_->BlockTable(1), *manager_->BlockTable(2));
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{2, {42}, 1}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->num_block_copies, 1);
  KV kv(1);
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(manager_->Append(plan->id, layer, kv.key, kv.value).ok());
  }
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
  const std::vector<BlockId> a = *manager_->BlockTable(1);
  const std::vector<BlockId> b = *manager_->BlockTable(2);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_NE(a[1], b[1]);
  // The copied block holds the parent's first two tokens, in every layer.
  for (int layer = 0; layer < 2; ++layer) {
    std::vector<float> k1(2 * 2 * 16), v1(2 * 2 * 8), k2(k1.size()),
        v2(v1.size());
    auto view = [](std::vector<float>& x, int d) {
      return TensorView::Contiguous(x.data(), DType::kFloat32, {2, 2, d});
    };
    ASSERT_TRUE(
        manager_->Gather(1, layer, 4, 2, view(k1, 16), view(v1, 8)).ok());
    ASSERT_TRUE(
        manager_->Gather(2, layer, 4, 2, view(k2, 16), view(v2, 8)).ok());
    EXPECT_EQ(k1, k2);
    EXPECT_EQ(v1, v2);
  }
  EXPECT_EQ(manager_->Metrics().block_copies, 1);
}

TEST_F(ManagerTest, BatchBlockTableAndLayerView) {
  AddAndPrefill(1, 6);
  AddAndPrefill(2, 9, 1000);
  absl::StatusOr<BlockTableView> view = manager_->BatchBlockTable({2, 1});
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->num_sequences, 2);
  EXPECT_EQ(view->max_blocks, 3);
  const std::vector<BlockId> t2 = *manager_->BlockTable(2);
  const std::vector<BlockId> t1 = *manager_->BlockTable(1);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(view->block_table[i], t2[i]);
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(view->block_table[view->row_stride + i], t1[i]);
  }
  EXPECT_EQ(view->seq_lens[0], 9);
  EXPECT_EQ(view->seq_lens[1], 6);
  const int32_t* first = view->block_table;
  EXPECT_EQ(manager_->BatchBlockTable({1})->block_table, first)
      << "block-table buffers must not move (CUDA graph capture)";

  absl::StatusOr<LayerView> layer = manager_->GetLayerView(1);
  ASSERT_TRUE(layer.ok());
  EXPECT_EQ(layer->num_blocks, 16);
  EXPECT_EQ(layer->key_strides[0], 4 * 2 * 16);
  EXPECT_EQ(layer->key_strides[1], 2 * 16);
  EXPECT_EQ(layer->value_strides[0], 4 * 2 * 8);
  EXPECT_EQ(layer->scale_strides[0], 8);
  ASSERT_NE(layer->key_scale, nullptr);
  // Scale of token 0, head 1 of sequence 1 in layer 1 is set; an untouched
  // block's is zero.
  const int64_t slot0 = t1[0] * 4;
  EXPECT_GT(layer->key_scale[slot0 * 2 + 1], 0.0f);
  EXPECT_EQ(manager_->GetLayerView(2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ManagerTest, AppendTakesDLPackTensors) {
  ASSERT_TRUE(manager_->AddSequence(1, std::vector<TokenId>{1, 2, 3}).ok());
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {}, 3}});
  ASSERT_TRUE(plan.ok());
  KV kv(3);
  int64_t k_shape[3] = {3, 2, 16}, v_shape[3] = {3, 2, 8};
  DLTensor k{};
  k.data = kv.k.data();
  k.device = {kDLCPU, 0};
  k.ndim = 3;
  k.dtype = {kDLBfloat, 16, 1};
  k.shape = k_shape;
  DLTensor v = k;
  v.data = kv.v.data();
  v.shape = v_shape;
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(manager_->Append(plan->id, layer, k, v).ok());
  }
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
  DLTensor bad = k;
  bad.dtype = {kDLInt, 8, 1};
  absl::StatusOr<StepPlanInfo> next = manager_->Reserve({{1, {4}, 1}});
  ASSERT_TRUE(next.ok());
  absl::Status s = manager_->Append(next->id, 0, bad, v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("bits 8"));
}

TEST_F(ManagerTest, MetricsCountWhatHappened) {
  AddAndPrefill(1, 8);
  AddAndPrefill(2, 8);  // Same tokens: the first block is a prefix hit.
  const MetricsSnapshot m = manager_->Metrics();
  EXPECT_EQ(m.prefix_queries, 2);
  EXPECT_EQ(m.prefix_hit_tokens, 4);
  EXPECT_EQ(m.tokens_committed, 8 + 4);
  EXPECT_EQ(m.tokens_appended, 2 * (8 + 4));
  EXPECT_EQ(m.kernel_launches, 4);
  EXPECT_EQ(m.sequences, 2);
  EXPECT_EQ(m.blocks_total, 16);
  EXPECT_EQ(m.blocks_in_use, 3);
  const std::string text = manager_->MetricsText();
  EXPECT_THAT(text, HasSubstr("# TYPE kvcache_blocks gauge"));
  EXPECT_THAT(text, HasSubstr("kvcache_blocks{state=\"in_use\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("kvcache_prefix_hit_tokens_total 4\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE kvcache_evictions_total counter"));
}

}  // namespace
}  // namespace kvcache
