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
// Records (record_pitch != 0; layer groups of different cache shapes,
// DESIGN.md section 10): the slots of a layer are interleaved instead of
// dense. Slot s owns one record of record_pitch cache elements (bytes for
// int8 / fp8) holding its K rows, V rows and side scales at the byte offsets
// RecordOffsetsOf gives:
//
//   byte 0                     K rows   [num_heads, key_row_pitch]
//   value                      V rows   [num_heads, value_row_pitch]
//   key_scale, value_scale     side scales [num_heads] float32 each
//
// and key_cache, value_cache, key_scale and value_scale point at those parts
// of record 0 (slot 0), so that every offset below steps slot * the slot
// stride (record_pitch; record_pitch / 4 floats for the scales) plus head *
// the row pitch. A block of such a layer is one contiguous run of block_size
// records, starting at key_cache.
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
  // Cache elements from one slot's record to the next (a multiple of 16
  // bytes); 0 = the dense tensors. Records hold 1-byte elements whenever they
  // hold scales (quantized caches), so record_pitch / 4 floats step the
  // scales.
  int64_t record_pitch = 0;

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
  // Whether the slots are interleaved in records (see above).
  KVCACHE_HOST_DEVICE bool records() const { return record_pitch != 0; }
  // Elements from one slot's K (V) rows to the next: the slot's rows
  // (key_slot_elems) when dense, record_pitch in records; floats from one
  // slot's scales to the next.
  KVCACHE_HOST_DEVICE int64_t key_slot_stride() const {
    return records() ? record_pitch : key_slot_elems();
  }
  KVCACHE_HOST_DEVICE int64_t value_slot_stride() const {
    return records() ? record_pitch : value_slot_elems();
  }
  KVCACHE_HOST_DEVICE int64_t scale_slot_stride() const {
    return records() ? record_pitch / 4 : num_heads * scale_stride();
  }
  // Element offset of (slot, head, 0) in the K (V) cache.
  KVCACHE_HOST_DEVICE int64_t key_offset(int64_t slot, int64_t head) const {
    return records() ? key_offset_in<true>(slot, head)
                     : key_offset_in<false>(slot, head);
  }
  KVCACHE_HOST_DEVICE int64_t value_offset(int64_t slot, int64_t head) const {
    return records() ? value_offset_in<true>(slot, head)
                     : value_offset_in<false>(slot, head);
  }
  // Float offset of (slot, head) from either scale pointer.
  KVCACHE_HOST_DEVICE int64_t scale_offset(int64_t slot, int64_t head) const {
    return records() ? scale_offset_in<true>(slot, head)
                     : scale_offset_in<false>(slot, head);
  }
  // The same offsets with records() fixed at compile time (kRecords), for
  // kernels that specialize on it: the dense instantiation computes exactly
  // what a layout without records would, (slot * num_heads + head) * pitch,
  // whose row index the K, V and scale offsets share. REQUIRES: kRecords ==
  // records().
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t key_offset_in(int64_t slot, int64_t head) const {
    return Offset<kRecords>(slot, head, key_row_pitch(), record_pitch);
  }
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t value_offset_in(int64_t slot,
                                              int64_t head) const {
    return Offset<kRecords>(slot, head, value_row_pitch(), record_pitch);
  }
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t scale_offset_in(int64_t slot,
                                              int64_t head) const {
    return Offset<kRecords>(slot, head, scale_stride(), record_pitch / 4);
  }
  // ... and with the placement fixed too (the side instantiation then
  // computes exactly what a cache without the inline option would).
  // REQUIRES: kInline == inline_scales(), kRecords == records().
  template <bool kInline, bool kRecords = false>
  KVCACHE_HOST_DEVICE int64_t key_offset_as(int64_t slot, int64_t head) const {
    return Offset<kRecords>(slot, head, kInline ? InlineRowPitch() : head_size,
                            record_pitch);
  }
  template <bool kInline, bool kRecords = false>
  KVCACHE_HOST_DEVICE int64_t value_offset_as(int64_t slot,
                                              int64_t head) const {
    return Offset<kRecords>(
        slot, head, kInline ? InlineRowPitch() : head_size_v, record_pitch);
  }
  template <bool kInline, bool kRecords = false>
  KVCACHE_HOST_DEVICE int64_t scale_offset_as(int64_t slot,
                                              int64_t head) const {
    return Offset<kRecords>(slot, head, kInline ? InlineRowPitch() / 4 : 1,
                            record_pitch / 4);
  }
  // Elements of one whole block in the dense K (V) cache; floats from one
  // block's scales to the next (dense; records: block_size slot strides).
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
  // Row `head` of `slot` in rows of `pitch`: dense, row slot * num_heads +
  // head; records, `slot_stride` per slot.
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t Offset(int64_t slot, int64_t head, int64_t pitch,
                                     int64_t slot_stride) const {
    if constexpr (kRecords) {
      return slot * slot_stride + head * pitch;
    } else {
      return (slot * num_heads + head) * pitch;
    }
  }
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

// Where one slot's parts lie in its record (layout.records()): byte offsets
// from the record's start, K rows at 0. K and V rows start on 16-byte
// boundaries; `bytes` (what the parts need) is a multiple of 16, the least
// record_pitch * element size this shape fits in. Offsets of absent parts are
// where they would start (K-only: no V rows; bf16/fp16 or inline: no scales).
struct RecordOffsets {
  int64_t value = 0;
  int64_t key_scale = 0;
  int64_t value_scale = 0;
  int64_t bytes = 0;
};

inline constexpr int64_t kRecordAlignment = 16;

inline RecordOffsets RecordOffsetsOf(const CacheLayout& layout) {
  auto align = [](int64_t n) {
    return (n + kRecordAlignment - 1) / kRecordAlignment * kRecordAlignment;
  };
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  RecordOffsets r;
  r.value = align(layout.key_slot_elems() * elem);
  r.key_scale = align(r.value + layout.value_slot_elems() * elem);
  const int64_t scale_bytes =
      layout.side_scales()
          ? layout.num_heads * static_cast<int64_t>(sizeof(float))
          : 0;
  r.value_scale = r.key_scale + scale_bytes;
  r.bytes =
      align(r.value_scale + (layout.has_value() ? scale_bytes : int64_t{0}));
  return r;
}

// Total bytes of one layer's K cache, V cache and (for side scales) both
// scale caches (K-only: the K cache and its scales), dense.
inline int64_t LayerBytes(const CacheLayout& layout) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  return layout.num_blocks *
         ((layout.key_block_elems() + layout.value_block_elems()) * elem +
          (layout.has_value() ? 2 : 1) * layout.side_scale_block_elems() *
              static_cast<int64_t>(sizeof(float)));
}

}  // namespace kvcache

#endif  // KVCACHE_CORE_CACHE_LAYOUT_H_
