// CacheStorage owns the K/V caches and scale caches of every layer of one KV
// cache, allocated once on a Device and zero-initialised (scales included, so
// no layer ever holds garbage).
//
// Each layer is one allocation, carved into key cache, value cache, key scales
// and value scales at 256-byte aligned offsets (inline scales: key and value
// caches only, the scale pointers pointing into their rows). A K-only layout
// (head_size_v 0) has a key cache and, quantized, key scales only; its value
// pointers are null. Layer groups share page slots instead (CreateSlots,
// CreateRecordSlots; core/layer_group.h). Thread-compatible: the pointers
// never change after Create.

#ifndef KVCACHE_STORAGE_CACHE_STORAGE_H_
#define KVCACHE_STORAGE_CACHE_STORAGE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/cache_layout.h"
#include "storage/buffer.h"
#include "storage/device.h"

namespace kvcache {

class CacheStorage {
 public:
  // Bytes one layer takes, alignment padding included.
  static int64_t LayerAllocationBytes(const CacheLayout& layout);

  // REQUIRES: `device` outlives the storage; the layout is valid.
  // ResourceExhausted when the device cannot hold every layer (nothing stays
  // allocated).
  static absl::StatusOr<std::unique_ptr<CacheStorage>> Create(
      Device* device, const CacheLayout& layout, int num_layers);

  // Layer groups of one cache shape (DESIGN.md "Layer groups"): one
  // allocation per page slot, `num_slots` of them, and layer l addresses the
  // allocation of slot layer_slot[l]. A block id names a page, which one
  // table of layers owns, so the layers sharing a slot (one per table) never
  // hold the same block at once. REQUIRES: as Create; every layer_slot entry
  // in [0, num_slots).
  static absl::StatusOr<std::unique_ptr<CacheStorage>> CreateSlots(
      Device* device, const CacheLayout& layout, int num_slots,
      const std::vector<int32_t>& layer_slot);

  // Layer groups of several cache shapes: `num_slots` allocations of
  // num_blocks * block_size records of `record_bytes` bytes each, and layer
  // l is layouts[l] (dense, num_blocks and block_size as `pool`'s) laid over
  // the records of slot layer_slot[l] (core/cache_layout.h "Records"; its
  // record_pitch is set here). REQUIRES: as CreateSlots; record_bytes a
  // multiple of kRecordAlignment and at least RecordOffsetsOf(layouts[l])
  // .bytes for every l. layout() is `pool`'s.
  static absl::StatusOr<std::unique_ptr<CacheStorage>> CreateRecordSlots(
      Device* device, const CacheLayout& pool,
      const std::vector<CacheLayout>& layouts, int num_slots,
      const std::vector<int32_t>& layer_slot, int64_t record_bytes);

  CacheStorage(const CacheStorage&) = delete;
  CacheStorage& operator=(const CacheStorage&) = delete;

  const CacheLayout& layout() const { return layout_; }
  int num_layers() const { return static_cast<int>(layers_.size()); }
  // REQUIRES: 0 <= layer < num_layers().
  const LayerCache& layer(int layer) const { return layers_[layer]; }
  // The distinct allocations (one per layer, or one per slot): what copies a
  // whole block (copy-on-write) walks. A record allocation is described by
  // the layout of one of its layers (a block is then block_size records
  // whatever the layer). REQUIRES: 0 <= i < num_allocations().
  int num_allocations() const { return static_cast<int>(allocations_.size()); }
  const LayerCache& allocation(int i) const { return allocations_[i]; }
  // Bytes of allocation i, from allocation(i).key_cache.
  int64_t allocation_bytes(int i) const { return allocation_bytes_[i]; }
  int64_t total_bytes() const { return total_bytes_; }

 private:
  CacheStorage(const CacheLayout& layout) : layout_(layout) {}

  // Allocates and zeroes `n` layer caches into allocations_.
  absl::Status Allocate(Device* device, int n, const char* what);
  // Allocates and zeroes `bytes` into buffers_.
  absl::StatusOr<char*> AllocateZeroed(Device* device, int64_t bytes, int i,
                                       int n, const char* what);

  CacheLayout layout_;
  std::vector<Buffer> buffers_;
  std::vector<LayerCache> allocations_;
  std::vector<int64_t> allocation_bytes_;
  std::vector<LayerCache> layers_;
  int64_t total_bytes_ = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_CACHE_STORAGE_H_
