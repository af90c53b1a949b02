// CheckKVTensor, CheckKVPair and CheckGatherOutputs (api/tensor_checks.h):
// a correct [T, H, D] view with random strides passes; each kind of bad view
// (null data, ndim out of range - without printing the untrusted shape -,
// wrong ndim, dtype, memory kind or device, token count, heads, head size,
// last stride, negative strides) is InvalidArgument naming the problem;
// CheckKVPair fills DenseKV from the tensors; CheckGatherOutputs agrees with a
// brute-force row-by-row overlap check on random strided outputs (key vs
// value, and against every layer's cache allocation), with the named cases:
// the same tensor twice, interleaved outputs that overlap or do not, outputs
// inside a layer's cache, rows that straddle a cache's edge or skip over it.
// KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/tensor_checks.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/tensor_view.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "gtest/gtest.h"
#include "kernels/kernel_params.h"
#include "kernels/kernel_validation.h"
#include "storage/cache_storage.h"
#include "storage/device.h"
#include "testing/test_seed.h"

namespace kvcache::internal {
namespace {

constexpr DType kFloatDTypes[] = {DType::kFloat32, DType::kFloat16,
                                  DType::kBFloat16};

bool Contains(absl::string_view haystack, absl::string_view needle) {
  return haystack.find(needle) != absl::string_view::npos;
}

#define EXPECT_INVALID(status, ...)                                        \
  do {                                                                     \
    const absl::Status s_ = (status);                                      \
    EXPECT_EQ(s_.code(), absl::StatusCode::kInvalidArgument) << s_;        \
    for (const std::string& want_ : std::vector<std::string>{__VA_ARGS__}) \
      EXPECT_TRUE(Contains(s_.message(), want_))                           \
          << "\"" << s_.message() << "\" lacks \"" << want_ << "\"";       \
  } while (0)

class TensorChecksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = kvcache::testing::TestSeed();
    rng_.seed(seed);
    seed_trace_ = std::make_unique<::testing::ScopedTrace>(
        __FILE__, __LINE__,
        absl::StrCat("seed ", seed, " (rerun with KVCACHE_TEST_SEED=", seed,
                     ")"));
  }

  int64_t Rand(int64_t lo, int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }

  // A random expectation and a view that meets it, with random non-negative
  // token and head strides.
  std::pair<ExpectedKV, TensorView> RandomValid() {
    ExpectedKV e;
    e.num_heads = Rand(1, 16);
    e.head_size = 8 * Rand(1, 32);
    e.any_float_dtype = Rand(0, 1) == 1;
    e.dtype = kFloatDTypes[Rand(0, 2)];
    e.memory = Rand(0, 1) ? MemoryKind::kCuda : MemoryKind::kHost;
    e.device =
        e.memory == MemoryKind::kCuda ? static_cast<int32_t>(Rand(0, 7)) : 0;
    TensorView t;
    t.data = &buffer_[Rand(0, 15)];
    t.dtype = e.any_float_dtype ? kFloatDTypes[Rand(0, 2)] : e.dtype;
    t.ndim = 3;
    t.shape[0] = Rand(1, 64);
    t.shape[1] = e.num_heads;
    t.shape[2] = e.head_size;
    t.strides[0] = Rand(0, 1 << 16);
    t.strides[1] = Rand(0, 1 << 12);
    t.strides[2] = 1;
    t.memory = e.memory;
    // On the host the device field is not looked at.
    t.device = e.memory == MemoryKind::kCuda ? e.device
                                             : static_cast<int32_t>(Rand(0, 7));
    e.num_tokens = Rand(0, 1) ? -1 : t.shape[0];
    return {e, t};
  }

  std::mt19937_64 rng_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  float buffer_[16] = {};
};

TEST_F(TensorChecksTest, AcceptsCorrectViews) {
  for (int i = 0; i < 200; ++i) {
    auto [e, t] = RandomValid();
    const absl::Status s = CheckKVTensor("key", t, e);
    ASSERT_TRUE(s.ok()) << s << " for " << t.DebugString();
  }
  // A contiguous view too.
  ExpectedKV e;
  e.num_tokens = 5;
  e.num_heads = 3;
  e.head_size = 16;
  EXPECT_TRUE(CheckKVTensor(
                  "key",
                  TensorView::Contiguous(buffer_, DType::kBFloat16, {5, 3, 16}),
                  e)
                  .ok());
}

