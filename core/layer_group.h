// LayerGroup: the attention kind and cache shape shared by a set of layers
// (sliding-window, full-attention and K-only latent caches in one model), and
// GroupPaging: how the groups share the pages of one block pool (DESIGN.md
// "Layer groups"). Plain value types; thread-compatible.
//
// Pages. A block id names one page of the pool. Every group draws pages from
// the same free list, so memory moves freely between groups. A page holds one
// block (block_size tokens) for `layers_per_page` layers ("slots"); every slot
// has `slot_bytes` bytes, the largest one-layer block of any group. Each
// group's layers are cut into tables of layers_per_page consecutive entries of
// its layer list; a sequence has one block table per table, and layer
// group.layers[t * layers_per_page + s] keeps its block at slot s of the
// pages of table t. layers_per_page is the greatest common divisor of the
// groups' layer counts, so no slot is ever padding; the only waste is a group
// whose one-layer block is smaller than slot_bytes (its slots' tails).
//
// Slot s of every page is one allocation (CacheStorage::CreateSlots) laid out
// one of two ways:
//
//   one cache shape   (every group has the same KV heads, head sizes and
//                      dtype; record_bytes 0) the dense layout of DESIGN.md
//                      section 2 over the pool's pages, slot_bytes = one
//                      layer's block
//   several shapes    records (core/cache_layout.h): token slot p of the
//                      pool (page p / block_size) owns record_bytes bytes at
//                      p * record_bytes, the largest record of any group; a
//                      layer's record holds its K rows, V rows and side
//                      scales (RecordOffsetsOf), slot_bytes = block_size *
//                      record_bytes, and a page's block of one slot is one
//                      contiguous run of slot_bytes

#ifndef KVCACHE_CORE_LAYER_GROUP_H_
#define KVCACHE_CORE_LAYER_GROUP_H_

#include <cstdint>
#include <vector>

#include "core/cache_layout.h"
#include "core/dtype.h"
#include "core/scale_placement.h"

namespace kvcache {

enum class AttentionKind : int32_t {
  kFull = 0,           // Every token of the sequence stays cached.
  kSlidingWindow = 1,  // Only the newest `sliding_window` tokens are read.
};

struct LayerGroup {
  // Layer indices in [0, num_layers); every layer is in exactly one group.
  std::vector<int32_t> layers;
  AttentionKind kind = AttentionKind::kFull;
  // Tokens of the window (kSlidingWindow only, >= 1; 0 for kFull).
  int32_t sliding_window = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;  // K elements per (token, head): multiple of 8.
  // V elements per (token, head): a multiple of 8, or 0 for a K-only (latent,
  // MLA) cache. Unlike KVCacheConfig::head_size_v, 0 does not mean head_size.
  int32_t head_size_v = 0;
  DType cache_dtype = DType::kInt8;
};

// The layout of one layer of `group` (num_blocks 0, dense): its shape, and
// `placement` when the group is quantized (bf16/fp16 groups have no scales
// and keep kSide).
CacheLayout GroupLayout(const LayerGroup& group, int64_t block_size,
                        ScalePlacement placement);

// Whether two groups have one cache shape (KV heads, K and V head sizes,
// dtype): what decides between the dense and the record page layout.
bool SameCacheShape(const LayerGroup& a, const LayerGroup& b);

// Bytes of one layer's dense block of `block_size` tokens in `group` (K, V,
// their side scales; inline rows with their scales and padding). REQUIRES: a
// validated group (no overflow below 2^56).
int64_t GroupLayerBlockBytes(const LayerGroup& group, int64_t block_size,
                             ScalePlacement placement = ScalePlacement::kSide);

// One block table of a sequence: `layers_per_page` layers of one group.
struct GroupTable {
  int32_t group = 0;           // Index into the config's layer_groups.
  int32_t first_entry = 0;     // Its layers: group.layers[first_entry, +lpp).
  int32_t sliding_window = 0;  // 0 = full attention.
};

struct GroupPaging {
  int32_t layers_per_page = 0;
  int64_t slot_bytes = 0;  // Bytes of one slot of one page.
  // Bytes of one token's record in every slot when the groups have several
  // cache shapes; 0 when they share one (dense slots).
  int64_t record_bytes = 0;
  std::vector<GroupTable> tables;
  // Per layer: its table and its slot within a page.
  std::vector<int32_t> layer_table;
  std::vector<int32_t> layer_slot;

  int64_t page_bytes() const { return layers_per_page * slot_bytes; }
};

// The paging of validated groups over `num_layers` layers, quantized groups
// keeping their scales at `placement` (REQUIRES: each layer in exactly one
// group, block_size >= 1).
GroupPaging PlanGroupPaging(const std::vector<LayerGroup>& groups,
                            int32_t num_layers, int32_t block_size,
                            ScalePlacement placement = ScalePlacement::kSide);

}  // namespace kvcache

#endif  // KVCACHE_CORE_LAYER_GROUP_H_
