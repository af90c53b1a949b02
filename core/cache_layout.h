// CacheLayout describes one layer's paged K/V cache (DESIGN.md section 2) and
// computes every offset into it; LayerCache is that layout plus the four
// pointers of one layer. The CPU and CUDA kernels and the storage that
// allocates the caches all use these helpers, so the layout lives here alone.
//
//   key_cache    [num_blocks, block_size, num_heads, head_size]
//   value_cache  [num_blocks, block_size, num_heads, head_size_v]
//   key_scale    [num_blocks, block_size, num_heads]   float32 (quantized caches only)
//   value_scale  [num_blocks, block_size, num_heads]   float32 (quantized caches only)
//
// A slot is block_id * block_size + offset. Plain value types;
// thread-compatible.

#ifndef KVCACHE_CORE_CACHE_LAYOUT_H_
#define KVCACHE_CORE_CACHE_LAYOUT_H_

#include <cstdint>

#include "core/dtype.h"
#include "core/host_device.h"

namespace kvcache {

// Largest head_size and head_size_v (elements of one (token, head) row).
inline constexpr int64_t kMaxHeadSize = 1024;

struct CacheLayout {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t head_size = 0;    // K elements per (token, head).
  int64_t head_size_v = 0;  // V elements per (token, head).
  DType cache_dtype = DType::kInt8;

  KVCACHE_HOST_DEVICE int64_t num_slots() const {
    return num_blocks * block_size;
  }
  // Elements of one K (V) slot: all heads of one token.
  KVCACHE_HOST_DEVICE int64_t key_slot_elems() const {
    return num_heads * head_size;
  }
  KVCACHE_HOST_DEVICE int64_t value_slot_elems() const {
    return num_heads * head_size_v;
  }
  // Element offset of (slot, head, 0) in the K (V) cache.
  KVCACHE_HOST_DEVICE int64_t key_offset(int64_t slot, int64_t head) const {
    return (slot * num_heads + head) * head_size;
  }
  KVCACHE_HOST_DEVICE int64_t value_offset(int64_t slot, int64_t head) const {
    return (slot * num_heads + head) * head_size_v;
  }
  // Element offset of (slot, head) in either scale cache.
  KVCACHE_HOST_DEVICE int64_t scale_offset(int64_t slot, int64_t head) const {
    return slot * num_heads + head;
  }
  // Elements of one whole block in the K (V, scale) cache.
  KVCACHE_HOST_DEVICE int64_t key_block_elems() const {
    return block_size * key_slot_elems();
  }
  KVCACHE_HOST_DEVICE int64_t value_block_elems() const {
    return block_size * value_slot_elems();
  }
  KVCACHE_HOST_DEVICE int64_t scale_block_elems() const {
    return block_size * num_heads;
  }
};

// The caches of one layer. Scale pointers are null exactly when
// layout.cache_dtype is bf16/fp16.
struct LayerCache {
  CacheLayout layout;
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  float* key_scale = nullptr;
  float* value_scale = nullptr;
};

// Total bytes of one layer's K cache, V cache and (for quantized dtypes) both
// scale caches.
inline int64_t LayerBytes(const CacheLayout& layout) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  int64_t bytes = layout.num_blocks *
                  (layout.key_block_elems() + layout.value_block_elems()) *
                  elem;
  if (IsQuantized(layout.cache_dtype)) {
    bytes += 2 * layout.num_blocks * layout.scale_block_elems() *
             static_cast<int64_t>(sizeof(float));
  }
  return bytes;
}

}  // namespace kvcache

#endif  // KVCACHE_CORE_CACHE_LAYOUT_H_
