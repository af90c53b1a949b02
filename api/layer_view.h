// LayerView describes one layer's cache completely (DESIGN.md section 2): the
// pointers, dtype, shape and strides an engine's own attention kernel needs
// to read it. A plain value; the pointers stay valid while the manager lives.

#ifndef KVCACHE_API_LAYER_VIEW_H_
#define KVCACHE_API_LAYER_VIEW_H_

#include <cstdint>

#include "api/tensor_view.h"
#include "core/dtype.h"
#include "core/scale_placement.h"

namespace kvcache {

// Everything an engine's own attention kernel needs to read one layer's cache
// (DESIGN.md section 2). Strides are in elements of the tensor they index:
// cache elements for the caches, floats for the scales.
//
//   key_cache    [num_blocks, block_size, num_kv_heads, head_size]    key_strides
//   value_cache  [num_blocks, block_size, num_kv_heads, head_size_v]  value_strides
//   key_scale    [num_blocks, block_size, num_kv_heads]  scale_strides; null for bf16/fp16
//   value_scale  [num_blocks, block_size, num_kv_heads]  scale_strides
//
// Side scales: dense tensors (key_strides[2] == head_size, scale_strides[2]
// == 1). Inline scales (int8/fp8 only): one row of *_row_pitch_bytes per
// (token, head), its codes at byte 0 and its float32 scale at byte
// scale_byte_offset; key_scale == key_cache + scale_byte_offset bytes, and
// scale_strides[2] == row pitch / 4. The same strides index both placements.
//
// Element (b, t, h, e) of K is key_cache[b * key_strides[0] + t *
// key_strides[1] + h * key_strides[2] + e] (V, scales alike), whatever the
// layout, and every stride says where it is:
//
//   uniform model, or layer groups of one cache shape: the dense tensors
//     above; key_strides[1] == num_kv_heads * key_strides[2] (one token's
//     rows), key_strides[0] == block_size * key_strides[1].
//   layer groups of several shapes (DESIGN.md section 10, "records"): each
//     token slot of a page slot is one record of R bytes holding the token's
//     K rows, then its V rows, then (side scales) its K and V scales, so
//     key_strides[1] == value_strides[1] == R / element size,
//     scale_strides[1] == R / 4, key_strides[0] == block_size *
//     key_strides[1]; value_cache, key_scale and value_scale point into the
//     first record. The K, V and scale "tensors" interleave: a tensor's bytes
//     end at its last row ((num_blocks * block_size - 1) * strides[1] +
//     (num_kv_heads - 1) * strides[2] + row elements), not at num_blocks *
//     strides[0]. A block of such a layer (what a block copy moves) is the
//     key_strides[0] * element size bytes from key_cache + b *
//     key_strides[0] elements.
//
// K-only layers (head_size_v 0) have null V pointers and zero V strides.
// Layers of different groups differ in num_kv_heads, head sizes, dtype and
// scale placement (bf16/fp16 groups have no scales, kSide).
struct LayerView {
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
  ScalePlacement scale_placement = ScalePlacement::kSide;
  // Bytes from one (token, head) row to the next (head_size * element size
  // for side scales; inline: codes, scale and padding, e.g. 144 for 128).
  int64_t key_row_pitch_bytes = 0;
  int64_t value_row_pitch_bytes = 0;
  // Inline: byte offset of the scale in each K and V row; 0 for side scales.
  int64_t scale_byte_offset = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_API_LAYER_VIEW_H_