TEST_F(TensorChecksTest, RejectsNullData) {
  auto [e, t] = RandomValid();
  t.data = nullptr;
  EXPECT_INVALID(CheckKVTensor("value", t, e), "value data is null");
}

TEST_F(TensorChecksTest, RejectsNdimOutOfRangeWithoutPrintingTheShape) {
  for (int32_t ndim :
       {0, -1, 5, static_cast<int32_t>(Rand(6, INT32_MAX)),
        static_cast<int32_t>(Rand(INT32_MIN, -2)), INT32_MIN, INT32_MAX}) {
    auto [e, t] = RandomValid();
    t.ndim = ndim;
    for (int d = 0; d < TensorView::kMaxDims; ++d) {
      t.shape[d] = 987654321 + d;
      t.strides[d] = 123456789 + d;
    }
    const absl::Status s = CheckKVTensor("key", t, e);
    EXPECT_INVALID(s, absl::StrCat("key has ", ndim, " dimensions"),
                   "expected 3");
    for (int d = 0; d < TensorView::kMaxDims; ++d) {
      EXPECT_FALSE(Contains(s.message(), absl::StrCat(987654321 + d))) << s;
      EXPECT_FALSE(Contains(s.message(), absl::StrCat(123456789 + d))) << s;
    }
    EXPECT_FALSE(Contains(s.message(), "strides")) << s;
  }
}

TEST_F(TensorChecksTest, RejectsWrongNdim) {
  for (int32_t ndim : {1, 2, 4}) {
    auto [e, t] = RandomValid();
    t.ndim = ndim;
    t.shape[3] = 7;
    EXPECT_INVALID(CheckKVTensor("key", t, e),
                   absl::StrCat("key has ", ndim, " dimensions ("),
                   t.DebugString(), "expected 3");
  }
}

TEST_F(TensorChecksTest, RejectsWrongDType) {
  {
    auto [e, t] = RandomValid();
    e.any_float_dtype = false;
    e.dtype = kFloatDTypes[Rand(0, 2)];
    do {
      t.dtype = kFloatDTypes[Rand(0, 2)];
    } while (t.dtype == e.dtype);
    EXPECT_INVALID(CheckKVTensor("key", t, e),
                   absl::StrCat("key dtype ", DTypeName(t.dtype), " is not ",
                                DTypeName(e.dtype)));
  }
  for (DType bad : {DType::kInt8, DType::kFp8E4M3, static_cast<DType>(99)}) {
    auto [e, t] = RandomValid();
    e.any_float_dtype = true;
    t.dtype = bad;
    EXPECT_INVALID(CheckKVTensor("value", t, e),
                   absl::StrCat("value dtype ", DTypeName(bad),
                                " is not float32, float16 or bfloat16"));
  }
}

TEST_F(TensorChecksTest, RejectsWrongMemoryKindOrDevice) {
  auto [e, t] = RandomValid();
  e.memory = MemoryKind::kHost;
  t.memory = MemoryKind::kCuda;
  t.device = static_cast<int32_t>(Rand(0, 7));
  EXPECT_INVALID(CheckKVTensor("key", t, e),
                 absl::StrCat("key lives in CUDA device ", t.device, " memory"),
                 "this cache needs host memory");

  e.memory = MemoryKind::kCuda;
  e.device = static_cast<int32_t>(Rand(0, 7));
  t.memory = MemoryKind::kHost;
  EXPECT_INVALID(CheckKVTensor("key", t, e), "key lives in host memory",
                 absl::StrCat("needs CUDA device ", e.device, " memory"));

  t.memory = MemoryKind::kCuda;
  t.device = e.device + static_cast<int32_t>(Rand(1, 7));
  EXPECT_INVALID(CheckKVTensor("key", t, e),
                 absl::StrCat("CUDA device ", t.device, " memory"),
                 absl::StrCat("needs CUDA device ", e.device, " memory"));
  t.device = e.device;
  EXPECT_TRUE(CheckKVTensor("key", t, e).ok());
}

