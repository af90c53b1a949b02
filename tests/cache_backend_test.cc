// CacheBackend (api/cache_backend.h) on the CPU device, with random shapes:
// the pool is config.num_blocks, or (budget - 1024 * num_layers) / bytes of
// one block of all layers, and the storage stays within the budget; a budget
// too small for one block is ResourceExhausted naming the bytes; View(layer)
// has the pointers of the layer's storage and the strides of
// core/cache_layout.h for side and inline scales (scale pointers null for
// bf16/fp16; inline ones inside the rows); QuantizeWrite
// through the backend writes the same bytes as the CPU kernel called directly
// and touches no other layer; CopyBlocks copies K, V and scales of the given
// pairs in every layer, and an out-of-range or chained pair is refused with
// no layer changed. KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/cache_backend.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_config.h"
#include "api/layer_view.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu_kernels.h"
#include "kernels/kernel_params.h"
#include "storage/cache_storage.h"
#include "storage/device.h"
#include "testing/test_seed.h"

namespace kvcache::internal {
namespace {

constexpr DType kCacheDTypes[] = {DType::kInt8, DType::kFp8E4M3,
                                  DType::kBFloat16, DType::kFloat16};
constexpr DType kInputDTypes[] = {DType::kFloat32, DType::kFloat16,
                                  DType::kBFloat16};

bool Contains(absl::string_view haystack, absl::string_view needle) {
  return haystack.find(needle) != absl::string_view::npos;
}

// Bytes of an inline row of head sizes d and dv, stated here: max(d, dv)
// codes, 4 bytes of scale, rounded up to 16.
int64_t InlinePitch(int64_t d, int64_t dv) {
  const int64_t bytes = std::max(d, dv) + 4;
  return (bytes + 15) / 16 * 16;
}

// Bytes of one layer's K, V and scales, as separate regions.
struct Regions {
  int64_t key = 0, value = 0, scale = 0;
};

Regions RegionBytes(const CacheLayout& l) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(l.cache_dtype));
  const int64_t rows = l.num_blocks * l.block_size * l.num_heads;
  Regions r;
  if (l.scale_placement == ScalePlacement::kInline) {
    // Codes, the float32 scale, padding to 16 bytes; no scale regions.
    const int64_t pitch = InlinePitch(l.head_size, l.head_size_v);
    r.key = r.value = rows * pitch;
    return r;
  }
  r.key = rows * l.head_size * elem;
  r.value = rows * l.head_size_v * elem;
  r.scale = IsQuantized(l.cache_dtype) ? rows * 4 : 0;
  return r;
}

// A layer's K, V, key scales and value scales, copied out.
struct LayerBytes {
  std::vector<uint8_t> key, value, key_scale, value_scale;
  bool operator==(const LayerBytes& o) const {
    return key == o.key && value == o.value && key_scale == o.key_scale &&
           value_scale == o.value_scale;
  }
};

LayerBytes Read(const LayerCache& cache) {
  const Regions r = RegionBytes(cache.layout);
  auto bytes = [](const void* p, int64_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    return n == 0 ? std::vector<uint8_t>() : std::vector<uint8_t>(b, b + n);
  };
  LayerBytes out;
  out.key = bytes(cache.key_cache, r.key);
  out.value = bytes(cache.value_cache, r.value);
  out.key_scale = bytes(cache.key_scale, r.scale);
  out.value_scale = bytes(cache.value_scale, r.scale);
  return out;
}

class CacheBackendTest : public ::testing::Test {
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

  // A small random shape; capacity left unset. Quantized caches get side or
  // inline scales at random.
  KVCacheConfig RandomShape(DType cache_dtype) {
    return RandomShape(cache_dtype, IsQuantized(cache_dtype) && Rand(0, 1)
                                        ? ScalePlacement::kInline
                                        : ScalePlacement::kSide);
  }
  KVCacheConfig RandomShape(DType cache_dtype, ScalePlacement placement) {
    KVCacheConfig c;
    c.scale_placement = placement;
    c.num_layers = static_cast<int32_t>(Rand(1, 4));
    c.num_kv_heads = static_cast<int32_t>(Rand(1, 4));
    c.head_size = static_cast<int32_t>(8 * Rand(1, 8));
    c.head_size_v = Rand(0, 1) ? 0 : static_cast<int32_t>(8 * Rand(1, 8));
    c.block_size = static_cast<int32_t>(Rand(1, 16));
    c.cache_dtype = cache_dtype;
    c.input_dtype = IsQuantized(cache_dtype)
                        ? kInputDTypes[Rand(0, 2)]
                        : cache_dtype;  // Unquantized: input == cache.
    c.cpu_threads = static_cast<int32_t>(Rand(1, 2));
    return c;
  }

  // Bytes of one block of all layers, computed here from the shape.
  static int64_t BlockBytes(const KVCacheConfig& c) {
    const int64_t dv = c.head_size_v != 0 ? c.head_size_v : c.head_size;
    const int64_t elem = static_cast<int64_t>(DTypeSize(c.cache_dtype));
    const int64_t scales = IsQuantized(c.cache_dtype) ? 2 * 4 : 0;
    const int64_t per_head = c.scale_placement == ScalePlacement::kInline
                                 ? 2 * InlinePitch(c.head_size, dv)
                                 : (c.head_size + dv) * elem + scales;
    return int64_t{c.num_layers} * c.block_size * c.num_kv_heads * per_head;
  }

