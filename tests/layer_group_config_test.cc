// Layer groups in KVCacheConfig: ValidateConfig's checks (each naming the bad
// field), the paging of core/layer_group.h, and the page bytes.

#include <string>

#include "api/kv_cache_config.h"
#include "api/kv_cache_manager.h"
#include "api/layer_view.h"
#include "core/layer_group.h"
#include "gtest/gtest.h"
#include "tests/make_layer_group.h"

namespace kvcache {
namespace {

KVCacheConfig Hybrid() {
  KVCacheConfig c;
  c.num_layers = 6;
  c.block_size = 16;
  c.num_blocks = 8;
  c.layer_groups = {MakeGroup({0, 1, 3, 4}, 64, 4, 64, 64),
                    MakeGroup({2, 5}, 0, 2, 128, 128)};
  return c;
}

void ExpectBad(const KVCacheConfig& c, const std::string& needle) {
  absl::Status s = ValidateConfig(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s;
}

TEST(LayerGroupConfigTest, AcceptsHybridAndLatentGroups) {
  EXPECT_TRUE(ValidateConfig(Hybrid()).ok()) << ValidateConfig(Hybrid());
  KVCacheConfig mla;
  mla.num_layers = 3;
  mla.num_blocks = 4;
  mla.layer_groups = {MakeGroup({0, 1, 2}, 0, 1, 576, 0, DType::kFp8E4M3)};
  EXPECT_TRUE(ValidateConfig(mla).ok()) << ValidateConfig(mla);
}

TEST(LayerGroupConfigTest, RejectsBadGroupsNamingTheField) {
  KVCacheConfig c = Hybrid();
  c.layer_groups[1].layers = {2, 3};
  ExpectBad(c, "layer 3 is in layer_groups[0] and layer_groups[1]");
  c = Hybrid();
  c.layer_groups[1].layers = {2};
  ExpectBad(c, "layer 5 is in no layer group");
  c = Hybrid();
  c.layer_groups[1].layers = {2, 6};
  ExpectBad(c, "layer_groups[1].layers entry 6 is not in [0, num_layers 6)");
  c = Hybrid();
  c.layer_groups[0].sliding_window = 0;
  ExpectBad(c, "layer_groups[0].sliding_window 0 must be >= 1");
  c = Hybrid();
  c.layer_groups[1].sliding_window = 5;
  ExpectBad(c, "layer_groups[1].sliding_window 5 must be 0");
  c = Hybrid();
  c.layer_groups[0].head_size_v = 12;
  ExpectBad(c, "layer_groups[0].head_size_v 12 is not a multiple of 8");
  c = Hybrid();
  c.layer_groups[1].num_kv_heads = 0;
  ExpectBad(c, "layer_groups[1].num_kv_heads 0 must be >= 1");
  c = Hybrid();
  c.layer_groups[1].kind = static_cast<AttentionKind>(7);
  ExpectBad(c, "layer_groups[1].kind 7");
  c = Hybrid();
  c.layer_groups[0].cache_dtype = DType::kFloat16;
  ExpectBad(c, "must equal layer_groups[0].cache_dtype");
  c = Hybrid();
  c.head_size = 64;
  ExpectBad(c, "head_size 64 must be 0 with layer_groups");
  c = Hybrid();
  c.layer_groups[0].layers.clear();
  ExpectBad(c, "layer_groups[0].layers is empty");
  // Features of main not offered with groups yet: refused by name.
  c = Hybrid();
  c.input_dtype = DType::kBFloat16;
  for (LayerGroup& g : c.layer_groups) g.cache_dtype = DType::kBFloat16;
  c.scale_placement = ScalePlacement::kInline;
  ExpectBad(c, "scale_placement inline needs an int8 or fp8_e4m3 layer group");
  c = Hybrid();
  c.max_tokens_per_step = 64;
  c.graph_max_tokens = 16;  // Offered (tests/graph_step_groups_test.cc).
  EXPECT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
  c.graph_max_tokens = 65;
  ExpectBad(c, "graph_max_tokens");
  c = Hybrid();
  c.enable_kv_events = true;  // Offered (tests/kv_events_groups_test.cc).
  EXPECT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
}

TEST(LayerGroupConfigTest, PagingSharesSlotsAcrossGroups) {
  const KVCacheConfig c = Hybrid();
  const GroupPaging p = ConfigPaging(c);
  EXPECT_EQ(p.layers_per_page, 2);  // gcd(4, 2).
  ASSERT_EQ(p.tables.size(), 3u);   // Two sliding tables, one full.
  EXPECT_EQ(p.tables[0].sliding_window, 64);
  EXPECT_EQ(p.tables[1].sliding_window, 64);
  EXPECT_EQ(p.tables[2].sliding_window, 0);
  // Layer 3 is the third of group 0: table 1, slot 0.
  EXPECT_EQ(p.layer_table[3], 1);
  EXPECT_EQ(p.layer_slot[3], 0);
  EXPECT_EQ(p.layer_table[5], 2);
  EXPECT_EQ(p.layer_slot[5], 1);
  // Sliding: 16 x 4 x (64 + 64 + 8) = 8704; full: 16 x 2 x (256 + 8) = 8448.
  EXPECT_EQ(GroupLayerBlockBytes(c.layer_groups[0], 16), 8704);
  EXPECT_EQ(GroupLayerBlockBytes(c.layer_groups[1], 16), 8448);
  // Two shapes: records. Sliding: K 256, V 256, 2 x 4 scales = 544 bytes;
  // full: K 256, V 256, 2 x 2 scales = 528. Slots of 16 records of 544.
  EXPECT_EQ(p.record_bytes, 544);
  EXPECT_EQ(p.slot_bytes, 16 * 544);
  EXPECT_EQ(*BlockBytesAllLayers(c), 2 * 8704);
  // K-only: one scale per (token, head).
  EXPECT_EQ(GroupLayerBlockBytes(MakeGroup({0}, 0, 1, 576, 0), 64),
            64 * (576 + 4));
  // Inline rows carry their scales: 128 + 4 -> 144 bytes per row.
  EXPECT_EQ(GroupLayerBlockBytes(MakeGroup({0}, 0, 2, 128, 128), 16,
                                 ScalePlacement::kInline),
            16 * 2 * 2 * 144);
}

// Page bytes of groups of several shapes: lpp x block_size x the largest
// record, each record K rows, V rows (16-byte aligned) and side scales,
// rounded up to 16 (core/cache_layout.h RecordOffsetsOf).
TEST(LayerGroupConfigTest, RecordBytesAreTheLargestRecord) {
  KVCacheConfig c;
  c.num_layers = 6;
  c.block_size = 16;
  c.num_blocks = 8;
  c.input_dtype = DType::kBFloat16;
  // 8 KV heads x 128 int8 (K 1024 + V 1024 + 64 scales = 2112), 4 x 256
  // bf16 (K 2048 + V 2048 = 4096), K-only 576 fp8 (576 + 4 -> 592).
  c.layer_groups = {MakeGroup({0, 3}, 0, 8, 128, 128),
                    MakeGroup({1, 4}, 32, 4, 256, 256, DType::kBFloat16),
                    MakeGroup({2, 5}, 0, 1, 576, 0, DType::kFp8E4M3)};
  ASSERT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
  GroupPaging p = ConfigPaging(c);
  EXPECT_EQ(p.layers_per_page, 2);
  EXPECT_EQ(p.record_bytes, 4096);
  EXPECT_EQ(*BlockBytesAllLayers(c), 2 * 16 * 4096);
  c.layer_groups[1].cache_dtype = DType::kInt8;  // 2048 + 64 -> the int8 max.
  c.input_dtype = DType::kFloat32;
  EXPECT_EQ(ConfigPaging(c).record_bytes, 2112);
  // Inline: 8 x 144 x 2 = 2304; 4 x 272 x 2 = 2176; 592 (576 + 4 -> 592).
  c.scale_placement = ScalePlacement::kInline;
  ASSERT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c);
  EXPECT_EQ(ConfigPaging(c).record_bytes, 2304);
  // One shape: dense slots, no records.
  c = Hybrid();
  c.layer_groups[1] = MakeGroup({2, 5}, 0, 4, 64, 64);
  EXPECT_EQ(ConfigPaging(c).record_bytes, 0);
  EXPECT_EQ(ConfigPaging(c).slot_bytes, 8704);
}

TEST(LayerGroupConfigTest, CreateServesOneShapeAndMixedShapes) {
  // Hybrid() mixes 4 x 64 and 2 x 128 heads: records of 544 bytes.
  auto m = KVCacheManager::Create(Hybrid());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->NumBlockTables(), 3);
  const LayerView a = *(*m)->GetLayerView(0);  // Sliding, 4 x 64.
  const LayerView b = *(*m)->GetLayerView(2);  // Full, 2 x 128.
  EXPECT_EQ(a.num_kv_heads, 4);
  EXPECT_EQ(b.num_kv_heads, 2);
  EXPECT_EQ(b.head_size, 128);
  for (const LayerView* v : {&a, &b}) {
    EXPECT_EQ(v->key_strides[1], 544);  // One record per token.
    EXPECT_EQ(v->key_strides[0], 16 * 544);
    EXPECT_EQ(v->value_strides[1], 544);
    EXPECT_EQ(v->scale_strides[1], 544 / 4);
    EXPECT_EQ(v->key_strides[2], v->head_size);
    EXPECT_EQ(
        static_cast<char*>(v->value_cache) - static_cast<char*>(v->key_cache),
        256);  // K rows: 4 x 64 or 2 x 128 bytes.
    EXPECT_EQ(reinterpret_cast<char*>(v->key_scale) -
                  static_cast<char*>(v->key_cache),
              512);
    EXPECT_EQ(v->value_scale - v->key_scale, v->num_kv_heads);
  }
  KVCacheConfig same = Hybrid();
  same.layer_groups[1] = MakeGroup({2, 5}, 0, 4, 64, 64);
  m = KVCacheManager::Create(same);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->NumBlockTables(), 3);
  EXPECT_EQ((*m)->GetLayerView(0)->key_strides[1], 4 * 64);  // Dense.
}

}  // namespace
}  // namespace kvcache