TEST_F(TensorChecksTest, RejectsBadTokenCounts) {
  for (int64_t tokens : {int64_t{0}, -Rand(1, 1000), INT64_MIN}) {
    auto [e, t] = RandomValid();
    t.shape[0] = tokens;
    EXPECT_INVALID(CheckKVTensor("key", t, e),
                   absl::StrCat("key has ", tokens, " tokens"));
  }
  auto [e, t] = RandomValid();
  e.num_tokens = t.shape[0] + Rand(1, 100) * (Rand(0, 1) ? 1 : -1);
  if (e.num_tokens < 1) e.num_tokens = t.shape[0] + 1;
  EXPECT_INVALID(CheckKVTensor("key", t, e),
                 absl::StrCat("key has ", t.shape[0], " tokens"),
                 absl::StrCat("expected ", e.num_tokens));
  e.num_tokens = -1;
  EXPECT_TRUE(CheckKVTensor("key", t, e).ok());
}

TEST_F(TensorChecksTest, RejectsWrongHeadsAndHeadSize) {
  {
    auto [e, t] = RandomValid();
    t.shape[1] = e.num_heads + Rand(1, 8);
    EXPECT_INVALID(CheckKVTensor("key", t, e),
                   absl::StrCat("key has ", t.shape[1], " heads"),
                   absl::StrCat("expected ", e.num_heads));
  }
  {
    auto [e, t] = RandomValid();
    t.shape[2] = e.head_size + 8 * Rand(1, 4);
    EXPECT_INVALID(CheckKVTensor("value", t, e),
                   absl::StrCat("value head size ", t.shape[2]),
                   absl::StrCat("does not match the cache's ", e.head_size));
  }
}

TEST_F(TensorChecksTest, RejectsNonUnitLastStrideAndNegativeStrides) {
  for (int64_t stride : {int64_t{0}, int64_t{2}, int64_t{-1}, Rand(3, 1000)}) {
    auto [e, t] = RandomValid();
    t.strides[2] = stride;
    EXPECT_INVALID(CheckKVTensor("key", t, e),
                   absl::StrCat("key stride ", stride,
                                " in the last dimension must be 1"));
  }
  for (int dim : {0, 1}) {
    auto [e, t] = RandomValid();
    t.strides[dim] = -Rand(1, 1 << 20);
    EXPECT_INVALID(CheckKVTensor("key", t, e), "key has negative strides",
                   t.DebugString());
  }
}

TEST_F(TensorChecksTest, CheckKVPairFillsDenseKVFromTheTensors) {
  for (int i = 0; i < 100; ++i) {
    auto [e, key] = RandomValid();
    const int64_t head_size_v = 8 * Rand(1, 32);
    TensorView value = key;
    value.data = &buffer_[Rand(0, 15)];
    value.shape[2] = head_size_v;
    value.strides[0] = Rand(0, 1 << 16);
    value.strides[1] = Rand(0, 1 << 12);
    DenseKV out;
    int64_t tokens = -7;
    const absl::Status s =
        CheckKVPair(key, value, e, head_size_v, &out, &tokens);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(out.key, key.data);
    EXPECT_EQ(out.value, value.data);
    EXPECT_EQ(out.dtype, key.dtype);
    EXPECT_EQ(out.key_token_stride, key.strides[0]);
    EXPECT_EQ(out.key_head_stride, key.strides[1]);
    EXPECT_EQ(out.value_token_stride, value.strides[0]);
    EXPECT_EQ(out.value_head_stride, value.strides[1]);
    EXPECT_EQ(tokens, key.shape[0]);
  }
}