  std::unique_ptr<CacheBackend> Make(const KVCacheConfig& config) {
    EXPECT_TRUE(ValidateConfig(config).ok()) << ValidateConfig(config);
    absl::StatusOr<std::unique_ptr<CacheBackend>> b =
        CacheBackend::Create(config, CreateCpuDevice());
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? *std::move(b) : nullptr;
  }

  void FillRandom(void* p, int64_t n) {
    uint8_t* b = static_cast<uint8_t*>(p);
    for (int64_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(rng_());
  }

  // Random bytes in every layer's K, V and scales, written through View.
  void FillThroughViews(const CacheBackend& backend) {
    for (int l = 0; l < backend.num_layers(); ++l) {
      const LayerView v = backend.View(l);
      const Regions r = RegionBytes(backend.layout());
      FillRandom(v.key_cache, r.key);
      FillRandom(v.value_cache, r.value);
      if (v.key_scale != nullptr) FillRandom(v.key_scale, r.scale);
      if (v.value_scale != nullptr) FillRandom(v.value_scale, r.scale);
    }
  }

  std::mt19937_64 rng_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
};

// A K-only (latent) layout, head_size_v 0: the storage holds the key cache
// (and key scales) alone, its value pointers are null, the allocation is
// smaller than the same layout with V, and the CPU kernels write and gather K
// through it.
TEST(CacheStorageKOnlyTest, HoldsKeyOnlyAndServesTheKernels) {
  for (int k = 0; k < 3; ++k) {
    CacheLayout l;
    l.num_blocks = 5;
    l.block_size = 4;
    l.num_heads = 1;
    l.head_size = 576;
    l.head_size_v = 0;
    l.cache_dtype = k == 2 ? DType::kBFloat16 : DType::kInt8;
    l.scale_placement =
        k == 1 ? ScalePlacement::kInline : ScalePlacement::kSide;
    SCOPED_TRACE(absl::StrCat(DTypeName(l.cache_dtype), " ",
                              ScalePlacementName(l.scale_placement)));
    std::unique_ptr<Device> device = CreateCpuDevice();
    absl::StatusOr<std::unique_ptr<CacheStorage>> storage =
        CacheStorage::Create(device.get(), l, 2);
    ASSERT_TRUE(storage.ok()) << storage.status();
    CacheLayout with_v = l;
    with_v.head_size_v = 512;
    EXPECT_LT(CacheStorage::LayerAllocationBytes(l),
              CacheStorage::LayerAllocationBytes(with_v));
    EXPECT_GE(CacheStorage::LayerAllocationBytes(l), kvcache::LayerBytes(l));
    const LayerCache& cache = (*storage)->layer(1);
    EXPECT_NE(cache.key_cache, nullptr);
    EXPECT_EQ(cache.value_cache, nullptr);
    EXPECT_EQ(cache.value_scale, nullptr);
    EXPECT_EQ(cache.key_scale != nullptr, IsQuantized(l.cache_dtype));

    // Write 3 tokens of bf16 K (exact in every cache dtype: small integers
    // times powers of two), gather them back.
    std::vector<uint16_t> key(3 * 576);
    for (size_t i = 0; i < key.size(); ++i) {
      const float x = static_cast<float>(static_cast<int>(i % 255) - 127);
      uint32_t bits;
      std::memcpy(&bits, &x, 4);
      key[i] = static_cast<uint16_t>(bits >> 16);
    }
    const std::vector<int64_t> slots = {7, 0, 19};
    QuantizeWriteParams w;
    w.cache = cache;
    w.input = {key.data(), nullptr, DType::kBFloat16, 576, 576, 0, 0};
    w.num_tokens = 3;
    w.slot_mapping = slots.data();
    ASSERT_TRUE(QuantizeWriteCpu(w).ok());
    std::vector<float> out(3 * 576, -1.0f);
    GatherParams g;
    g.cache = cache;
    g.slots = slots.data();
    g.num_tokens = 3;
    g.output = {out.data(), nullptr, DType::kFloat32, 576, 576, 0, 0};
    ASSERT_TRUE(GatherCpu(g).ok());
    for (size_t i = 0; i < out.size(); ++i) {
      const float x = static_cast<float>(static_cast<int>(i % 255) - 127);
      ASSERT_EQ(out[i], x) << "element " << i;
    }
  }
}

// A Gemma-3-like config: 12 layers, 10 sliding (window 64) and 2 full, one
// cache shape. Pages have gcd(10, 2) = 2 slots; layer group.layers[t * 2 + s]
// uses slot s (stated here, not taken from the paging).
KVCacheConfig GemmaLikeConfig() {
  KVCacheConfig c;
  c.num_layers = 12;
  c.num_kv_heads = 0;
  c.head_size = 0;
  c.head_size_v = 0;
  c.num_q_heads = 0;
  c.block_size = 4;
  c.num_blocks = 9;
  c.input_dtype = DType::kBFloat16;
  LayerGroup sliding, full;
  sliding.kind = AttentionKind::kSlidingWindow;
  sliding.sliding_window = 64;
  for (LayerGroup* g : {&sliding, &full}) {
    g->num_kv_heads = 2;
    g->head_size = 64;
    g->head_size_v = 64;
    g->cache_dtype = DType::kInt8;
  }
  for (int l = 0; l < 12; ++l)
    (l % 6 == 5 ? full : sliding).layers.push_back(l);
  c.layer_groups = {sliding, full};
  return c;
}

// Bytes of the K cache of one slot allocation (all blocks) of `l`.
int64_t KeyBytes(const CacheLayout& l) {
  return l.num_blocks * l.block_size * l.num_heads * l.head_size *
         static_cast<int64_t>(DTypeSize(l.cache_dtype));
}

TEST(CacheBackendGroupsTest, SlotsOfOnePoolServeEveryLayer) {
  const KVCacheConfig c = GemmaLikeConfig();
  ASSERT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
  absl::StatusOr<std::unique_ptr<CacheBackend>> b =
      CacheBackend::Create(c, CreateCpuDevice());
  ASSERT_TRUE(b.ok()) << b.status();
  const CacheBackend& backend = **b;
  const CacheLayout& l = backend.layout();
  EXPECT_EQ(l.num_blocks, 9);
  EXPECT_EQ(l.num_heads, 2);
  EXPECT_EQ(l.head_size_v, 64);
  EXPECT_EQ(backend.num_layers(), 12);
  ASSERT_EQ(backend.storage().num_allocations(), 2);
  EXPECT_EQ(backend.storage().total_bytes(),
            2 * CacheStorage::LayerAllocationBytes(l));
  // A page: 2 slots x (4 tokens x 2 heads x (64 + 64) int8 + 2 scales x 4).
  EXPECT_EQ(*BlockBytesAllLayers(c), 2 * (4 * 2 * 128 + 4 * 2 * 8));
  const int expected_slot[12] = {0, 1, 0, 1, 0, /*full*/ 0,
                                 1, 0, 1, 0, 1, /*full*/ 1};
  for (int layer = 0; layer < 12; ++layer) {
    SCOPED_TRACE(absl::StrCat("layer ", layer));
    const LayerCache& slot = backend.storage().allocation(expected_slot[layer]);
    EXPECT_EQ(backend.layer(layer).key_cache, slot.key_cache);
    EXPECT_EQ(backend.layer(layer).value_scale, slot.value_scale);
    EXPECT_EQ(backend.View(layer).key_cache, slot.key_cache);
  }
  EXPECT_NE(backend.layer(0).key_cache, backend.layer(1).key_cache);

  // A write through layer 0 lands in slot 0 (read back through layer 2, the
  // same slot of another table) and leaves slot 1 untouched.
  std::vector<uint16_t> k(2 * 64, 0x42FE), v(2 * 64, 0xC2FE);  // 127, -127
  const std::vector<int64_t> slots = {3 * 4 + 1};  // Block 3, offset 1.
  QuantizeWriteParams w;
  w.cache = backend.layer(0);
  w.input = {k.data(), v.data(), DType::kBFloat16, 128, 64, 128, 64};
  w.num_tokens = 1;
  w.slot_mapping = slots.data();
  ASSERT_TRUE(backend.QuantizeWrite(w, nullptr).ok());
  std::vector<float> out(2 * 128, 0.0f);
  GatherParams g;
  g.cache = backend.layer(2);
  g.slots = slots.data();
  g.num_tokens = 1;
  g.output = {out.data(), out.data() + 128, DType::kFloat32, 128, 64, 128, 64};
  ASSERT_TRUE(backend.Gather(g, nullptr).ok());
  for (int i = 0; i < 128; ++i) {
    ASSERT_EQ(out[i], 127.0f) << i;
    ASSERT_EQ(out[128 + i], -127.0f) << i;
  }
  const std::vector<uint8_t> slot1_before(
      static_cast<uint8_t*>(backend.layer(1).key_cache),
      static_cast<uint8_t*>(backend.layer(1).key_cache) + KeyBytes(l));
  EXPECT_EQ(std::count(slot1_before.begin(), slot1_before.end(), 0),
            static_cast<std::ptrdiff_t>(slot1_before.size()));

  // Copy-on-write copies the block in every slot once.
  w.cache = backend.layer(1);
  ASSERT_TRUE(backend.QuantizeWrite(w, nullptr).ok());
  const std::vector<int64_t> pairs = {3, 7};
  ASSERT_TRUE(backend.CopyBlocks(pairs.data(), 1, nullptr).ok());
  for (int s = 0; s < 2; ++s) {
    const LayerCache& a = backend.storage().allocation(s);
    const int64_t block = l.key_block_elems();
    const auto* kc = static_cast<const int8_t*>(a.key_cache);
    EXPECT_TRUE(std::equal(kc + 3 * block, kc + 4 * block, kc + 7 * block))
        << "slot " << s;
    EXPECT_TRUE(std::equal(a.key_scale + 3 * 8, a.key_scale + 4 * 8,
                           a.key_scale + 7 * 8))
        << "slot " << s;
    EXPECT_NE(a.key_scale[7 * 8 + 2], 0.0f) << "slot " << s;
  }
}

// A DeepSeek-like K-only config (one full group, 1 latent head of 576, no V):
// one slot per layer, null V pointers in every layer and view.
TEST(CacheBackendGroupsTest, KOnlyGroupHasNoValue) {
  KVCacheConfig c;
  c.num_layers = 6;
  c.num_kv_heads = 0;
  c.head_size = 0;
  c.head_size_v = 0;
  c.num_q_heads = 0;
  c.block_size = 16;
  c.num_blocks = 5;
  LayerGroup mla;
  mla.num_kv_heads = 1;
  mla.head_size = 576;
  mla.head_size_v = 0;
  mla.cache_dtype = DType::kFp8E4M3;
  for (int l = 0; l < 6; ++l) mla.layers.push_back(l);
  c.layer_groups = {mla};
  absl::StatusOr<std::unique_ptr<CacheBackend>> b =
      CacheBackend::Create(c, CreateCpuDevice());
  ASSERT_TRUE(b.ok()) << b.status();
  const CacheBackend& backend = **b;
  EXPECT_EQ(backend.storage().num_allocations(), 6);
  EXPECT_EQ(*BlockBytesAllLayers(c), 6 * 16 * (576 + 4));
  for (int layer = 0; layer < 6; ++layer) {
    EXPECT_EQ(backend.layer(layer).value_cache, nullptr);
    EXPECT_EQ(backend.layer(layer).value_scale, nullptr);
    const LayerView view = backend.View(layer);
    EXPECT_EQ(view.head_size_v, 0);
    EXPECT_EQ(view.value_cache, nullptr);
    EXPECT_EQ(view.value_row_pitch_bytes, 0);
    EXPECT_EQ(view.key_row_pitch_bytes, 576);
  }
  // K-only write and gather through the backend.
  std::vector<uint16_t> k(576, 0x43E0);  // 448: scale 1, exact
  const std::vector<int64_t> slots = {33};
  QuantizeWriteParams w;
  w.cache = backend.layer(4);
  w.input = {k.data(), nullptr, DType::kBFloat16, 576, 576, 0, 0};
  w.num_tokens = 1;
  w.slot_mapping = slots.data();
  ASSERT_TRUE(backend.QuantizeWrite(w, nullptr).ok());
  std::vector<float> out(576, 0.0f);
  GatherParams g;
  g.cache = backend.layer(4);
  g.slots = slots.data();
  g.num_tokens = 1;
  g.output = {out.data(), nullptr, DType::kFloat32, 576, 576, 0, 0};
  ASSERT_TRUE(backend.Gather(g, nullptr).ok());
  for (float x : out) ASSERT_EQ(x, 448.0f);
  const std::vector<int64_t> pairs = {2, 4};
  EXPECT_TRUE(backend.CopyBlocks(pairs.data(), 1, nullptr).ok());
}

// Groups of different cache shapes (heads, head size, K-only, dtype): page
// slots of records of the largest record, each layer its group's shape over
// them, and copy-on-write moving one run of block_size records per slot
// (nothing else).
TEST(CacheBackendGroupsTest, DifferentShapesShareSlotsInRecords) {
  std::mt19937_64 rng(std::random_device{}());
  for (int k = 0; k < 4; ++k) {
    SCOPED_TRACE(absl::StrCat("variant ", k));
    KVCacheConfig c = GemmaLikeConfig();
    LayerGroup& g = c.layer_groups[1];
    switch (k) {
      case 0:
        g.num_kv_heads = 4;
        break;
      case 1:
        g.head_size = 128;
        break;
      case 2:
        g.head_size_v = 0;
        break;
      case 3:
        g.cache_dtype = DType::kBFloat16;
        c.layer_groups[0].cache_dtype = DType::kFp8E4M3;
        break;
    }
    ASSERT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
    absl::StatusOr<std::unique_ptr<CacheBackend>> b =
        CacheBackend::Create(c, CreateCpuDevice());
    ASSERT_TRUE(b.ok()) << b.status();
    const CacheBackend& backend = **b;
    // Records stated here: K rows, V rows from a 16-byte boundary, then the
    // side scales, rounded up to 16. Sliding: 2 x 64 + 2 x 64 + 2 x 4 x 2.
    auto record = [](const LayerGroup& grp) {
      const int64_t e = static_cast<int64_t>(DTypeSize(grp.cache_dtype));
      const int64_t h = grp.num_kv_heads;
      const int64_t k_end = (h * grp.head_size * e + 15) / 16 * 16;
      const int64_t v_end = (k_end + h * grp.head_size_v * e + 15) / 16 * 16;
      const int64_t scales = IsQuantized(grp.cache_dtype)
                                 ? (grp.head_size_v > 0 ? 2 : 1) * 4 * h
                                 : 0;
      return (v_end + scales + 15) / 16 * 16;
    };
    const int64_t r = std::max(record(c.layer_groups[0]), record(g));
    ASSERT_EQ(backend.storage().num_allocations(), 2);
    EXPECT_EQ(backend.storage().total_bytes(), 2 * 9 * 4 * r);
    EXPECT_EQ(*BlockBytesAllLayers(c), 2 * 4 * r);
    for (int layer = 0; layer < 12; ++layer) {
      const LayerCache& lc = backend.layer(layer);
      const LayerGroup& grp = c.layer_groups[layer % 6 == 5 ? 1 : 0];
      const int64_t e = static_cast<int64_t>(DTypeSize(grp.cache_dtype));
      EXPECT_EQ(lc.layout.num_heads, grp.num_kv_heads);
      EXPECT_EQ(lc.layout.head_size_v, grp.head_size_v);
      EXPECT_EQ(lc.layout.cache_dtype, grp.cache_dtype);
      EXPECT_EQ(lc.layout.record_pitch * e, r);
      EXPECT_EQ(lc.value_cache == nullptr, grp.head_size_v == 0);
      EXPECT_EQ(backend.View(layer).key_strides[1] * e, r);
    }
    // Random bytes in both slots, then copy block 3 onto 7 (and 0 onto 5).
    std::vector<std::vector<uint8_t>> before(2);
    for (int s = 0; s < 2; ++s) {
      auto* base =
          static_cast<uint8_t*>(backend.storage().allocation(s).key_cache);
      const int64_t bytes = backend.storage().allocation_bytes(s);
      ASSERT_EQ(bytes, 9 * 4 * r);
      for (int64_t i = 0; i < bytes; ++i) base[i] = static_cast<uint8_t>(rng());
      before[s].assign(base, base + bytes);
    }
    const std::vector<int64_t> pairs = {3, 7, 0, 5};
    ASSERT_TRUE(backend.CopyBlocks(pairs.data(), 2, nullptr).ok());
    for (int s = 0; s < 2; ++s) {
      const auto* base = static_cast<const uint8_t*>(
          backend.storage().allocation(s).key_cache);
      std::vector<uint8_t> want = before[s];
      const int64_t run = 4 * r;
      std::copy_n(before[s].begin() + 3 * run, run, want.begin() + 7 * run);
      std::copy_n(before[s].begin() + 0 * run, run, want.begin() + 5 * run);
      EXPECT_TRUE(std::equal(want.begin(), want.end(), base)) << "slot " << s;
    }
  }
}

TEST_F(CacheBackendTest, NumBlocksIsTakenAsIs) {
  for (DType dtype : kCacheDTypes) {
    SCOPED_TRACE(DTypeName(dtype));
    KVCacheConfig c = RandomShape(dtype);
    c.num_blocks = Rand(1, 40);
    std::unique_ptr<CacheBackend> backend = Make(c);
    ASSERT_NE(backend, nullptr);
    EXPECT_EQ(backend->layout().num_blocks, c.num_blocks);
    EXPECT_EQ(backend->num_layers(), c.num_layers);
    EXPECT_EQ(backend->memory_kind(), MemoryKind::kHost);
    EXPECT_EQ(backend->ordinal(), 0);
    EXPECT_EQ(
        backend->storage().total_bytes(),
        c.num_layers * CacheStorage::LayerAllocationBytes(backend->layout()));
  }
}

TEST_F(CacheBackendTest, MemoryBudgetHoldsWholeBlocksOfAllLayers) {
  for (int round = 0; round < 24; ++round) {
    const KVCacheConfig shape = RandomShape(kCacheDTypes[round % 4]);
    SCOPED_TRACE(absl::StrCat("round ", round, " ",
                              DTypeName(shape.cache_dtype), " layers ",
                              shape.num_layers));
    const int64_t block_bytes = BlockBytes(shape);
    ASSERT_EQ(*BlockBytesAllLayers(shape), block_bytes);
    const int64_t padding = 1024 * int64_t{shape.num_layers};
    const int64_t blocks = Rand(1, 40);
    KVCacheConfig c = shape;
    c.memory_budget_bytes = padding + blocks * block_bytes +
                            Rand(0, block_bytes - 1);  // A partial block.
    std::unique_ptr<CacheBackend> backend = Make(c);
    ASSERT_NE(backend, nullptr);
    EXPECT_EQ(backend->layout().num_blocks,
              (c.memory_budget_bytes - padding) / block_bytes);
    EXPECT_EQ(backend->layout().num_blocks, blocks);
    // Caches, scales and alignment padding together fit in the budget.
    EXPECT_LE(backend->storage().total_bytes(), c.memory_budget_bytes);
  }
}

TEST_F(CacheBackendTest, BudgetTooSmallForOneBlockIsResourceExhausted) {
  for (DType dtype : kCacheDTypes) {
    SCOPED_TRACE(DTypeName(dtype));
    KVCacheConfig c = RandomShape(dtype);
    const int64_t block_bytes = BlockBytes(c);
    const int64_t padding = 1024 * int64_t{c.num_layers};
    for (int64_t budget :
         {padding + block_bytes - 1, padding + Rand(0, block_bytes - 1),
          Rand(1, padding)}) {
      c.memory_budget_bytes = budget;
      absl::StatusOr<std::unique_ptr<CacheBackend>> b =
          CacheBackend::Create(c, CreateCpuDevice());
      ASSERT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted)
          << "budget " << budget << ": " << b.status();
      const std::string msg(b.status().message());
      EXPECT_TRUE(Contains(msg, absl::StrCat(budget, " bytes"))) << msg;
      EXPECT_TRUE(Contains(msg, absl::StrCat(block_bytes, " bytes"))) << msg;
      EXPECT_TRUE(Contains(msg, absl::StrCat(c.num_layers, " layers"))) << msg;
    }
    // One block more than that fits.
    c.memory_budget_bytes = padding + block_bytes;
    std::unique_ptr<CacheBackend> one = Make(c);
    ASSERT_NE(one, nullptr);
    EXPECT_EQ(one->layout().num_blocks, 1);
  }
}

