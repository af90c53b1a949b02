#include "core/layer_group.h"

#include <algorithm>
#include <numeric>

namespace kvcache {

GroupPaging PlanGroupPaging(const std::vector<LayerGroup>& groups,
                            int32_t num_layers, int32_t block_size) {
  GroupPaging paging;
  int32_t lpp = 0;
  for (const LayerGroup& g : groups) {
    lpp = std::gcd(lpp, static_cast<int32_t>(g.layers.size()));
    paging.slot_bytes =
        std::max(paging.slot_bytes, GroupLayerBlockBytes(g, block_size));
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
