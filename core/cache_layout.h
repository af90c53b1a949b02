// CacheLayout describes one layer's paged K/V cache (DESIGN.md section 2) and
// computes every offset into it; LayerCache is that layout plus the four
// pointers of one layer. The CPU and CUDA kernels and the storage that
// allocates the caches all use these helpers, so the layout lives here alone.
//
// Side scales (ScalePlacement::kSide, the default):
//
//   key_cache    [num_blocks, block_size, num_heads, head_size]
//   value_cache  [num_blocks, block_size, num_heads, head_size_v]
//   key_scale    [num_blocks, block_size, num_heads]   float32 (quantized caches only)
//   value_scale  [num_blocks, block_size, num_heads]   float32 (quantized caches only)
//
// Inline scales (ScalePlacement::kInline; int8 / fp8_e4m3 caches only): each
// (token, head) row of K and of V is one row of row_pitch bytes,
//
//   byte 0                   head_size (head_size_v) codes
//   byte scale_byte_offset   the row's float32 scale
//   up to row_pitch          zeros (written with the scale, so that a write
//                            covers whole sectors)
//
//   scale_byte_offset = max(head_size, head_size_v)          (a multiple of 8)
//   row_pitch         = scale_byte_offset + 4 rounded up to 16  (128 -> 144)
//
//   key_cache    [num_blocks, block_size, num_heads, row_pitch]  bytes
//   value_cache  [num_blocks, block_size, num_heads, row_pitch]  bytes
//
// and key_scale (value_scale) points at key_cache (value_cache) +
// scale_byte_offset, so that key_scale[scale_offset(slot, head)] is the scale
// of (slot, head) under both placements: scale_offset steps scale_stride()
// floats per row (1 side, row_pitch / 4 inline).
//
// K-only (latent, MLA) caches: head_size_v == 0. There is no value cache and
// no value scale (both pointers null); each (token, head) has one K row and
// one scale. Inline rows are then head_size + 4 bytes rounded up to 16.
//
// A slot is block_id * block_size + offset. Plain value types;
// thread-compatible.

#ifndef KVCACHE_CORE_CACHE_LAYOUT_H_
#define KVCACHE_CORE_CACHE_LAYOUT_H_

#include <cstdint>

#include "core/dtype.h"
#include "core/host_device.h"
#include "core/scale_placement.h"

namespace kvcache {

// Largest head_size and head_size_v (elements of one (token, head) row).
inline constexpr int64_t kMaxHeadSize = 1024;

// Inline rows are padded to a multiple of this many bytes.
inline constexpr int64_t kInlineRowAlignment = 16;

struct CacheLayout {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t head_size = 0;    // K elements per (token, head).
  int64_t head_size_v = 0;  // V elements per (token, head); 0 = K only.
  DType cache_dtype = DType::kInt8;
  ScalePlacement scale_placement = ScalePlacement::kSide;