TEST_F(TensorChecksTest, CheckKVPairRejectsMismatchedValues) {
  auto [e, key] = RandomValid();
  e.any_float_dtype = true;
  const int64_t dv = 8 * Rand(1, 32);
  TensorView value = key;
  value.shape[2] = dv;
  DenseKV out;
  int64_t tokens = 0;
  ASSERT_TRUE(CheckKVPair(key, value, e, dv, &out, &tokens).ok());
  const DenseKV untouched;

  {  // The key is checked first, and named.
    TensorView bad = key;
    bad.data = nullptr;
    DenseKV o;
    EXPECT_INVALID(CheckKVPair(bad, value, e, dv, &o, &tokens),
                   "key data is null");
    EXPECT_EQ(o.key, untouched.key);
  }
  {  // Value tokens must equal the key's.
    TensorView bad = value;
    bad.shape[0] = key.shape[0] + Rand(1, 10);
    DenseKV o;
    EXPECT_INVALID(CheckKVPair(key, bad, e, dv, &o, &tokens),
                   absl::StrCat("value has ", bad.shape[0], " tokens"),
                   absl::StrCat("expected ", key.shape[0]));
    EXPECT_EQ(o.key, untouched.key);
  }
  {  // With any float dtype allowed, the value's must equal the key's.
    TensorView bad = value;
    do {
      bad.dtype = kFloatDTypes[Rand(0, 2)];
    } while (bad.dtype == key.dtype);
    DenseKV o;
    EXPECT_INVALID(CheckKVPair(key, bad, e, dv, &o, &tokens),
                   absl::StrCat("value dtype ", DTypeName(bad.dtype),
                                " is not ", DTypeName(key.dtype)));
  }
  {  // The value's head size is head_size_v.
    TensorView bad = value;
    bad.shape[2] = dv + 8;
    DenseKV o;
    EXPECT_INVALID(CheckKVPair(key, bad, e, dv, &o, &tokens),
                   absl::StrCat("value head size ", dv + 8),
                   absl::StrCat("does not match the cache's ", dv));
  }
  {  // Value heads.
    TensorView bad = value;
    bad.shape[1] = key.shape[1] + 1;
    DenseKV o;
    EXPECT_INVALID(CheckKVPair(key, bad, e, dv, &o, &tokens),
                   absl::StrCat("value has ", bad.shape[1], " heads"));
  }
}

// ---- CheckGatherOutputs ----

// One output operand: [T, H, d] of `elem`-byte elements at `base`.
struct Operand {
  uintptr_t base = 0;
  int64_t token_stride = 0, head_stride = 0, head_size = 0;
};

class GatherOutputsTest : public TensorChecksTest {
 protected:
  void SetUp() override {
    TensorChecksTest::SetUp();
    layout_.num_blocks = Rand(1, 4);
    layout_.block_size = Rand(1, 8);
    layout_.num_heads = Rand(1, 4);
    layout_.head_size = 8 * Rand(1, 4);
    layout_.head_size_v = 8 * Rand(1, 4);
    layout_.cache_dtype =
        Rand(0, 1) ? DType::kInt8 : DType::kBFloat16;  // With or w/o scales.
    absl::StatusOr<std::unique_ptr<CacheStorage>> s =
        CacheStorage::Create(device_.get(), layout_, Rand(1, 3));
    ASSERT_TRUE(s.ok()) << s.status();
    storage_ = *std::move(s);
  }

  // Random strides meeting ValidateGather: tokens or heads outer, each
  // stride at least the extent below it, plus random slack.
  Operand RandomStrides(int64_t head_size) {
    Operand o;
    o.head_size = head_size;
    const int64_t heads = layout_.num_heads;
    if (Rand(0, 1)) {  // Token-major.
      o.head_stride = head_size + Rand(0, head_size);
      o.token_stride = heads * o.head_stride + Rand(0, 2 * head_size);
    } else {  // Head-major.
      o.token_stride = head_size + Rand(0, head_size);
      o.head_stride = tokens_ * o.token_stride + Rand(0, 2 * head_size);
    }
    return o;
  }

  int64_t Extent(const Operand& o) const {  // Elements from base to end.
    return (tokens_ - 1) * o.token_stride +
           (layout_.num_heads - 1) * o.head_stride + o.head_size;
  }

  // Each row's [begin, end) in bytes.
  std::vector<std::pair<uintptr_t, uintptr_t>> Rows(const Operand& o) const {
    std::vector<std::pair<uintptr_t, uintptr_t>> rows;
    for (int64_t t = 0; t < tokens_; ++t) {
      for (int64_t h = 0; h < layout_.num_heads; ++h) {
        const uintptr_t begin =
            o.base + (t * o.token_stride + h * o.head_stride) * elem_;
        rows.emplace_back(begin, begin + o.head_size * elem_);
      }
    }
    return rows;
  }

