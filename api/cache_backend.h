// CacheBackend is where a KVCacheManager's K/V lives and how it is touched:
// the Device (host or one CUDA GPU), every layer's cache and scale storage,
// the pool size chosen from the config's capacity, and the CPU or CUDA
// implementation of each kernel (with the CPU backend's thread pool). The
// manager's other parts (allocator, plans, lookups) see only this class, so
// a second memory tier can be added beside it.
//
// Thread safety: the layout, storage and pointers never change after Create
// and may be read from any thread; the kernel calls may run concurrently
// with each other on different streams (the manager serializes them anyway).
// Ownership: owns the device, the storage and the thread pool. Internal to
// api/.

#ifndef KVCACHE_API_CACHE_BACKEND_H_
#define KVCACHE_API_CACHE_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/kv_cache_config.h"
#include "api/layer_view.h"
#include "api/tensor_view.h"
#include "core/cache_layout.h"
#include "kernels/attention_params.h"
#include "kernels/kernel_params.h"
#include "kernels/thread_pool.h"
#include "storage/cache_storage.h"
#include "storage/device.h"

namespace kvcache::internal {

class CacheBackend {
 public:
  // Sizes the pool (config.num_blocks, or as many blocks of all layers as the
  // memory budget or fraction of free memory holds), then allocates and
  // zeroes every layer. REQUIRES: ValidateConfig(config) is OK.
  // ResourceExhausted when not even one block fits or the memory cannot be
  // allocated.
  //
  // With layer_groups (DESIGN.md "Layer groups"): the pool holds num_blocks
  // pages of BlockBytesAllLayers bytes, one allocation per page slot, and
  // layer(l) lies in the allocation of its slot (layers of one slot, one per
  // table, share it: a page belongs to one table). Groups of one cache shape
  // keep the dense layout in each slot; groups of several shapes (KV heads,
  // head sizes, dtype) interleave each slot in records (core/cache_layout.h)
  // and layer(l).layout is l's group's shape. head_size_v 0 is a K-only
  // cache (null V pointers).
  static absl::StatusOr<std::unique_ptr<CacheBackend>> Create(
      const KVCacheConfig& config, std::unique_ptr<Device> device);

  CacheBackend(const CacheBackend&) = delete;
  CacheBackend& operator=(const CacheBackend&) = delete;

  Device& device() const { return *device_; }
  // The pool's layout: num_blocks, block_size and, without layer groups,
  // every layer's shape. With groups it has layer_groups[0]'s shape; a
  // layer's own is layer(l).layout.
  const CacheLayout& layout() const { return layout_; }
  int num_layers() const { return storage_->num_layers(); }
  // REQUIRES: 0 <= layer < num_layers().
  const LayerCache& layer(int layer) const { return storage_->layer(layer); }
  const CacheStorage& storage() const { return *storage_; }
  MemoryKind memory_kind() const { return memory_kind_; }
  int32_t ordinal() const { return device_->ordinal(); }

  // The kernels, on this backend's implementation. `stream` is ignored on the
  // CPU. The callers validate the params first (kernels/kernel_validation.h).
  absl::Status QuantizeWrite(const QuantizeWriteParams& params,
                             void* stream) const {
    return quantize_write_(params, stream, pool_.get());
  }
  absl::Status Gather(const GatherParams& params, void* stream) const;
  absl::Status Attention(const AttentionParams& params, void* stream) const;
  // Copies `num_pairs` (src, dst) block pairs (int64, in this backend's
  // memory) in every layer (every page slot with groups), K, V and scales. Every layer's arguments are
  // checked before any copy runs.
  absl::Status CopyBlocks(const int64_t* pairs, int64_t num_pairs,
                          void* stream) const;

  // Test seam: every later QuantizeWrite succeeds without touching memory
  // (a no-op device), so a benchmark sees Append's own host work alone.
  void DisableWritesForTest();

  // The pointers, shape and strides an engine's kernel needs for `layer`.
  // REQUIRES: 0 <= layer < num_layers().
  LayerView View(int layer) const;
  // One line for the log: backend, layout, bytes, capacity.
  std::string Describe(const KVCacheConfig& config) const;

 private:
  explicit CacheBackend(std::unique_ptr<Device> device);

  // Create's storage for a config with layer groups.
  absl::Status CreateGroupStorage(const KVCacheConfig& config);

  // The quantize-write implementation, chosen once at Create (CPU or CUDA).
  using QuantizeWriteFn = absl::Status (*)(const QuantizeWriteParams& params,
                                           void* stream, ThreadPool* pool);

  std::unique_ptr<Device> device_;
  MemoryKind memory_kind_;
  std::unique_ptr<ThreadPool> pool_;  // CPU backend only.
  CacheLayout layout_;
  std::unique_ptr<CacheStorage> storage_;
  QuantizeWriteFn quantize_write_ = nullptr;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_CACHE_BACKEND_H_
