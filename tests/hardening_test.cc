// Regression tests of issue #12 (hostile use of the C++ API on the CPU
// backend): each test reproduces one finding, which crashed, read out of
// bounds, leaked another tenant's data or changed the manager on failure
// before the fix. The C API's findings are in kvcache_c_hardening_test.c, the
// cross-tenant property test in tenant_isolation_test.cc.

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "dlpack/dlpack.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

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

// ---- Item 1: config limits -------------------------------------------------

TEST(ConfigLimitsTest, TheWrappingShapeIsRejected) {
  // The reproducer: one block's int64 size wrapped to 0 and Create divided by
  // it (SIGFPE); with num_blocks = 1 it made a 0-byte cache.
  KVCacheConfig c = SmallConfig();
  c.num_kv_heads = 1 << 27;
  c.head_size = 1024;
  c.head_size_v = 0;
  c.block_size = 1 << 27;
  c.cache_dtype = c.input_dtype = DType::kBFloat16;
  c.num_blocks = 0;
  c.memory_budget_bytes = int64_t{1} << 30;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(m.status().message()),
              HasSubstr("num_kv_heads 134217728 exceeds 1024"));
  c.memory_budget_bytes = 0;
  c.num_blocks = 1;
  m = KVCacheManager::Create(c);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigLimitsTest, EachLimitIsNamedWithItsValue) {
  struct Case {
    std::function<void(KVCacheConfig&)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](KVCacheConfig& c) { c.num_layers = kMaxNumLayers + 1; },
       "num_layers 1025 exceeds 1024"},
      {[](KVCacheConfig& c) { c.num_kv_heads = kMaxNumKvHeads + 1; },
       "num_kv_heads 1025 exceeds 1024"},
      {[](KVCacheConfig& c) { c.block_size = kMaxBlockSize + 1; },
       "block_size 2049 exceeds 2048"},
      {[](KVCacheConfig& c) { c.head_size = 1032; },
       "head_size 1032 is not in [8, 1024]"},
      {[](KVCacheConfig& c) { c.max_tokens_per_step = INT32_MAX; },
       "max_tokens_per_step 2147483647 exceeds 1048576"},
      {[](KVCacheConfig& c) { c.max_sequences_per_step = INT32_MAX; },
       "max_sequences_per_step 2147483647 exceeds 65536"},
      {[](KVCacheConfig& c) { c.max_blocks_per_sequence = INT32_MAX; },
       "max_blocks_per_sequence 2147483647 exceeds 1048576"},
      {[](KVCacheConfig& c) {
         c.max_blocks_per_sequence = 1 << 20;
         c.block_size = 2048;
       },
       "exceeds 2147483647 tokens"},
      {[](KVCacheConfig& c) { c.max_inflight_plans = 1000; },
       "max_inflight_plans 1000 exceeds 64"},
      {[](KVCacheConfig& c) {
         // 1024 layers x 2048 tokens x 1024 heads x 2048 elements: 2^42
         // bytes per block (and scales), so 2^15 blocks exceed 2^56.
         c.num_layers = 1024;
         c.block_size = 2048;
         c.num_kv_heads = 1024;
         c.head_size = c.head_size_v = 1024;
         c.cache_dtype = DType::kInt8;
         c.num_blocks = 1 << 15;
       },
       "num_blocks 32768 x 4415226380288 bytes per block"},
  };
  for (const Case& bad : cases) {
    KVCacheConfig config = SmallConfig();
    bad.change(config);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument)
        << bad.message << ": " << m.status();
    EXPECT_THAT(std::string(m.status().message()), HasSubstr(bad.message));
  }
}

TEST(ConfigLimitsTest, TheLimitsThemselvesAreAccepted) {
  KVCacheConfig c = SmallConfig();
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.block_size = kMaxBlockSize;
  c.num_blocks = 2;
  EXPECT_TRUE(KVCacheManager::Create(c).ok());
  c = SmallConfig();
  c.num_kv_heads = kMaxNumKvHeads;
  c.head_size = c.head_size_v = 8;
  c.block_size = 1;
  c.num_blocks = 2;
  EXPECT_TRUE(KVCacheManager::Create(c).ok());
}

// ---- A small manager and its observable state -----------------------------

