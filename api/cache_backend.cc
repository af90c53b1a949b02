#include "api/cache_backend.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/layer_group.h"
#include "core/status_macros.h"
#include "kernels/cpu_attention.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"
#include "kernels/kernel_validation.h"

namespace kvcache::internal {
namespace {

// Per-layer alignment padding CacheStorage may add (four 256-byte carves).
constexpr int64_t kLayerPadding = 1024;

// The pool size: config.num_blocks, or what the memory budget (or fraction of
// the device's free memory) holds of blocks of `block_bytes` (all layers).
absl::StatusOr<int64_t> NumBlocks(const KVCacheConfig& config, Device& device,
                                  int64_t block_bytes) {
  if (config.num_blocks != 0) return config.num_blocks;
  int64_t budget = config.memory_budget_bytes;
  if (budget == 0) {
    size_t free_bytes = 0, total_bytes = 0;
    KVCACHE_RETURN_IF_ERROR(device.MemoryInfo(&free_bytes, &total_bytes));
    const double bytes =
        static_cast<double>(free_bytes) * config.memory_fraction;
    budget = bytes >= static_cast<double>(kMaxCacheBytes)
                 ? kMaxCacheBytes
                 : static_cast<int64_t>(bytes);
  }
  budget = std::min(budget, kMaxCacheBytes);
  const int64_t num_blocks =
      (budget - kLayerPadding * config.num_layers) / block_bytes;
  if (num_blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a capacity of ", budget, " bytes holds no block: one block of all ",
        config.num_layers, " layers takes ", block_bytes, " bytes"));
  }
  return std::min<int64_t>(num_blocks, INT32_MAX);
}

}  // namespace

CacheBackend::CacheBackend(std::unique_ptr<Device> device)
    : device_(std::move(device)),
      memory_kind_(device_->kind() == DeviceKind::kCuda ? MemoryKind::kCuda
                                                        : MemoryKind::kHost) {
  if (memory_kind_ == MemoryKind::kCuda) {
    quantize_write_ = [](const QuantizeWriteParams& params, void* stream,
                         ThreadPool*) {
      return QuantizeWriteCuda(params, stream);
    };
  } else {
    quantize_write_ = [](const QuantizeWriteParams& params, void*,
                         ThreadPool* pool) {
      return QuantizeWriteCpu(params, pool);
    };
  }
}

absl::StatusOr<std::unique_ptr<CacheBackend>> CacheBackend::Create(
    const KVCacheConfig& config, std::unique_ptr<Device> device) {
  std::unique_ptr<CacheBackend> backend(new CacheBackend(std::move(device)));
  if (backend->memory_kind_ == MemoryKind::kHost) {
    backend->pool_ = std::make_unique<ThreadPool>(
        ThreadPool::ResolveThreads(config.cpu_threads));
  }
  if (!config.layer_groups.empty()) {
    KVCACHE_RETURN_IF_ERROR(backend->CreateGroupStorage(config));
    return backend;
  }
  CacheLayout& layout = backend->layout_;
  layout.block_size = config.block_size;
  layout.num_heads = config.num_kv_heads;
  layout.head_size = config.head_size;
  layout.head_size_v =
      config.head_size_v != 0 ? config.head_size_v : config.head_size;
  layout.cache_dtype = config.cache_dtype;
  layout.scale_placement = config.scale_placement;
  // Capacity, in checked arithmetic (ValidateConfig bounds every factor).
  KVCACHE_ASSIGN_OR_RETURN(const int64_t block_bytes,
                           BlockBytesAllLayers(config));
  KVCACHE_ASSIGN_OR_RETURN(layout.num_blocks,
                           NumBlocks(config, *backend->device_, block_bytes));
  KVCACHE_RETURN_IF_ERROR(ValidateLayout(layout));
  KVCACHE_ASSIGN_OR_RETURN(
      backend->storage_,
      CacheStorage::Create(backend->device_.get(), layout, config.num_layers));
  return backend;
}

absl::Status CacheBackend::CreateGroupStorage(const KVCacheConfig& config) {
  const GroupPaging paging = ConfigPaging(config);
  // layout_: the pool (pages, tokens per block) with layer_groups[0]'s
  // shape; each layer's own shape is in its LayerCache.
  layout_ = GroupLayout(config.layer_groups[0], config.block_size,
                        config.scale_placement);
  KVCACHE_ASSIGN_OR_RETURN(const int64_t page_bytes,
                           BlockBytesAllLayers(config));
  KVCACHE_ASSIGN_OR_RETURN(layout_.num_blocks,
                           NumBlocks(config, *device_, page_bytes));
  if (paging.record_bytes == 0) {
    // One cache shape: slot s of every page is one dense layout over the
    // pool's pages (block b of the layers in slot s at b times one layer's
    // block), and the kernels address it as a uniform layer.
    KVCACHE_RETURN_IF_ERROR(ValidateLayout(layout_));
    KVCACHE_ASSIGN_OR_RETURN(
        storage_,
        CacheStorage::CreateSlots(device_.get(), layout_,
                                  paging.layers_per_page, paging.layer_slot));
    return absl::OkStatus();
  }
  // Several shapes: every slot is records of paging.record_bytes per token
  // slot of the pool, each layer its group's shape over them.
  std::vector<CacheLayout> layouts(config.num_layers);
  for (const LayerGroup& g : config.layer_groups) {
    CacheLayout layout =
        GroupLayout(g, config.block_size, config.scale_placement);
    layout.num_blocks = layout_.num_blocks;
    layout.record_pitch =
        paging.record_bytes / static_cast<int64_t>(DTypeSize(g.cache_dtype));
    KVCACHE_RETURN_IF_ERROR(ValidateLayout(layout));
    for (int32_t l : g.layers) layouts[l] = layout;
  }
  KVCACHE_ASSIGN_OR_RETURN(
      storage_, CacheStorage::CreateRecordSlots(
                    device_.get(), layout_, layouts, paging.layers_per_page,
                    paging.layer_slot, paging.record_bytes));
  return absl::OkStatus();
}