  DenseKV Dense(const Operand& key, const Operand& value) const {
    DenseKV out;
    out.key = reinterpret_cast<void*>(key.base);
    out.value = reinterpret_cast<void*>(value.base);
    out.dtype = dtype_;
    out.key_token_stride = key.token_stride;
    out.key_head_stride = key.head_stride;
    out.value_token_stride = value.token_stride;
    out.value_head_stride = value.head_stride;
    return out;
  }

  // The brute-force answer: the message CheckGatherOutputs should give (its
  // order: key vs value, then each layer, key before value), or none.
  std::optional<std::string> Reference(const Operand& key,
                                       const Operand& value) const {
    const auto k = Rows(key), v = Rows(value);
    auto meet = [](uintptr_t a0, uintptr_t a1, uintptr_t b0, uintptr_t b1) {
      return a0 < b1 && b0 < a1;
    };
    for (const auto& a : k) {
      for (const auto& b : v) {
        if (meet(a.first, a.second, b.first, b.second)) {
          return std::string(key.base == value.base ? "the same tensor"
                                                    : "overlap");
        }
      }
    }
    const uintptr_t bytes = CacheStorage::LayerAllocationBytes(layout_);
    for (int layer = 0; layer < storage_->num_layers(); ++layer) {
      const uintptr_t c0 =
          reinterpret_cast<uintptr_t>(storage_->layer(layer).key_cache);
      for (const auto* rows : {&k, &v}) {
        for (const auto& r : *rows) {
          if (meet(r.first, r.second, c0, c0 + bytes)) {
            return absl::StrCat(rows == &k ? "key_out" : "value_out",
                                " overlaps the cache of layer ", layer);
          }
        }
      }
    }
    return std::nullopt;
  }

  // Checks the outputs satisfy CheckGatherOutputs' precondition
  // (ValidateGather), then that its answer is the reference's.
  void ExpectAgrees(const Operand& key, const Operand& value) {
    const DenseKV out = Dense(key, value);
    GatherParams params;
    params.cache = storage_->layer(0);
    params.block_table = block_table_;
    params.block_table_len = 1 << 20;
    params.num_tokens = tokens_;
    params.output = out;
    const absl::Status valid = ValidateGather(params);
    ASSERT_TRUE(valid.ok()) << "not a valid test case: " << valid;
    const absl::Status s = CheckGatherOutputs(out, tokens_, layout_, *storage_);
    const std::optional<std::string> want = Reference(key, value);
    const std::string where = absl::StrCat(
        "T=", tokens_, " H=", layout_.num_heads, " elem=", elem_, " key +",
        key.base % 4096, " strides ", key.token_stride, "/", key.head_stride,
        " D ", key.head_size, ", value at key ",
        static_cast<int64_t>(value.base - key.base), " strides ",
        value.token_stride, "/", value.head_stride, " Dv ", value.head_size);
    SCOPED_TRACE(where);
    if (want.has_value()) {
      EXPECT_INVALID(s, *want);
      ++rejected_;
    } else {
      EXPECT_TRUE(s.ok()) << s;
      ++accepted_;
    }
  }

  void RandomDType() {
    dtype_ = kFloatDTypes[Rand(0, 2)];
    elem_ = static_cast<int64_t>(DTypeSize(dtype_));
  }

  std::unique_ptr<Device> device_ = CreateCpuDevice();
  CacheLayout layout_;
  std::unique_ptr<CacheStorage> storage_;
  int64_t tokens_ = 1;
  DType dtype_ = DType::kFloat32;
  int64_t elem_ = 4;
  int32_t block_table_[1] = {0};
  int accepted_ = 0, rejected_ = 0;
};

TEST_F(GatherOutputsTest, SameTensorTwiceIsRefused) {
  RandomDType();
  tokens_ = Rand(1, 8);
  // One strided buffer as both outputs (each with its own head size).
  Operand key = RandomStrides(std::max(layout_.head_size, layout_.head_size_v));
  Operand value = key;
  key.head_size = layout_.head_size;
  value.head_size = layout_.head_size_v;
  std::vector<float> mem((Extent(key) + Extent(value)) * elem_ / 4 + 1);
  key.base = value.base = reinterpret_cast<uintptr_t>(mem.data());
  ExpectAgrees(key, value);
  EXPECT_INVALID(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_),
      "key_out and value_out are the same tensor");
}

