// KVCacheManager with layer groups of different cache shapes on the CPU
// backend (DESIGN.md section 10, records): groups that differ in KV heads
// (8 full : 4 sliding), in head sizes (128, 256 and a K-only 576 latent) and
// in dtype (an int8 group beside a bf16 one), with side and inline scales.
// Every layer's Gather against the independent reference
// (tests/group_runner.h) through prefills, decode past the window and prefix
// hits; every Append writes its layer's rows and nothing else (random bytes
// everywhere, each layer's append diffed against the rows its view's strides
// name, those rows decoded through the view); the pool holds as many pages
// as the budget pays for at the largest record.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/kv_reference.h"
#include "tests/group_runner.h"
#include "tests/make_layer_group.h"

namespace kvcache {
namespace {

constexpr int kWindow = 16;
constexpr int kBlock = 4;

enum class Shapes { kHeads, kSizes, kDtypes };

const char* ShapesName(Shapes s) {
  return s == Shapes::kHeads   ? "heads"
         : s == Shapes::kSizes ? "sizes"
                               : "dtypes";
}

KVCacheConfig Config(Shapes shapes, ScalePlacement placement) {
  KVCacheConfig c;
  c.block_size = kBlock;
  c.num_blocks = 600;
  c.input_dtype = DType::kFloat32;
  c.max_tokens_per_step = 256;
  c.max_sequences_per_step = 8;
  c.scale_placement = placement;
  switch (shapes) {
    case Shapes::kHeads:  // 8 KV heads full : 4 KV heads sliding.
      c.num_layers = 8;
      c.layer_groups = {
          MakeGroup({0, 1, 2, 4, 5, 6}, kWindow, 4, 128, 128, DType::kInt8),
          MakeGroup({3, 7}, 0, 8, 128, 128, DType::kInt8)};
      break;
    case Shapes::kSizes:  // 128 sliding, 256 full, a K-only 576 latent.
      c.num_layers = 6;
      c.layer_groups = {MakeGroup({0, 3}, kWindow, 2, 128, 128, DType::kInt8),
                        MakeGroup({1, 4}, 0, 2, 256, 256, DType::kFp8E4M3),
                        MakeGroup({2, 5}, 0, 1, 576, 0, DType::kFp8E4M3)};
      break;
    case Shapes::kDtypes:  // int8 sliding beside bf16 full (bf16 input).
      c.num_layers = 6;
      c.input_dtype = DType::kBFloat16;
      c.layer_groups = {
          MakeGroup({0, 1, 2, 3}, kWindow, 4, 128, 128, DType::kInt8),
          MakeGroup({4, 5}, 0, 4, 128, 64, DType::kBFloat16)};
      break;
  }
  return c;
}

struct Param {
  Shapes shapes;
  ScalePlacement placement;
};

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  return absl::StrCat(ShapesName(info.param.shapes), "_",
                      ScalePlacementName(info.param.placement));
}

using Fixture = testing::GroupFixture;

class GroupShapesTest : public ::testing::TestWithParam<Param> {};

TEST_P(GroupShapesTest, ViewsHaveEachGroupsShape) {
  const KVCacheConfig c = Config(GetParam().shapes, GetParam().placement);
  Fixture f(c, 1);
  ASSERT_NE(f.manager, nullptr);
  for (const LayerGroup& g : c.layer_groups) {
    for (int32_t layer : g.layers) {
      SCOPED_TRACE(absl::StrCat("layer ", layer));
      const LayerView v = *f.manager->GetLayerView(layer);
      EXPECT_EQ(v.num_kv_heads, g.num_kv_heads);
      EXPECT_EQ(v.head_size, g.head_size);
      EXPECT_EQ(v.head_size_v, g.head_size_v);
      EXPECT_EQ(v.cache_dtype, g.cache_dtype);
      EXPECT_EQ(v.value_cache == nullptr, g.head_size_v == 0);
      EXPECT_EQ(v.key_scale == nullptr, !IsQuantized(g.cache_dtype));
      EXPECT_EQ(v.scale_placement, IsQuantized(g.cache_dtype)
                                       ? c.scale_placement
                                       : ScalePlacement::kSide);
      // Records: one stride per token for K and V, in each one's elements.
      const int64_t elem = static_cast<int64_t>(DTypeSize(g.cache_dtype));
      const int64_t record = v.key_strides[1] * elem;
      EXPECT_EQ(record % 16, 0);
      EXPECT_EQ(v.key_strides[0], kBlock * v.key_strides[1]);
      if (g.head_size_v > 0) {
        EXPECT_EQ(v.value_strides[1], v.key_strides[1]);
      }
      if (v.key_scale != nullptr) {
        EXPECT_EQ(v.scale_strides[1] * 4, record);
      }
      // Every layer of a config has the same record bytes.
      EXPECT_EQ(record, f.manager->GetLayerView(0)->key_strides[1] *
                            static_cast<int64_t>(DTypeSize(
                                f.manager->GetLayerView(0)->cache_dtype)));
    }
  }
}

TEST_P(GroupShapesTest, RoundTripsWindowsAndPrefixHits) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Fixture f(Config(GetParam().shapes, GetParam().placement), seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  std::mt19937_64 rng(seed);
  const std::vector<TokenId> shared = r.RandomTokens(24, 1000);
  std::vector<SequenceId> ids = {1, 2, 3};
  for (SequenceId id : ids) {
    std::vector<TokenId> prompt(shared.begin(), shared.begin() + rng() % 24);
    const std::vector<TokenId> tail = r.RandomTokens(5 + rng() % 20, 50);
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    ASSERT_TRUE(r.Add(id, prompt).ok());
  }
  for (int step = 0; step < 30; ++step) {
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
    if (step % 5 == 4) {
      ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
    }
  }
  // The sliding table (0) released what left its window.
  for (SequenceId id : ids) {
    EXPECT_GT(r.FirstReadable(id, 0), 0) << "sequence " << id;
  }
  // A prefix hit on a live sequence's prompt reads back in every layer.
  const std::vector<TokenId> again(r.sequences().at(1).tokens.begin(),
                                   r.sequences().at(1).tokens.begin() + 20);
  absl::StatusOr<int64_t> hit = r.Add(9, again);
  ASSERT_TRUE(hit.ok()) << hit.status();
  EXPECT_GT(*hit, 0);
  ASSERT_TRUE(r.Step({9}, {static_cast<int64_t>(again.size()) - *hit}).ok());
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
  for (SequenceId id : {1, 2, 3, 9}) ASSERT_TRUE(r.Free(id).ok());
  EXPECT_EQ(m.Metrics().blocks_in_use, 0);
  ASSERT_TRUE(m.Validate().ok());
}

// One byte range of the caches.
struct Range {
  char* begin;
  int64_t bytes;
};

// The rows `layer`'s append of `plan` writes, from the layer's view alone:
// K and V rows (inline: with their scales and padding) and side scales.
std::vector<Range> RowsOf(KVCacheManager& m, const StepPlanInfo& plan,
                          int layer) {
  const LayerView v = *m.GetLayerView(layer);
  const int32_t table = *m.LayerBlockTable(layer);
  const int64_t elem = static_cast<int64_t>(DTypeSize(v.cache_dtype));
  const bool side =
      v.key_scale != nullptr && v.scale_placement == ScalePlacement::kSide;
  std::vector<Range> rows;
  for (const PlanSequence& ps : plan.sequences) {
    const std::vector<BlockId> t = *m.GroupBlockTable(ps.sequence, table);
    for (int64_t p = ps.first_position; p < ps.first_position + ps.num_tokens;
         ++p) {
      const int64_t block = t[p / v.block_size], off = p % v.block_size;
      for (int64_t h = 0; h < v.num_kv_heads; ++h) {
        rows.push_back({static_cast<char*>(v.key_cache) +
                            (block * v.key_strides[0] + off * v.key_strides[1] +
                             h * v.key_strides[2]) *
                                elem,
                        side || v.key_scale == nullptr
                            ? v.head_size * elem
                            : v.key_row_pitch_bytes});
        if (v.value_cache != nullptr) {
          rows.push_back(
              {static_cast<char*>(v.value_cache) +
                   (block * v.value_strides[0] + off * v.value_strides[1] +
                    h * v.value_strides[2]) *
                       elem,
               side || v.key_scale == nullptr ? v.head_size_v * elem
                                              : v.value_row_pitch_bytes});
        }
        if (!side) continue;
        const int64_t s = block * v.scale_strides[0] +
                          off * v.scale_strides[1] + h * v.scale_strides[2];
        rows.push_back({reinterpret_cast<char*>(v.key_scale + s), 4});
        if (v.value_scale != nullptr) {
          rows.push_back({reinterpret_cast<char*>(v.value_scale + s), 4});
        }
      }
    }
  }
  return rows;
}

// Element e of head h's K (V) row at (block, off) of the layer `v` views,
// decoded through the view alone (codes times the row's scale; bf16 as is).
float Decode(const LayerView& v, int64_t block, int64_t off, int64_t h,
             bool is_value, int64_t e) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(v.cache_dtype));
  const int64_t* st = is_value ? v.value_strides : v.key_strides;
  const char* row =
      static_cast<const char*>(is_value ? v.value_cache : v.key_cache) +
      (block * st[0] + off * st[1] + h * st[2]) * elem;
  if (v.cache_dtype == DType::kBFloat16) {
    uint16_t bits;
    std::memcpy(&bits, row + 2 * e, 2);
    return testing::Bf16ToFloat(bits);
  }
  const float* scales = is_value ? v.value_scale : v.key_scale;
  const float scale = scales[block * v.scale_strides[0] +
                             off * v.scale_strides[1] + h * v.scale_strides[2]];
  const uint8_t code = static_cast<uint8_t>(row[e]);
  return (v.cache_dtype == DType::kInt8
              ? static_cast<float>(static_cast<int8_t>(code))
              : testing::Fp8E4M3Value(code)) *
         scale;
}

