// LayerView describes one layer's cache completely (DESIGN.md section 2): the
// pointers, dtype, shape and strides an engine's own attention kernel needs
// to read it. A plain value; the pointers stay valid while the manager lives.

#ifndef KVCACHE_API_LAYER_VIEW_H_
#define KVCACHE_API_LAYER_VIEW_H_

#include <cstdint>

#include "api/tensor_view.h"
#include "core/dtype.h"

namespace kvcache {

// Everything an engine's own attention kernel needs to read one layer's cache
// (DESIGN.md section 2). Strides are in elements.
struct LayerView {
  //   key_cache    [num_blocks, block_size, num_kv_heads, head_size]
  //   value_cache  [num_blocks, block_size, num_kv_heads, head_size_v]
  //   key_scale    [num_blocks, block_size, num_kv_heads]  null for bf16/fp16
  //   value_scale  [num_blocks, block_size, num_kv_heads]  null for bf16/fp16
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  float* key_scale = nullptr;
  float* value_scale = nullptr;
  DType cache_dtype = DType::kInt8;
  MemoryKind memory = MemoryKind::kHost;
  int32_t device = 0;
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_size = 0;
  int64_t head_size_v = 0;
  int64_t key_strides[4] = {0, 0, 0, 0};    // block, token, head, element
  int64_t value_strides[4] = {0, 0, 0, 0};  // block, token, head, element
  int64_t scale_strides[3] = {0, 0, 0};     // block, token, head
};

}  // namespace kvcache

#endif  // KVCACHE_API_LAYER_VIEW_H_