TEST_F(GatherOutputsTest, InterleavedOutputs) {
  RandomDType();
  tokens_ = Rand(1, 8);
  const int64_t h = layout_.num_heads, d = layout_.head_size,
                dv = layout_.head_size_v;
  std::vector<float> mem(tokens_ * h * (d + dv) * 2 + 64);
  const uintptr_t base = reinterpret_cast<uintptr_t>(mem.data());

  // Per token [K heads | V heads] (a fused KV output): no shared byte.
  Operand key{base, h * (d + dv), d, d};
  Operand value{base + h * d * elem_, h * (d + dv), dv, dv};
  ExpectAgrees(key, value);
  EXPECT_TRUE(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_).ok());
  // Per head [K row | V row]: no shared byte either.
  key = {base, h * (d + dv), d + dv, d};
  value = {base + d * elem_, h * (d + dv), d + dv, dv};
  ExpectAgrees(key, value);
  EXPECT_TRUE(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_).ok());
  // The value one element early: its first row overlaps the key's.
  value.base -= elem_;
  EXPECT_INVALID(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_),
      "key_out and value_out overlap");
  ExpectAgrees(key, value);
  // The value one element late: its row runs into the next key row (unless
  // it is the very last one).
  value.base += 2 * elem_;
  ExpectAgrees(key, value);
  if (h * tokens_ > 1) {
    EXPECT_INVALID(
        CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_),
        "key_out and value_out overlap");
  }
}

TEST_F(GatherOutputsTest, DisjointOutputsPass) {
  RandomDType();
  tokens_ = Rand(1, 16);
  Operand key = RandomStrides(layout_.head_size);
  Operand value = RandomStrides(layout_.head_size_v);
  std::vector<float> k((Extent(key) * elem_ + 3) / 4);
  std::vector<float> v((Extent(value) * elem_ + 3) / 4);
  key.base = reinterpret_cast<uintptr_t>(k.data());
  value.base = reinterpret_cast<uintptr_t>(v.data());
  ExpectAgrees(key, value);
  EXPECT_TRUE(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_).ok());
}

TEST_F(GatherOutputsTest, RandomOutputsInOneBufferAgreeWithBruteForce) {
  for (int i = 0; i < 400 && !HasFailure(); ++i) {
    RandomDType();
    tokens_ = Rand(1, 6);
    Operand key = RandomStrides(layout_.head_size);
    Operand value = RandomStrides(layout_.head_size_v);
    const int64_t span = std::max(Extent(key), Extent(value));
    std::vector<float> mem((3 * span * elem_ + 3) / 4 + 1);
    const uintptr_t base = reinterpret_cast<uintptr_t>(mem.data());
    key.base = base + Rand(0, span) * elem_;
    // Near the key's rows, often interleaved with them.
    value.base = base + Rand(0, 2 * span) * elem_;
    ExpectAgrees(key, value);
  }
  // Both answers come up.
  EXPECT_GT(accepted_, 0);
  EXPECT_GT(rejected_, 0);
}

