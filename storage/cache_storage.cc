#include "storage/cache_storage.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace kvcache {
namespace {

constexpr int64_t kAlign = 256;

int64_t AlignUp(int64_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

struct LayerOffsets {
  int64_t value = 0;
  int64_t key_scale = 0;
  int64_t value_scale = 0;
  int64_t total = 0;
};

LayerOffsets Offsets(const CacheLayout& layout) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  const int64_t key_bytes = layout.num_blocks * layout.key_block_elems() * elem;
  const int64_t value_bytes =
      layout.num_blocks * layout.value_block_elems() * elem;
  const int64_t scale_bytes = layout.num_blocks *
                              layout.side_scale_block_elems() *
                              static_cast<int64_t>(sizeof(float));
  LayerOffsets o;
  o.value = AlignUp(key_bytes);
  o.key_scale = o.value + AlignUp(value_bytes);
  o.value_scale = o.key_scale + AlignUp(scale_bytes);
  // A K-only cache has no V and no V scales.
  o.total = o.value_scale + (layout.has_value() ? AlignUp(scale_bytes) : 0);
  return o;
}

}  // namespace

int64_t CacheStorage::LayerAllocationBytes(const CacheLayout& layout) {
  return Offsets(layout).total;
}

absl::StatusOr<char*> CacheStorage::AllocateZeroed(Device* device,
                                                   int64_t bytes, int i, int n,
                                                   const char* what) {
  absl::StatusOr<Buffer> buffer = device->Allocate(bytes);
  if (!buffer.ok()) {
    return absl::Status(
        buffer.status().code(),
        absl::StrCat("cache of ", what, " ", i, " of ", n, " (", bytes,
                     " bytes): ", buffer.status().message()));
  }
  KVCACHE_RETURN_IF_ERROR(device->Zero(buffer->data(), buffer->size()));
  char* base = buffer->as<char>();
  buffers_.push_back(*std::move(buffer));
  allocation_bytes_.push_back(bytes);
  total_bytes_ += bytes;
  return base;
}

absl::Status CacheStorage::Allocate(Device* device, int n, const char* what) {
  const LayerOffsets offsets = Offsets(layout_);
  const bool quantized = IsQuantized(layout_.cache_dtype);
  buffers_.reserve(n);
  allocations_.reserve(n);
  for (int i = 0; i < n; ++i) {
    KVCACHE_ASSIGN_OR_RETURN(char* base,
                             AllocateZeroed(device, offsets.total, i, n, what));
    LayerCache cache;
    cache.layout = layout_;
    cache.key_cache = base;
    cache.value_cache = base + offsets.value;
    if (layout_.inline_scales()) {
      cache.key_scale = InlineScale(layout_, cache.key_cache);
      cache.value_scale = InlineScale(layout_, cache.value_cache);
    } else if (quantized) {
      cache.key_scale = reinterpret_cast<float*>(base + offsets.key_scale);
      cache.value_scale = reinterpret_cast<float*>(base + offsets.value_scale);
    }
    if (!layout_.has_value()) {  // K only: no V cache, no V scale.
      cache.value_cache = nullptr;
      cache.value_scale = nullptr;
    }
    allocations_.push_back(cache);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CacheStorage>> CacheStorage::Create(
    Device* device, const CacheLayout& layout, int num_layers) {
  std::unique_ptr<CacheStorage> storage(new CacheStorage(layout));
  KVCACHE_RETURN_IF_ERROR(storage->Allocate(device, num_layers, "layer"));
  storage->layers_ = storage->allocations_;
  return storage;
}

absl::StatusOr<std::unique_ptr<CacheStorage>> CacheStorage::CreateSlots(
    Device* device, const CacheLayout& layout, int num_slots,
    const std::vector<int32_t>& layer_slot) {
  std::unique_ptr<CacheStorage> storage(new CacheStorage(layout));
  KVCACHE_RETURN_IF_ERROR(storage->Allocate(device, num_slots, "page slot"));
  storage->layers_.reserve(layer_slot.size());
  for (int32_t slot : layer_slot) {
    storage->layers_.push_back(storage->allocations_[slot]);
  }
  return storage;
}

namespace {

// Layer `layout` over the records at `base` (core/cache_layout.h "Records").
LayerCache RecordLayer(CacheLayout layout, char* base, int64_t record_bytes) {
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  layout.record_pitch = record_bytes / elem;
  const RecordOffsets r = RecordOffsetsOf(layout);
  LayerCache cache;
  cache.layout = layout;
  cache.key_cache = base;
  if (layout.has_value()) cache.value_cache = base + r.value;
  if (layout.inline_scales()) {
    cache.key_scale = InlineScale(layout, cache.key_cache);
    if (layout.has_value()) {
      cache.value_scale = InlineScale(layout, cache.value_cache);
    }
  } else if (layout.side_scales()) {
    cache.key_scale = reinterpret_cast<float*>(base + r.key_scale);
    if (layout.has_value()) {
      cache.value_scale = reinterpret_cast<float*>(base + r.value_scale);
    }
  }
  return cache;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CacheStorage>> CacheStorage::CreateRecordSlots(
    Device* device, const CacheLayout& pool,
    const std::vector<CacheLayout>& layouts, int num_slots,
    const std::vector<int32_t>& layer_slot, int64_t record_bytes) {
  std::unique_ptr<CacheStorage> storage(new CacheStorage(pool));
  const int64_t bytes = pool.num_blocks * pool.block_size * record_bytes;
  std::vector<char*> bases;
  storage->buffers_.reserve(num_slots);
  for (int i = 0; i < num_slots; ++i) {
    KVCACHE_ASSIGN_OR_RETURN(
        char* base,
        storage->AllocateZeroed(device, bytes, i, num_slots, "page slot"));
    bases.push_back(base);
  }
  storage->allocations_.resize(num_slots);
  storage->layers_.reserve(layer_slot.size());
  for (size_t l = 0; l < layer_slot.size(); ++l) {
    CacheLayout layout = layouts[l];
    layout.num_blocks = pool.num_blocks;
    layout.block_size = pool.block_size;
    storage->layers_.push_back(
        RecordLayer(layout, bases[layer_slot[l]], record_bytes));
    // Any layer of a slot describes its blocks for a copy.
    storage->allocations_[layer_slot[l]] = storage->layers_.back();
  }
  return storage;
}

}  // namespace kvcache