// K/V of `tokens` tokens for SmallConfig, bf16 on the host, filled with `fill`
// plus a ramp so that tenants and tokens are told apart.
struct KV {
  explicit KV(int64_t tokens, float fill = 0.0f)
      : k(tokens * 2 * 16), v(tokens * 2 * 8) {
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = testing::FloatToBf16(fill + 0.01f * static_cast<float>(i % 97));
    }
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = testing::FloatToBf16(fill - 0.02f * static_cast<float>(i % 89));
    }
    key = TensorView::Contiguous(k.data(), DType::kBFloat16, {tokens, 2, 16});
    value = TensorView::Contiguous(v.data(), DType::kBFloat16, {tokens, 2, 8});
  }
  std::vector<uint16_t> k, v;
  TensorView key, value;
};

class HardeningTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(SmallConfig()); }
  void Make(const KVCacheConfig& config) {
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config);
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = *std::move(m);
  }

  // Metrics (without reserve_failures), lengths and block tables.
  std::string Snapshot() {
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

  // Adds `id` with `n` prompt tokens from `first_token` and writes them with
  // values around `fill` (one step, both layers).
  void AddAndPrefill(SequenceId id, int n, int first_token, float fill,
                     const ExtraKey& extra = {}) {
    std::vector<TokenId> prompt(n);
    for (int i = 0; i < n; ++i) prompt[i] = first_token + i;
    absl::StatusOr<int64_t> computed = manager_->AddSequence(id, prompt, extra);
    ASSERT_TRUE(computed.ok()) << computed.status();
    const int64_t todo = n - *computed;
    absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{id, {}, todo}});
    ASSERT_TRUE(plan.ok()) << plan.status();
    KV kv(todo, fill);
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
    EXPECT_TRUE(manager_->Validate().ok()) << manager_->Validate();
  }

  std::unique_ptr<KVCacheManager> manager_;
};

// ---- Item 3: TensorView::ndim and DLPack pointers --------------------------

TEST_F(HardeningTest, TensorViewNdimIsNotTrusted) {
  AddAndPrefill(1, 6, 1, 0.0f);
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {9}, 1}});
  ASSERT_TRUE(plan.ok());
  const std::string before = Snapshot();
  KV kv(1);
  for (int32_t ndim : {1 << 30, 12, -5, INT32_MIN}) {
    TensorView k = kv.key;
    k.ndim = ndim;
    // Exactly this message: no shape or stride words read past the arrays.
    const std::string expected =
        absl::StrCat("key has ", ndim,
                     " dimensions; expected 3: [tokens, heads, head_size]");
    absl::Status s = manager_->Append(plan->id, 0, k, kv.value);
    ExpectError(s, absl::StatusCode::kInvalidArgument, expected, before);
    EXPECT_EQ(s.message(), expected);
    std::vector<float> out(6 * 2 * 16), out_v(6 * 2 * 8);
    TensorView ko =
        TensorView::Contiguous(out.data(), DType::kFloat32, {6, 2, 16});
    TensorView vo =
        TensorView::Contiguous(out_v.data(), DType::kFloat32, {6, 2, 8});
    vo.ndim = ndim;
    ExpectError(manager_->Gather(1, 0, 0, 6, ko, vo),
                absl::StatusCode::kInvalidArgument, "value has", before);
    EXPECT_NE(k.DebugString(), "");  // Reads at most kMaxDims entries.
  }
  TensorView huge = kv.key;
  huge.shape[0] = huge.shape[1] = int64_t{1} << 40;
  EXPECT_EQ(huge.numel(), -1);
}

