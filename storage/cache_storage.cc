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

absl::Status CacheStorage::Allocate(Device* device, int n, const char* what) {
  const LayerOffsets offsets = Offsets(layout_);
  const bool quantized = IsQuantized(layout_.cache_dtype);
  buffers_.reserve(n);
  allocations_.reserve(n);
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<Buffer> buffer = device->Allocate(offsets.total);
    if (!buffer.ok()) {
      return absl::Status(
          buffer.status().code(),
          absl::StrCat("cache of ", what, " ", i, " of ", n, " (",
                       offsets.total, " bytes): ", buffer.status().message()));
    }
    absl::Status zeroed = device->Zero(buffer->data(), buffer->size());
    if (!zeroed.ok()) return zeroed;
    char* base = buffer->as<char>();
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
    buffers_.push_back(*std::move(buffer));
    total_bytes_ += offsets.total;
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

}  // namespace kvcache
