// MakeGroup: a LayerGroup in one expression, for the layer-group tests'
// configs: full attention when window is 0, else a sliding window of
// `window` tokens.
//
// Thread-safety: a pure function.

#ifndef KVCACHE_TESTS_MAKE_LAYER_GROUP_H_
#define KVCACHE_TESTS_MAKE_LAYER_GROUP_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/layer_group.h"

namespace kvcache {

inline LayerGroup MakeGroup(std::vector<int32_t> layers, int32_t window,
                            int32_t heads, int32_t k, int32_t v,
                            DType dtype = DType::kInt8) {
  LayerGroup g;
  g.layers = std::move(layers);
  g.kind = window > 0 ? AttentionKind::kSlidingWindow : AttentionKind::kFull;
  g.sliding_window = window;
  g.num_kv_heads = heads;
  g.head_size = k;
  g.head_size_v = v;
  g.cache_dtype = dtype;
  return g;
}

}  // namespace kvcache

#endif  // KVCACHE_TESTS_MAKE_LAYER_GROUP_H_