TEST_F(GatherOutputsTest, OutputsInsideALayersCacheAreRefused) {
  RandomDType();
  tokens_ = Rand(1, 4);
  const int64_t layer_bytes = CacheStorage::LayerAllocationBytes(layout_);
  std::vector<float> own(4096);
  for (int round = 0; round < 40; ++round) {
    const bool value_inside = round % 2 == 1;
    const int layer = static_cast<int>(Rand(0, storage_->num_layers() - 1));
    const uintptr_t cache =
        reinterpret_cast<uintptr_t>(storage_->layer(layer).key_cache);
    // Anywhere in the layer's allocation: K, V or the scales.
    Operand inside =
        RandomStrides(value_inside ? layout_.head_size_v : layout_.head_size);
    inside.base = cache + Rand(0, layer_bytes / elem_ - 1) * elem_;
    Operand mine;
    mine.head_size = value_inside ? layout_.head_size : layout_.head_size_v;
    mine.head_stride = mine.head_size;
    mine.token_stride = layout_.num_heads * mine.head_size;
    mine.base = reinterpret_cast<uintptr_t>(own.data());
    ASSERT_LE(Extent(mine) * elem_, static_cast<int64_t>(own.size() * 4));
    const Operand& key = value_inside ? mine : inside;
    const Operand& value = value_inside ? inside : mine;
    // Its first row lies in the allocation: always refused (the reference
    // names the first layer any row touches).
    const std::optional<std::string> want = Reference(key, value);
    ASSERT_TRUE(want.has_value());
    ExpectAgrees(key, value);
    const absl::Status s =
        CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_);
    if (Contains(*want, "the cache of layer")) {
      EXPECT_INVALID(s,
                     value_inside ? "value_out overlaps the cache of layer"
                                  : "key_out overlaps the cache of layer",
                     "outputs must be the caller's own memory");
    }
  }
}

TEST_F(GatherOutputsTest, RowsAtACachesEdgeAgreeWithBruteForce) {
  // Outputs whose rows start before, end in, straddle, or skip over a layer's
  // allocation (only addresses: nothing is read or written).
  std::vector<float> own(8192);
  for (int i = 0; i < 300 && !HasFailure(); ++i) {
    RandomDType();
    tokens_ = Rand(1, 4);
    const int layer = static_cast<int>(Rand(0, storage_->num_layers() - 1));
    const int64_t layer_bytes = CacheStorage::LayerAllocationBytes(layout_);
    const uintptr_t cache =
        reinterpret_cast<uintptr_t>(storage_->layer(layer).key_cache);
    Operand key = RandomStrides(layout_.head_size);
    // Sometimes a stride longer than the whole allocation, so rows jump it.
    if (Rand(0, 2) == 0) {
      const int64_t jump = layer_bytes / elem_ + Rand(0, 64);
      if (key.token_stride >= key.head_stride) {
        key.token_stride += jump;
      } else {
        key.head_stride += jump;
      }
    }
    const int64_t extent = Extent(key);
    // From two extents before the cache to one after it.
    const int64_t offset = Rand(-2 * extent, layer_bytes / elem_ + extent);
    key.base = cache + offset * elem_;
    Operand value;
    value.head_size = layout_.head_size_v;
    value.head_stride = value.head_size;
    value.token_stride = layout_.num_heads * value.head_size;
    value.base = reinterpret_cast<uintptr_t>(own.data());
    ASSERT_LE(Extent(value) * elem_, static_cast<int64_t>(own.size() * 4));
    ExpectAgrees(key, value);
  }
  EXPECT_GT(accepted_, 0);
  EXPECT_GT(rejected_, 0);
}

TEST_F(GatherOutputsTest, RowEndingExactlyAtTheCachePasses) {
  dtype_ = DType::kFloat32;
  elem_ = 4;
  tokens_ = 1;
  const uintptr_t cache =
      reinterpret_cast<uintptr_t>(storage_->layer(0).key_cache);
  const int64_t layer_bytes = CacheStorage::LayerAllocationBytes(layout_);
  std::vector<float> own(4096);
  Operand value{reinterpret_cast<uintptr_t>(own.data()),
                layout_.num_heads * layout_.head_size_v, layout_.head_size_v,
                layout_.head_size_v};
  // One row per head, the last ending right at the cache's first byte.
  Operand key{0, layout_.num_heads * layout_.head_size, layout_.head_size,
              layout_.head_size};
  key.base = cache - Extent(key) * elem_;
  ExpectAgrees(key, value);
  EXPECT_TRUE(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_).ok());
  key.base += elem_;  // Its last element is now the cache's first.
  ExpectAgrees(key, value);
  EXPECT_INVALID(
      CheckGatherOutputs(Dense(key, value), tokens_, layout_, *storage_),
      "key_out overlaps the cache of layer 0");
  // Starting right after the allocation's last byte: passes (unless another
  // layer lies there; the reference knows).
  key.base = cache + layer_bytes;
  ExpectAgrees(key, value);
  key.base -= elem_;
  ExpectAgrees(key, value);
}

}  // namespace
}  // namespace kvcache::internal