TEST_F(HardeningTest, DLTensorShapeAndStridesAreChecked) {
  AddAndPrefill(1, 3, 1, 0.0f);
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {4}, 1}});
  ASSERT_TRUE(plan.ok());
  const std::string before = Snapshot();
  KV kv(1);
  int64_t k_shape[3] = {1, 2, 16}, v_shape[3] = {1, 2, 8};
  DLTensor k{};
  k.data = kv.k.data();
  k.device = {kDLCPU, 0};
  k.ndim = 3;
  k.dtype = {kDLBfloat, 16, 1};
  k.shape = k_shape;
  DLTensor v = k;
  v.data = kv.v.data();
  v.shape = v_shape;
  DLTensor bad = k;
  bad.shape = nullptr;
  ExpectError(manager_->Append(plan->id, 0, bad, v),
              absl::StatusCode::kInvalidArgument, "key: DLTensor shape is null",
              before);
  bad = k;
  bad.ndim = 1 << 30;
  ExpectError(manager_->Append(plan->id, 0, bad, v),
              absl::StatusCode::kInvalidArgument, "1073741824 dimensions",
              before);
  int64_t huge[3] = {1, int64_t{1} << 40, int64_t{1} << 40};
  bad = k;
  bad.shape = huge;  // Row-major strides: 2^40 * 2^40 overflows.
  ExpectError(manager_->Append(plan->id, 0, bad, v),
              absl::StatusCode::kInvalidArgument, "overflow int64", before);
  int64_t negative[3] = {1, -2, 16};
  bad = k;
  bad.shape = negative;
  ExpectError(manager_->Append(plan->id, 0, bad, v),
              absl::StatusCode::kInvalidArgument, "shape[1] = -2", before);
  bad = k;
  bad.byte_offset = UINT64_MAX - 1;
  ExpectError(manager_->Append(plan->id, 0, bad, v),
              absl::StatusCode::kInvalidArgument, "byte_offset", before);
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(manager_->Append(plan->id, layer, k, v).ok());
  }
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
}

// ---- Item 4: a partial append, then a count that overflows -----------------

TEST_F(HardeningTest, PartialAppendThenHugeCountIsRefused) {
  ASSERT_TRUE(
      manager_->AddSequence(1, std::vector<TokenId>{1, 2, 3, 4, 5, 6, 7, 8})
          .ok());
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{1, {}, 8}});
  ASSERT_TRUE(plan.ok());
  KV one(1);
  ASSERT_TRUE(manager_->Append(plan->id, 0, one.key, one.value).ok());
  const std::string before = Snapshot();
  // done (1) + INT64_MAX overflowed, passed the reservation check, and the
  // slot check read past the plan's slot buffer.
  for (int64_t tokens : {kMax, kMax - 1, int64_t{8}}) {
    TensorView k = one.key, v = one.value;
    k.shape[0] = v.shape[0] = tokens;
    k.strides[0] = v.strides[0] = 0;
    ExpectError(manager_->Append(plan->id, 0, k, v),
                absl::StatusCode::kInvalidArgument, "exceeds its reservation",
                before);
  }
  KV seven(7);
  ASSERT_TRUE(manager_->Append(plan->id, 0, seven.key, seven.value).ok());
  KV eight(8);
  ASSERT_TRUE(manager_->Append(plan->id, 1, eight.key, eight.value).ok());
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
}

// ---- Item 5: copy-on-write before any block table names the copy -----------

// The int8 codes and scales of `id`'s committed token `pos` in `layer`, read
// through BatchBlockTable and GetLayerView as an engine's attention would.
std::string CodesThroughTable(KVCacheManager& m, SequenceId id, int layer,
                              int64_t pos) {
  absl::StatusOr<BlockTableView> table = m.BatchBlockTable({id});
  EXPECT_TRUE(table.ok()) << table.status();
  if (!table.ok()) return "";
  EXPECT_LT(pos, table->seq_lens[0]);
  absl::StatusOr<LayerView> view = m.GetLayerView(layer);
  EXPECT_TRUE(view.ok());
  const int64_t block = table->block_table[pos / view->block_size];
  const int64_t offset = pos % view->block_size;
  const int8_t* k = static_cast<const int8_t*>(view->key_cache) +
                    block * view->key_strides[0] +
                    offset * view->key_strides[1];
  const int8_t* v = static_cast<const int8_t*>(view->value_cache) +
                    block * view->value_strides[0] +
                    offset * view->value_strides[1];
  const float* ks = view->key_scale + block * view->scale_strides[0] +
                    offset * view->scale_strides[1];
  const float* vs = view->value_scale + block * view->scale_strides[0] +
                    offset * view->scale_strides[1];
  std::string bytes(reinterpret_cast<const char*>(k), view->key_strides[1]);
  bytes.append(reinterpret_cast<const char*>(v), view->value_strides[1]);
  bytes.append(reinterpret_cast<const char*>(ks),
               view->num_kv_heads * sizeof(float));
  bytes.append(reinterpret_cast<const char*>(vs),
               view->num_kv_heads * sizeof(float));
  return bytes;
}