  KVCACHE_HOST_DEVICE int64_t num_slots() const {
    return num_blocks * block_size;
  }
  // Whether the cache has a V half (false for a K-only latent cache).
  KVCACHE_HOST_DEVICE bool has_value() const { return head_size_v > 0; }
  KVCACHE_HOST_DEVICE bool inline_scales() const {
    return scale_placement == ScalePlacement::kInline;
  }
  // Whether the scales live in their own tensors (a quantized cache with side
  // scales): storage allocates them and block copy copies them.
  KVCACHE_HOST_DEVICE bool side_scales() const {
    return !inline_scales() &&
           (cache_dtype == DType::kInt8 || cache_dtype == DType::kFp8E4M3);
  }
  // Inline: byte offset of the scale in a row (0 for side scales).
  KVCACHE_HOST_DEVICE int64_t scale_byte_offset() const {
    if (!inline_scales()) return 0;
    return head_size > head_size_v ? head_size : head_size_v;
  }
  // Inline: zero bytes a write stores after the scale, up to the row pitch
  // (4 or 12: the scale and its padding are one 8- or 16-byte aligned
  // store); 0 for side scales.
  KVCACHE_HOST_DEVICE int64_t scale_pad_bytes() const {
    return inline_scales() ? InlineRowPitch() - scale_byte_offset() - 4 : 0;
  }
  // Elements from one (token, head) row of K (V) to the next: head_size
  // (head_size_v) for side scales, row_pitch for inline ones (1-byte codes).
  KVCACHE_HOST_DEVICE int64_t key_row_pitch() const {
    return inline_scales() ? InlineRowPitch() : head_size;
  }
  KVCACHE_HOST_DEVICE int64_t value_row_pitch() const {
    return inline_scales() ? InlineRowPitch() : head_size_v;
  }
  // Floats from one row's scale to the next.
  KVCACHE_HOST_DEVICE int64_t scale_stride() const {
    return inline_scales() ? InlineRowPitch() / 4 : 1;
  }
  // Elements of one K (V) slot: all heads of one token (inline: with their
  // scales and padding).
  KVCACHE_HOST_DEVICE int64_t key_slot_elems() const {
    return num_heads * key_row_pitch();
  }
  KVCACHE_HOST_DEVICE int64_t value_slot_elems() const {
    return has_value() ? num_heads * value_row_pitch() : 0;
  }
  // Element offset of (slot, head, 0) in the K (V) cache.
  KVCACHE_HOST_DEVICE int64_t key_offset(int64_t slot, int64_t head) const {
    return (slot * num_heads + head) * key_row_pitch();
  }
  KVCACHE_HOST_DEVICE int64_t value_offset(int64_t slot, int64_t head) const {
    return (slot * num_heads + head) * value_row_pitch();
  }
  // Float offset of (slot, head) from either scale pointer.
  KVCACHE_HOST_DEVICE int64_t scale_offset(int64_t slot, int64_t head) const {
    return (slot * num_heads + head) * scale_stride();
  }
  // The same offsets with the placement fixed at compile time, for kernels
  // that specialize on it (the side instantiation then computes exactly what
  // a cache without the inline option would). REQUIRES: kInline ==
  // inline_scales().
  template <bool kInline>
  KVCACHE_HOST_DEVICE int64_t key_offset_as(int64_t slot, int64_t head) const {
    return (slot * num_heads + head) * (kInline ? InlineRowPitch() : head_size);
  }
  template <bool kInline>
  KVCACHE_HOST_DEVICE int64_t value_offset_as(int64_t slot,
                                              int64_t head) const {
    return (slot * num_heads + head) *
           (kInline ? InlineRowPitch() : head_size_v);
  }
  template <bool kInline>
  KVCACHE_HOST_DEVICE int64_t scale_offset_as(int64_t slot,
                                              int64_t head) const {
    return (slot * num_heads + head) * (kInline ? InlineRowPitch() / 4 : 1);
  }
  // Elements of one whole block in the K (V) cache; floats from one block's
  // scales to the next.
  KVCACHE_HOST_DEVICE int64_t key_block_elems() const {
    return block_size * key_slot_elems();
  }
  KVCACHE_HOST_DEVICE int64_t value_block_elems() const {
    return block_size * value_slot_elems();
  }
  KVCACHE_HOST_DEVICE int64_t scale_block_elems() const {
    return block_size * num_heads * scale_stride();
  }
  // Floats of one block's side scale tensor (0 without side scales).
  KVCACHE_HOST_DEVICE int64_t side_scale_block_elems() const {
    return side_scales() ? block_size * num_heads : 0;
  }

 private:
  KVCACHE_HOST_DEVICE int64_t InlineRowPitch() const {
    const int64_t longer = head_size > head_size_v ? head_size : head_size_v;
    return (longer + 4 + kInlineRowAlignment - 1) / kInlineRowAlignment *
           kInlineRowAlignment;
  }
};

// The caches of one layer. Scale pointers are null exactly when
// layout.cache_dtype is bf16/fp16; with inline scales they point into the K
// and V caches (InlineScale).
struct LayerCache {
  CacheLayout layout;
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  float* key_scale = nullptr;
  float* value_scale = nullptr;
};

// The scale pointer of an inline-scale K or V cache: cache +
// scale_byte_offset() bytes.
inline float* InlineScale(const CacheLayout& layout, void* cache) {
  return reinterpret_cast<float*>(static_cast<char*>(cache) +
                                  layout.scale_byte_offset());
}

// Total bytes of one layer's K cache, V cache and (for side scales) both
// scale caches (K-only: the K cache and its scales).
inline int64_t LayerBytes(const CacheLayout& layout) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  return layout.num_blocks *
         ((layout.key_block_elems() + layout.value_block_elems()) * elem +
          (layout.has_value() ? 2 : 1) * layout.side_scale_block_elems() *
              static_cast<int64_t>(sizeof(float)));
}

}  // namespace kvcache

#endif  // KVCACHE_CORE_CACHE_LAYOUT_H_