TEST_P(GroupShapesTest, AppendWritesItsLayersRowsAndNothingElse) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const KVCacheConfig c = Config(GetParam().shapes, GetParam().placement);
  Fixture f(c, seed);
  ASSERT_NE(f.manager, nullptr);
  testing::GroupRunner& r = *f.runner;
  KVCacheManager& m = *f.manager;
  std::mt19937_64 rng(seed);
  // Every page slot's allocation (records: a layer's K region spans it).
  std::map<char*, int64_t> slots;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const LayerView v = *m.GetLayerView(layer);
    slots[static_cast<char*>(v.key_cache)] =
        v.num_blocks * v.key_strides[0] *
        static_cast<int64_t>(DTypeSize(v.cache_dtype));
  }
  ASSERT_EQ(slots.size(), static_cast<size_t>(ConfigPaging(c).layers_per_page));
  for (auto& [base, bytes] : slots) {
    for (int64_t i = 0; i < bytes; ++i) base[i] = static_cast<char>(rng());
  }
  ASSERT_TRUE(r.Add(1, r.RandomTokens(13, 100)).ok());
  ASSERT_TRUE(r.Add(2, r.RandomTokens(7, 100)).ok());
  {
    absl::StatusOr<StepPlanInfo> plan = r.ReserveOnly({1, 2}, {13, 7});
    ASSERT_TRUE(plan.ok()) << plan.status();
    for (int layer = 0; layer < c.num_layers; ++layer) {
      SCOPED_TRACE(absl::StrCat("layer ", layer));
      std::map<char*, std::vector<char>> before;
      for (const auto& [base, bytes] : slots) {
        before[base].assign(base, base + bytes);
      }
      ASSERT_TRUE(r.AppendLayer(*plan, layer).ok());
      const std::vector<Range> rows = RowsOf(m, *plan, layer);
      // Mark the bytes the layer may write; any other change is a bug.
      int64_t changed = 0;
      for (const auto& [base, bytes] : slots) {
        std::vector<bool> mine(bytes, false);
        for (const Range& row : rows) {
          if (row.begin < base || row.begin + row.bytes > base + bytes) {
            continue;
          }
          for (int64_t i = 0; i < row.bytes; ++i) {
            mine[row.begin - base + i] = true;
          }
        }
        const std::vector<char>& old = before[base];
        for (int64_t i = 0; i < bytes; ++i) {
          if (old[i] == base[i]) continue;
          ++changed;
          ASSERT_TRUE(mine[i])
              << "byte " << i << " of the slot at " << static_cast<void*>(base)
              << " changed outside the layer's rows";
        }
      }
      EXPECT_GT(changed, 0);
      // The rows decode through the view to the reference values.
      const LayerView v = *m.GetLayerView(layer);
      const int32_t table = *m.LayerBlockTable(layer);
      for (const PlanSequence& ps : plan->sequences) {
        const std::vector<BlockId> t = *m.GroupBlockTable(ps.sequence, table);
        for (int64_t p = ps.first_position;
             p < ps.first_position + ps.num_tokens; ++p) {
          const int64_t block = t[p / kBlock], off = p % kBlock;
          for (int part = 0; part < (v.head_size_v > 0 ? 2 : 1); ++part) {
            const bool is_value = part == 1;
            const int64_t hs = is_value ? v.head_size_v : v.head_size;
            const std::vector<float> in =
                r.TokenRow(ps.sequence, layer, is_value, p);
            for (int64_t h = 0; h < v.num_kv_heads; ++h) {
              const std::vector<float> want = testing::QuantizeDequantizeHead(
                  std::vector<float>(in.begin() + h * hs,
                                     in.begin() + (h + 1) * hs),
                  v.cache_dtype);
              for (int64_t e = 0; e < hs; ++e) {
                const float got = Decode(v, block, off, h, is_value, e);
                ASSERT_NEAR(got, want[e], 1e-3f * (1.0f + std::fabs(want[e])))
                    << "sequence " << ps.sequence << " token " << p
                    << (is_value ? " V" : " K") << " head " << h << " elem "
                    << e;
              }
            }
          }
        }
      }
    }
    ASSERT_TRUE(m.Commit(plan->id).ok());
  }
  ASSERT_TRUE(r.CheckAll().ok()) << r.CheckAll();
}