TEST_F(HardeningTest, ForkedTableNeverNamesAnUncopiedBlock) {
  KVCacheConfig config = SmallConfig();
  config.num_blocks = 4;
  config.enable_prefix_caching = false;
  Make(config);
  // Tenant B fills the pool's blocks with its data and leaves.
  AddAndPrefill(100, 16, 500, 3.0f);
  ASSERT_TRUE(manager_->Free(100).ok());
  // Tenant A: a full and a partial block, forked.
  AddAndPrefill(1, 6, 1, -1.0f);
  ASSERT_TRUE(manager_->Fork(1, 2).ok());
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{2, {42}, 1}});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->num_block_copies, 1);
  EXPECT_NE(manager_->BlockTable(1)->back(), manager_->BlockTable(2)->back());
  // Before any Append: the child's table names its private copy, which must
  // already hold the parent's committed tokens (it held tenant B's).
  for (int layer = 0; layer < 2; ++layer) {
    for (int64_t pos = 4; pos < 6; ++pos) {
      EXPECT_EQ(CodesThroughTable(*manager_, 2, layer, pos),
                CodesThroughTable(*manager_, 1, layer, pos))
          << "layer " << layer << " token " << pos;
    }
  }
  // The copies ran in Reserve (one launch per layer), not in Append.
  const MetricsSnapshot after_reserve = manager_->Metrics();
  EXPECT_EQ(after_reserve.block_copies, 1);
  KV kv(1, -1.0f);
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(manager_->Append(plan->id, layer, kv.key, kv.value).ok());
  }
  EXPECT_EQ(manager_->Metrics().kernel_launches,
            after_reserve.kernel_launches + 2);
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
  EXPECT_TRUE(manager_->Validate().ok());
}

TEST_F(HardeningTest, AbortAfterForkCopyLeavesTheParentIntact) {
  AddAndPrefill(1, 6, 1, -1.0f);
  ASSERT_TRUE(manager_->Fork(1, 2).ok());
  const std::string parent = CodesThroughTable(*manager_, 1, 0, 5);
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{2, {42}, 1}});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(manager_->Abort(plan->id).ok());
  EXPECT_EQ(*manager_->BlockTable(1), *manager_->BlockTable(2));
  EXPECT_EQ(CodesThroughTable(*manager_, 2, 0, 5), parent);
  EXPECT_TRUE(manager_->Validate().ok());
}

// ---- Item 8: validate everything before anything runs ----------------------

TEST_F(HardeningTest, AppendsTheKernelWouldRefuseChangeNothing) {
  AddAndPrefill(1, 6, 1, 0.0f);
  ASSERT_TRUE(manager_->Fork(1, 2).ok());
  absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{2, {42, 43}, 2}});
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->num_block_copies, 1);
  const std::string before = Snapshot();
  KV kv(2);
  std::vector<uint16_t> spare(kv.k.size() + 1);
  TensorView k = kv.key;
  k.data = reinterpret_cast<char*>(spare.data()) + 1;  // Misaligned bf16.
  ExpectError(manager_->Append(plan->id, 0, k, kv.value),
              absl::StatusCode::kInvalidArgument, "is not aligned", before);
  k = kv.key;
  k.strides[0] = int64_t{1} << 61;
  ExpectError(manager_->Append(plan->id, 0, k, kv.value),
              absl::StatusCode::kInvalidArgument, "overflows 64-bit offsets",
              before);
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(manager_->Append(plan->id, layer, kv.key, kv.value).ok());
  }
  ASSERT_TRUE(manager_->Commit(plan->id).ok());
}