TEST_F(CacheBackendTest, ViewMatchesTheLayoutAndTheStorage) {
  for (int k = 0; k < 6; ++k) {
    const DType dtype = kCacheDTypes[k % 4];
    const bool inline_scales = k >= 4;  // int8 and fp8 again, inline.
    SCOPED_TRACE(
        absl::StrCat(DTypeName(dtype), inline_scales ? " inline" : ""));
    KVCacheConfig c = RandomShape(
        dtype, inline_scales ? ScalePlacement::kInline : ScalePlacement::kSide);
    c.num_blocks = Rand(1, 20);
    std::unique_ptr<CacheBackend> backend = Make(c);
    ASSERT_NE(backend, nullptr);
    const CacheLayout& l = backend->layout();
    EXPECT_EQ(l.num_blocks, c.num_blocks);
    EXPECT_EQ(l.block_size, c.block_size);
    EXPECT_EQ(l.num_heads, c.num_kv_heads);
    EXPECT_EQ(l.head_size, c.head_size);
    EXPECT_EQ(l.head_size_v, c.head_size_v != 0 ? c.head_size_v : c.head_size);
    EXPECT_EQ(l.cache_dtype, dtype);
    const bool quantized = IsQuantized(dtype);
    std::set<const void*> seen;
    for (int layer = 0; layer < backend->num_layers(); ++layer) {
      SCOPED_TRACE(absl::StrCat("layer ", layer));
      const LayerView v = backend->View(layer);
      const LayerCache& cache = backend->layer(layer);
      EXPECT_EQ(v.key_cache, cache.key_cache);
      EXPECT_EQ(v.value_cache, cache.value_cache);
      EXPECT_EQ(v.key_scale, cache.key_scale);
      EXPECT_EQ(v.value_scale, cache.value_scale);
      EXPECT_NE(v.key_cache, nullptr);
      EXPECT_NE(v.value_cache, nullptr);
      EXPECT_TRUE(seen.insert(v.key_cache).second) << "layers share a cache";
      if (quantized) {
        EXPECT_NE(v.key_scale, nullptr);
        EXPECT_NE(v.value_scale, nullptr);
      } else {
        EXPECT_EQ(v.key_scale, nullptr);
        EXPECT_EQ(v.value_scale, nullptr);
      }
      EXPECT_EQ(v.cache_dtype, dtype);
      EXPECT_EQ(v.memory, MemoryKind::kHost);
      EXPECT_EQ(v.device, 0);
      EXPECT_EQ(v.num_blocks, l.num_blocks);
      EXPECT_EQ(v.block_size, l.block_size);
      EXPECT_EQ(v.num_kv_heads, l.num_heads);
      EXPECT_EQ(v.head_size, l.head_size);
      EXPECT_EQ(v.head_size_v, l.head_size_v);
      EXPECT_EQ(v.scale_placement, c.scale_placement);
      const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
      if (inline_scales) {
        const int64_t pitch = InlinePitch(l.head_size, l.head_size_v);
        const int64_t at = std::max(l.head_size, l.head_size_v);
        EXPECT_EQ(v.key_row_pitch_bytes, pitch);
        EXPECT_EQ(v.value_row_pitch_bytes, pitch);
        EXPECT_EQ(v.scale_byte_offset, at);
        EXPECT_EQ(reinterpret_cast<char*>(v.key_scale),
                  static_cast<char*>(v.key_cache) + at);
        EXPECT_EQ(reinterpret_cast<char*>(v.value_scale),
                  static_cast<char*>(v.value_cache) + at);
      } else {
        EXPECT_EQ(v.key_row_pitch_bytes, l.head_size * elem);
        EXPECT_EQ(v.value_row_pitch_bytes, l.head_size_v * elem);
        EXPECT_EQ(v.scale_byte_offset, 0);
      }
      // Each (block, token, head)'s scale, through the scale strides, is where
      // the placement puts it: byte scale_byte_offset of its K (V) row, or
      // its element of the dense scale tensors.
      if (quantized) {
        for (int probe = 0; probe < 20; ++probe) {
          const int64_t b = Rand(0, v.num_blocks - 1),
                        t = Rand(0, v.block_size - 1),
                        h = Rand(0, v.num_kv_heads - 1);
          const int64_t s = b * v.scale_strides[0] + t * v.scale_strides[1] +
                            h * v.scale_strides[2];
          const int64_t row = (b * v.block_size + t) * v.num_kv_heads + h;
          if (inline_scales) {
            EXPECT_EQ(reinterpret_cast<char*>(v.key_scale + s),
                      static_cast<char*>(v.key_cache) + b * v.key_strides[0] +
                          t * v.key_strides[1] + h * v.key_strides[2] +
                          v.scale_byte_offset);
            EXPECT_EQ(reinterpret_cast<char*>(v.value_scale + s),
                      static_cast<char*>(v.value_cache) +
                          row * v.value_row_pitch_bytes + v.scale_byte_offset);
          } else {
            EXPECT_EQ(s, row);
          }
        }
      }
      // Strides from the layout's offset functions: one block is block_size
      // slots, one token one slot.
      const int64_t bs = l.block_size;
      EXPECT_EQ(v.key_strides[0], l.key_offset(bs, 0) - l.key_offset(0, 0));
      EXPECT_EQ(v.key_strides[1], l.key_offset(1, 0) - l.key_offset(0, 0));
      EXPECT_EQ(v.key_strides[2], l.key_offset(0, 1) - l.key_offset(0, 0));
      EXPECT_EQ(v.key_strides[3], 1);
      EXPECT_EQ(v.value_strides[0],
                l.value_offset(bs, 0) - l.value_offset(0, 0));
      EXPECT_EQ(v.value_strides[1],
                l.value_offset(1, 0) - l.value_offset(0, 0));
      EXPECT_EQ(v.value_strides[2],
                l.value_offset(0, 1) - l.value_offset(0, 0));
      EXPECT_EQ(v.value_strides[3], 1);
      EXPECT_EQ(v.scale_strides[0],
                l.scale_offset(bs, 0) - l.scale_offset(0, 0));
      EXPECT_EQ(v.scale_strides[1],
                l.scale_offset(1, 0) - l.scale_offset(0, 0));
      EXPECT_EQ(v.scale_strides[2],
                l.scale_offset(0, 1) - l.scale_offset(0, 0));
      // The last element the strides reach lies inside the layer's region.
      const int64_t last_key = (v.num_blocks - 1) * v.key_strides[0] +
                               (bs - 1) * v.key_strides[1] +
                               (v.num_kv_heads - 1) * v.key_strides[2] +
                               (v.head_size - 1) * v.key_strides[3];
      // (Inline: plus the scale and padding of the last row.)
      const int64_t key_tail = v.key_strides[2] - v.head_size;
      const int64_t value_tail = v.value_strides[2] - v.head_size_v;
      EXPECT_EQ(last_key + 1 + key_tail, l.num_slots() * l.key_slot_elems());
      const int64_t last_value = (v.num_blocks - 1) * v.value_strides[0] +
                                 (bs - 1) * v.value_strides[1] +
                                 (v.num_kv_heads - 1) * v.value_strides[2] +
                                 (v.head_size_v - 1) * v.value_strides[3];
      EXPECT_EQ(last_value + 1 + value_tail,
                l.num_slots() * l.value_slot_elems());
      EXPECT_EQ((last_key + 1 + key_tail) * elem, RegionBytes(l).key);
    }
  }
}

