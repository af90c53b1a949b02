#include "core/layer_group.h"

#include <algorithm>
#include <numeric>

namespace kvcache {

CacheLayout GroupLayout(const LayerGroup& group, int64_t block_size,
                        ScalePlacement placement) {
  CacheLayout layout;
  layout.block_size = block_size;
  layout.num_heads = group.num_kv_heads;
  layout.head_size = group.head_size;
  layout.head_size_v = group.head_size_v;  // 0 = K only.
  layout.cache_dtype = group.cache_dtype;
  layout.scale_placement =
      IsQuantized(group.cache_dtype) ? placement : ScalePlacement::kSide;
  return layout;
}

bool SameCacheShape(const LayerGroup& a, const LayerGroup& b) {
  return a.num_kv_heads == b.num_kv_heads && a.head_size == b.head_size &&
         a.head_size_v == b.head_size_v && a.cache_dtype == b.cache_dtype;
}

int64_t GroupLayerBlockBytes(const LayerGroup& group, int64_t block_size,
                             ScalePlacement placement) {
  CacheLayout layout = GroupLayout(group, block_size, placement);
  layout.num_blocks = 1;
  return LayerBytes(layout);
}

GroupPaging PlanGroupPaging(const std::vector<LayerGroup>& groups,
                            int32_t num_layers, int32_t block_size,
                            ScalePlacement placement) {
  GroupPaging paging;
  int32_t lpp = 0;
  bool one_shape = true;
  for (const LayerGroup& g : groups) {
    lpp = std::gcd(lpp, static_cast<int32_t>(g.layers.size()));
    one_shape = one_shape && SameCacheShape(g, groups[0]);
    paging.slot_bytes = std::max(
        paging.slot_bytes, GroupLayerBlockBytes(g, block_size, placement));
    paging.record_bytes =
        std::max(paging.record_bytes,
                 RecordOffsetsOf(GroupLayout(g, block_size, placement)).bytes);
  }
  if (one_shape) {
    paging.record_bytes = 0;  // Dense slots.
  } else {
    paging.slot_bytes = block_size * paging.record_bytes;
  }
  paging.layers_per_page = lpp;
  paging.layer_table.assign(num_layers, -1);
  paging.layer_slot.assign(num_layers, -1);
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const LayerGroup& g = groups[gi];
    const int32_t window =
        g.kind == AttentionKind::kSlidingWindow ? g.sliding_window : 0;
    for (int32_t first = 0; first < static_cast<int32_t>(g.layers.size());
         first += lpp) {
      const int32_t table = static_cast<int32_t>(paging.tables.size());
      paging.tables.push_back({static_cast<int32_t>(gi), first, window});
      for (int32_t s = 0; s < lpp; ++s) {
        paging.layer_table[g.layers[first + s]] = table;
        paging.layer_slot[g.layers[first + s]] = s;
      }
    }
  }
  return paging;
}

}  // namespace kvcache
