// The rows of the row kernels (quantize-write and gather), shared by the CPU
// row walks (kernels/cpu_rows.h) and the CUDA kernels (quantize_write.cuh,
// gather.cuh). A row is one (token, head) of K and of V:
//
//   row r in [0, num_tokens * num_heads)    r = token * num_heads + head
//   dense K/V element offset (DenseKV)      token * token_stride + head * head_stride
//   cache K/V, scale offset (CacheLayout)   at (slot, head)
//   slot of a write                         slot_mapping[token]
//   slot of a gather                        slots[token], or with pos = token_begin + token
//                                           block_table[pos / block_size] * block_size
//                                             + pos % block_size
//
// WriteRowAt / GatherRowAt turn r into a RowRef with the dividers given
// (FastDivmod in the CUDA kernels, IntDivider on the CPU: fast_divmod.h); its
// offsets come from CacheLayout and DenseKV. Host and device code; plain value
// types.

#ifndef KVCACHE_KERNELS_ROW_REF_H_
#define KVCACHE_KERNELS_ROW_REF_H_

#include <cstdint>

#include "core/cache_layout.h"
#include "core/host_device.h"
#include "kernels/fast_divmod.h"
#include "kernels/kernel_params.h"

namespace kvcache::internal {

// Dividers of the row kernels: row -> (token, head) and token position ->
// (block, offset).
template <class Divider>
struct RowDividersOf {
  Divider heads;
  Divider block_size;
};

// The CUDA kernels' dividers, built by their launcher.
using RowDividers = RowDividersOf<FastDivmod>;

// One row: its token and head, and the cache slot of the token.
//
//   slot   WriteRowAt                 GatherRowAt
//   < 0    padding                    padding, or a slot past the cache's end
//   >= 0   in_cache() tells           in the cache
//
// Debug builds report slots past the end before the kernels run; release
// builds skip them (writes) or gather zeros.
struct RowRef {
  int64_t token = 0;
  int64_t head = 0;
  int64_t slot = -1;

  // Whether the slot is in a cache of num_slots slots.
  KVCACHE_HOST_DEVICE bool in_cache(int64_t num_slots) const {
    return !(slot < 0 || slot >= num_slots);
  }
  // Element offsets of the row in the cache (K, V, scales) ...
  KVCACHE_HOST_DEVICE int64_t key_offset(const CacheLayout& layout) const {
    return layout.key_offset(slot, head);
  }
  KVCACHE_HOST_DEVICE int64_t value_offset(const CacheLayout& layout) const {
    return layout.value_offset(slot, head);
  }
  KVCACHE_HOST_DEVICE int64_t scale_offset(const CacheLayout& layout) const {
    return layout.scale_offset(slot, head);
  }
  // ... with records() fixed at compile time (CacheLayout::key_offset_in) ...
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t key_offset_in(const CacheLayout& layout) const {
    return layout.key_offset_in<kRecords>(slot, head);
  }
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t value_offset_in(const CacheLayout& layout) const {
    return layout.value_offset_in<kRecords>(slot, head);
  }
  template <bool kRecords>
  KVCACHE_HOST_DEVICE int64_t scale_offset_in(const CacheLayout& layout) const {
    return layout.scale_offset_in<kRecords>(slot, head);
  }
  // ... and the placement too (CacheLayout::key_offset_as).
  template <bool kInline, bool kRecords>
  KVCACHE_HOST_DEVICE int64_t key_offset_as(const CacheLayout& layout) const {
    return layout.key_offset_as<kInline, kRecords>(slot, head);
  }
  template <bool kInline, bool kRecords>
  KVCACHE_HOST_DEVICE int64_t value_offset_as(const CacheLayout& layout) const {
    return layout.value_offset_as<kInline, kRecords>(slot, head);
  }
  template <bool kInline, bool kRecords>
  KVCACHE_HOST_DEVICE int64_t scale_offset_as(const CacheLayout& layout) const {
    return layout.scale_offset_as<kInline, kRecords>(slot, head);
  }
  // ... and in the dense operand.
  KVCACHE_HOST_DEVICE int64_t key_offset(const DenseKV& dense) const {
    return dense.key_offset(token, head);
  }
  KVCACHE_HOST_DEVICE int64_t value_offset(const DenseKV& dense) const {
    return dense.value_offset(token, head);
  }
};

// An index array entry: through the read-only data cache on the device.
template <class T>
KVCACHE_HOST_DEVICE T LoadIndex(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Row r of a quantize-write. REQUIRES: 0 <= r < num_tokens * num_heads.
template <class Divider>
KVCACHE_HOST_DEVICE RowRef WriteRowAt(const QuantizeWriteParams& p,
                                      const RowDividersOf<Divider>& dividers,
                                      int64_t r) {
  RowRef row;
  dividers.heads.Divmod(r, &row.token, &row.head);
  row.slot = LoadIndex(p.slot_mapping + row.token);
  return row;
}

// Row r of a gather. REQUIRES: 0 <= r < num_tokens * num_heads.
template <class Divider>
KVCACHE_HOST_DEVICE RowRef GatherRowAt(const GatherParams& p,
                                       const RowDividersOf<Divider>& dividers,
                                       int64_t r) {
  const CacheLayout& layout = p.cache.layout;
  RowRef row;
  dividers.heads.Divmod(r, &row.token, &row.head);
  int64_t slot;
  if (p.slots != nullptr) {
    slot = LoadIndex(p.slots + row.token);
  } else {
    int64_t block_index, offset;
    dividers.block_size.Divmod(p.token_begin + row.token, &block_index,
                               &offset);
    const int64_t block = LoadIndex(p.block_table + block_index);
    slot = block < 0 ? -1 : block * layout.block_size + offset;
  }
  row.slot = slot < layout.num_slots() ? slot : -1;
  return row;
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_ROW_REF_H_