void CacheBackend::DisableWritesForTest() {
  quantize_write_ = [](const QuantizeWriteParams&, void*, ThreadPool*) {
    return absl::OkStatus();
  };
}

absl::Status CacheBackend::Gather(const GatherParams& params,
                                  void* stream) const {
  return memory_kind_ == MemoryKind::kCuda ? GatherCuda(params, stream)
                                           : GatherCpu(params, pool_.get());
}

absl::Status CacheBackend::Attention(const AttentionParams& params,
                                     void* stream) const {
  return memory_kind_ == MemoryKind::kCuda ? AttentionCuda(params, stream)
                                           : AttentionCpu(params, pool_.get());
}

absl::Status CacheBackend::CopyBlocks(const int64_t* pairs, int64_t num_pairs,
                                      void* stream) const {
  BlockCopyParams copy;
  copy.pairs = pairs;
  copy.num_pairs = num_pairs;
  // Every allocation once: one per layer, or one per page slot with groups.
  const int n = storage_->num_allocations();
  for (int layer = 0; layer < n; ++layer) {
    copy.cache = storage_->allocation(layer);
    if (absl::Status s = ValidateBlockCopy(copy); !s.ok()) {
      return Annotate(s, absl::StrCat("block copy in layer ", layer));
    }
  }
  for (int layer = 0; layer < n; ++layer) {
    copy.cache = storage_->allocation(layer);
    absl::Status s = memory_kind_ == MemoryKind::kCuda
                         ? BlockCopyCuda(copy, stream)
                         : BlockCopyCpu(copy, pool_.get());
    if (!s.ok())
      return Annotate(s, absl::StrCat("block copy in layer ", layer));
  }
  return absl::OkStatus();
}

LayerView CacheBackend::View(int layer) const {
  const LayerCache& cache = storage_->layer(layer);
  const CacheLayout& l = cache.layout;
  LayerView view;
  view.key_cache = cache.key_cache;
  view.value_cache = cache.value_cache;
  view.key_scale = cache.key_scale;
  view.value_scale = cache.value_scale;
  view.cache_dtype = l.cache_dtype;
  view.memory = memory_kind_;
  view.device = device_->ordinal();
  view.num_blocks = l.num_blocks;
  view.block_size = l.block_size;
  view.num_kv_heads = l.num_heads;
  view.head_size = l.head_size;
  view.head_size_v = l.head_size_v;
  view.scale_placement = l.scale_placement;
  const int64_t elem = static_cast<int64_t>(DTypeSize(l.cache_dtype));
  view.key_row_pitch_bytes = l.key_row_pitch() * elem;
  view.value_row_pitch_bytes = l.has_value() ? l.value_row_pitch() * elem : 0;
  view.scale_byte_offset = l.scale_byte_offset();
  const int64_t k[4] = {l.block_size * l.key_slot_stride(), l.key_slot_stride(),
                        l.key_row_pitch(), 1};
  // K only: no V, all-zero strides.
  const int64_t v[4] = {
      l.has_value() ? l.block_size * l.value_slot_stride() : 0,
      l.has_value() ? l.value_slot_stride() : 0,
      l.has_value() ? l.value_row_pitch() : 0, l.has_value() ? 1 : 0};
  std::copy_n(k, 4, view.key_strides);
  std::copy_n(v, 4, view.value_strides);
  view.scale_strides[0] = l.block_size * l.scale_slot_stride();
  view.scale_strides[1] = l.scale_slot_stride();
  view.scale_strides[2] = l.scale_stride();
  return view;
}

std::string CacheBackend::Describe(const KVCacheConfig& config) const {
  // absl::StrCat only: Debian's absl::StrFormat cannot pass std::bad_alloc on.
  const bool cuda = memory_kind_ == MemoryKind::kCuda;
  const int64_t tenths_of_mib =
      (storage_->total_bytes() * 10 + (1 << 19)) / (1 << 20);
  // Layer groups of several shapes: each layer's shape is its group's.
  const CacheLayout& first = storage_->layer(0).layout;
  const std::string shape =
      first.records()
          ? absl::StrCat("layer groups of several shapes, records of ",
                         first.record_pitch *
                             static_cast<int64_t>(DTypeSize(first.cache_dtype)),
                         " bytes per token and page slot]")
          : absl::StrCat(layout_.num_heads, " heads, K ", layout_.head_size,
                         " / V ", layout_.head_size_v, "] ",
                         DTypeName(layout_.cache_dtype));
  return absl::StrCat(
      "kvcache: ", cuda ? "CUDA" : "CPU", " backend",
      cuda ? absl::StrCat(" (device ", device_->ordinal(), ")") : "", ", ",
      config.num_layers, " layers x [", layout_.num_blocks, " blocks, ",
      layout_.block_size, " tokens, ", shape,
      layout_.inline_scales() ? " with inline scales" : "", " (input ",
      DTypeName(config.input_dtype), "), ", tenths_of_mib / 10, ".",
      tenths_of_mib % 10, " MiB of cache, ",
      layout_.num_blocks * layout_.block_size,
      " tokens of capacity, prefix caching ",
      config.enable_prefix_caching ? "on" : "off");
}

}  // namespace kvcache::internal