TEST_F(HardeningTest, GatherOutputsMustNotOverlapEachOtherOrTheCache) {
  AddAndPrefill(1, 6, 1, 0.0f);
  const std::string before = Snapshot();
  // One buffer per token: K (2 x 16) then V (2 x 8), fused.
  std::vector<float> fused(6 * 48, -7.0f);
  TensorView k =
      TensorView::Contiguous(fused.data(), DType::kFloat32, {6, 2, 16});
  TensorView v =
      TensorView::Contiguous(fused.data() + 32, DType::kFloat32, {6, 2, 8});
  k.strides[0] = v.strides[0] = 48;
  // Interleaved, never overlapping: accepted, and equal to a dense gather.
  ASSERT_TRUE(manager_->Gather(1, 0, 0, 6, k, v).ok());
  std::vector<float> dk(6 * 32), dv(6 * 16);
  ASSERT_TRUE(
      manager_
          ->Gather(
              1, 0, 0, 6,
              TensorView::Contiguous(dk.data(), DType::kFloat32, {6, 2, 16}),
              TensorView::Contiguous(dv.data(), DType::kFloat32, {6, 2, 8}))
          .ok());
  for (int t = 0; t < 6; ++t) {
    EXPECT_EQ(0, std::memcmp(&fused[t * 48], &dk[t * 32], 32 * sizeof(float)));
    EXPECT_EQ(
        0, std::memcmp(&fused[t * 48 + 32], &dv[t * 16], 16 * sizeof(float)));
  }
  const std::string after_ok = Snapshot();
  // key_out == value_out (head sizes 16 and 8 over the same memory).
  TensorView same =
      TensorView::Contiguous(dk.data(), DType::kFloat32, {6, 2, 8});
  TensorView kk =
      TensorView::Contiguous(dk.data(), DType::kFloat32, {6, 2, 16});
  ExpectError(manager_->Gather(1, 0, 0, 6, kk, same),
              absl::StatusCode::kInvalidArgument,
              "key_out and value_out are the same tensor", after_ok);
  // Overlapping by one row.
  TensorView shifted = TensorView::Contiguous(dk.data() + 5 * 32 + 16,
                                              DType::kFloat32, {1, 2, 8});
  ExpectError(
      manager_->Gather(1, 0, 5, 1,
                       TensorView::Contiguous(dk.data() + 5 * 32,
                                              DType::kFloat32, {1, 2, 16}),
                       shifted),
      absl::StatusCode::kInvalidArgument, "overlap", after_ok);
  // Outputs inside the cache (float-aligned: the cache is 256-byte aligned).
  absl::StatusOr<LayerView> view = manager_->GetLayerView(1);
  ASSERT_TRUE(view.ok());
  TensorView in_cache =
      TensorView::Contiguous(view->key_cache, DType::kFloat32, {1, 2, 8});
  ExpectError(manager_->Gather(1, 0, 0, 1,
                               TensorView::Contiguous(
                                   dk.data(), DType::kFloat32, {1, 2, 16}),
                               in_cache),
              absl::StatusCode::kInvalidArgument,
              "value_out overlaps the cache of layer 1", after_ok);
  (void)before;
}

// ---- Item 9: INT64_MIN / INT64_MAX counts -----------------------------------

TEST_F(HardeningTest, ExtremeCountsAreRefusedWithoutOverflow) {
  AddAndPrefill(1, 6, 1, 0.0f);
  const std::string before = Snapshot();
  for (int64_t n : {kMin, kMin + 1, int64_t{-1}, int64_t{0}, kMax}) {
    ExpectError(manager_->Reserve({{1, {7}, n}}).status(),
                absl::StatusCode::kInvalidArgument, absl::StrCat(n), before);
    ExpectError(manager_->CanReserve({{1, {7}, n}}),
                absl::StatusCode::kInvalidArgument, "", before);
  }
  std::vector<float> k(32), v(16);
  TensorView kt = TensorView::Contiguous(k.data(), DType::kFloat32, {1, 2, 16});
  TensorView vt = TensorView::Contiguous(v.data(), DType::kFloat32, {1, 2, 8});
  for (int64_t begin : {kMin, int64_t{-1}, int64_t{0}, int64_t{5}, kMax}) {
    for (int64_t n : {kMin, int64_t{0}, int64_t{2}, kMax}) {
      if (n == 0 && begin >= 0 && begin <= *manager_->SequenceLength(1)) {
        // An empty range inside the sequence: an empty success (issue #14).
        EXPECT_TRUE(manager_->Gather(1, 0, begin, n, kt, vt).ok());
        EXPECT_EQ(Snapshot(), before);
        continue;
      }
      ExpectError(manager_->Gather(1, 0, begin, n, kt, vt),
                  absl::StatusCode::kInvalidArgument, "", before);
    }
  }
}

}  // namespace
}  // namespace kvcache