TEST_P(GroupShapesTest, PoolHoldsWhatTheBudgetPaysAtTheLargestRecord) {
  KVCacheConfig c = Config(GetParam().shapes, GetParam().placement);
  c.num_blocks = 0;
  c.memory_budget_bytes = 3 << 20;
  absl::StatusOr<int64_t> page = BlockBytesAllLayers(c);
  ASSERT_TRUE(page.ok()) << page.status();
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  ASSERT_TRUE(m.ok()) << m.status();
  // A page: layers_per_page slots of block_size records of the largest
  // record of any group.
  const GroupPaging paging = ConfigPaging(c);
  int64_t record = 0;
  for (const LayerGroup& g : c.layer_groups) {
    const LayerView v = *(*m)->GetLayerView(g.layers[0]);
    record = std::max(record, v.key_strides[1] * static_cast<int64_t>(
                                                     DTypeSize(g.cache_dtype)));
  }
  EXPECT_EQ(paging.record_bytes, record);
  EXPECT_EQ(*page, paging.layers_per_page * kBlock * record);
  const int64_t blocks = (*m)->TotalBlocks();
  EXPECT_LE(blocks * *page, c.memory_budget_bytes);
  EXPECT_GT((blocks + 1) * *page + 1024 * c.num_layers, c.memory_budget_bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GroupShapesTest,
    ::testing::Values(Param{Shapes::kHeads, ScalePlacement::kSide},
                      Param{Shapes::kHeads, ScalePlacement::kInline},
                      Param{Shapes::kSizes, ScalePlacement::kSide},
                      Param{Shapes::kSizes, ScalePlacement::kInline},
                      Param{Shapes::kDtypes, ScalePlacement::kSide},
                      Param{Shapes::kDtypes, ScalePlacement::kInline}),
    ParamName);

}  // namespace
}  // namespace kvcache