TEST_F(CacheBackendTest, QuantizeWriteEqualsTheCpuKernelCalledDirectly) {
  for (int round = 0; round < 8; ++round) {
    const DType dtype = kCacheDTypes[round % 4];
    KVCacheConfig c = RandomShape(dtype);
    c.num_blocks = Rand(1, 12);
    SCOPED_TRACE(absl::StrCat("round ", round, " cache ", DTypeName(dtype),
                              " input ", DTypeName(c.input_dtype)));
    std::unique_ptr<CacheBackend> backend = Make(c);
    ASSERT_NE(backend, nullptr);
    const CacheLayout& l = backend->layout();
    FillThroughViews(*backend);

    // The reference: the same layout in storage of its own, with the same
    // starting bytes as the backend's target layer.
    const int target = static_cast<int>(Rand(0, backend->num_layers() - 1));
    std::unique_ptr<Device> ref_device = CreateCpuDevice();
    absl::StatusOr<std::unique_ptr<CacheStorage>> ref =
        CacheStorage::Create(ref_device.get(), l, 1);
    ASSERT_TRUE(ref.ok()) << ref.status();
    const LayerCache& ref_cache = (*ref)->layer(0);
    const Regions r = RegionBytes(l);
    const LayerCache& target_cache = backend->layer(target);
    std::memcpy(ref_cache.key_cache, target_cache.key_cache, r.key);
    std::memcpy(ref_cache.value_cache, target_cache.value_cache, r.value);
    if (r.scale > 0) {
      std::memcpy(ref_cache.key_scale, target_cache.key_scale, r.scale);
      std::memcpy(ref_cache.value_scale, target_cache.value_scale, r.scale);
    }
    std::vector<LayerBytes> before;
    for (int i = 0; i < backend->num_layers(); ++i) {
      before.push_back(Read(backend->layer(i)));
    }

    // Random K/V (finite values) for distinct random slots, some padding.
    const int64_t tokens = Rand(1, std::min<int64_t>(l.num_slots(), 40));
    std::vector<int64_t> all_slots(l.num_slots());
    for (int64_t s = 0; s < l.num_slots(); ++s) all_slots[s] = s;
    std::shuffle(all_slots.begin(), all_slots.end(), rng_);
    std::vector<int64_t> slots(all_slots.begin(), all_slots.begin() + tokens);
    for (size_t t = 1; t < slots.size(); ++t) {  // Token 0 is written.
      if (Rand(0, 9) == 0) slots[t] = -1;
    }
    const int64_t elem = static_cast<int64_t>(DTypeSize(c.input_dtype));
    const int64_t row = l.num_heads * (l.head_size + l.head_size_v);
    std::vector<uint8_t> input(static_cast<size_t>(tokens * row * elem));
    if (c.input_dtype == DType::kFloat32) {
      std::uniform_real_distribution<float> value(-50.0f, 50.0f);
      for (size_t i = 0; i < input.size(); i += 4) {
        const float f = value(rng_);
        std::memcpy(&input[i], &f, 4);
      }
    } else {
      // Random 16-bit floats with a finite exponent.
      const uint16_t exp_mask =
          c.input_dtype == DType::kFloat16 ? 0x7C00 : 0x7F80;
      for (size_t i = 0; i < input.size(); i += 2) {
        uint16_t h = static_cast<uint16_t>(rng_());
        if ((h & exp_mask) == exp_mask) h &= ~(exp_mask & (exp_mask >> 1));
        std::memcpy(&input[i], &h, 2);
      }
    }
    // Fused rows: [K heads | V heads] per token.
    QuantizeWriteParams params;
    params.input.key = input.data();
    params.input.value =
        input.data() + l.num_heads * l.head_size * elem;  // After K.
    params.input.dtype = c.input_dtype;
    params.input.key_token_stride = row;
    params.input.key_head_stride = l.head_size;
    params.input.value_token_stride = row;
    params.input.value_head_stride = l.head_size_v;
    params.num_tokens = tokens;
    params.slot_mapping = slots.data();

    params.cache = target_cache;
    const absl::Status through_backend =
        backend->QuantizeWrite(params, /*stream=*/nullptr);
    ASSERT_TRUE(through_backend.ok()) << through_backend;
    params.cache = ref_cache;
    ASSERT_TRUE(QuantizeWriteCpu(params).ok());

    for (int i = 0; i < backend->num_layers(); ++i) {
      const LayerBytes now = Read(backend->layer(i));
      if (i == target) {
        EXPECT_TRUE(now == Read(ref_cache)) << "layer " << i;
        EXPECT_FALSE(now == before[i]) << "nothing written";
      } else {
        EXPECT_TRUE(now == before[i]) << "layer " << i << " changed";
      }
    }

    // A slot past the cache is refused through the backend too, writing
    // nothing.
    slots[Rand(0, tokens - 1)] = l.num_slots() + Rand(0, 5);
    params.cache = target_cache;
    const LayerBytes kept = Read(target_cache);
    EXPECT_EQ(backend->QuantizeWrite(params, nullptr).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(Read(target_cache) == kept);
  }
}

TEST_F(CacheBackendTest, CopyBlocksCopiesEveryLayersKVAndScales) {
  for (int round = 0; round < 8; ++round) {
    const DType dtype = kCacheDTypes[round % 4];
    KVCacheConfig c = RandomShape(dtype);
    c.num_blocks = Rand(2, 24);
    SCOPED_TRACE(absl::StrCat("round ", round, " ", DTypeName(dtype)));
    std::unique_ptr<CacheBackend> backend = Make(c);
    ASSERT_NE(backend, nullptr);
    const CacheLayout& l = backend->layout();
    FillThroughViews(*backend);

    // Random pairs: distinct destinations, no source is a destination.
    std::vector<int64_t> blocks(l.num_blocks);
    for (int64_t b = 0; b < l.num_blocks; ++b) blocks[b] = b;
    std::shuffle(blocks.begin(), blocks.end(), rng_);
    const int64_t num_dsts = Rand(1, l.num_blocks / 2 + (l.num_blocks % 2));
    const int64_t num_pairs = std::min<int64_t>(num_dsts, l.num_blocks - 1);
    std::vector<int64_t> pairs;
    for (int64_t i = 0; i < num_pairs; ++i) {
      const int64_t dst = blocks[i];
      const int64_t src = blocks[Rand(num_pairs, l.num_blocks - 1)];
      pairs.push_back(src);
      pairs.push_back(dst);
    }

    // The expected bytes: each layer's blocks copied here.
    const Regions r = RegionBytes(l);
    std::vector<LayerBytes> expected;
    for (int i = 0; i < backend->num_layers(); ++i) {
      LayerBytes e = Read(backend->layer(i));
      auto copy = [&](std::vector<uint8_t>& v, int64_t total) {
        if (total == 0) return;
        const int64_t block = total / l.num_blocks;
        const std::vector<uint8_t> src_bytes = v;
        for (int64_t p = 0; p < num_pairs; ++p) {
          std::memcpy(&v[pairs[2 * p + 1] * block],
                      &src_bytes[pairs[2 * p] * block], block);
        }
      };
      copy(e.key, r.key);
      copy(e.value, r.value);
      copy(e.key_scale, r.scale);
      copy(e.value_scale, r.scale);
      expected.push_back(std::move(e));
    }
    const absl::Status s =
        backend->CopyBlocks(pairs.data(), num_pairs, /*stream=*/nullptr);
    ASSERT_TRUE(s.ok()) << s;
    for (int i = 0; i < backend->num_layers(); ++i) {
      EXPECT_TRUE(Read(backend->layer(i)) == expected[i]) << "layer " << i;
    }
    EXPECT_TRUE(backend->CopyBlocks(nullptr, 0, nullptr).ok());
  }
}

TEST_F(CacheBackendTest, CopyBlocksRefusesBadPairsBeforeCopyingAnything) {
  for (int round = 0; round < 8; ++round) {
    const DType dtype = kCacheDTypes[round % 4];
    KVCacheConfig c = RandomShape(dtype);
    c.num_layers = static_cast<int32_t>(Rand(2, 4));
    c.num_blocks = Rand(4, 24);
    SCOPED_TRACE(absl::StrCat("round ", round, " ", DTypeName(dtype)));
    std::unique_ptr<CacheBackend> backend = Make(c);
    ASSERT_NE(backend, nullptr);
    const int64_t n = backend->layout().num_blocks;
    FillThroughViews(*backend);
    std::vector<LayerBytes> before;
    for (int i = 0; i < backend->num_layers(); ++i) {
      before.push_back(Read(backend->layer(i)));
    }
    // Valid pairs (i -> n/2 + i), then one bad id, at a random position.
    const int64_t num_pairs = Rand(1, n / 2);
    std::vector<int64_t> pairs;
    for (int64_t i = 0; i < num_pairs; ++i) {
      pairs.push_back(i);
      pairs.push_back(n / 2 + i);
    }
    const int64_t bad_index = Rand(0, 2 * num_pairs - 1);
    const int64_t bad_id = Rand(0, 1) ? n + Rand(0, 1000) : -Rand(1, 1000);
    pairs[bad_index] = bad_id;
    absl::Status s = backend->CopyBlocks(pairs.data(), num_pairs, nullptr);
    ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(Contains(s.message(), absl::StrCat(" = ", bad_id))) << s;
    for (int i = 0; i < backend->num_layers(); ++i) {
      EXPECT_TRUE(Read(backend->layer(i)) == before[i])
          << "layer " << i << " changed";
    }

    // A chained pair (a source that is also a destination) too.
    pairs[bad_index] = bad_index % 2 == 0 ? n / 2 : 0;
    s = backend->CopyBlocks(pairs.data(), num_pairs, nullptr);
    ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (int i = 0; i < backend->num_layers(); ++i) {
      EXPECT_TRUE(Read(backend->layer(i)) == before[i])
          << "layer " << i << " changed";
    }
  }
}

}  // namespace
}  // namespace kvcache::internal
