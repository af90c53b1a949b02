#include "api/manager_impl.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/tensor_checks.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"
#include "spdlog/spdlog.h"

namespace kvcache {
namespace internal {

Kernels::Kernels(DeviceKind kind, int cpu_threads)
    : cuda_(kind == DeviceKind::kCuda) {
  if (!cuda_) {
    pool_ =
        std::make_unique<ThreadPool>(ThreadPool::ResolveThreads(cpu_threads));
  }
}

absl::Status Kernels::QuantizeWrite(const QuantizeWriteParams& p,
                                    void* stream) const {
  return cuda_ ? QuantizeWriteCuda(p, stream)
               : QuantizeWriteCpu(p, pool_.get());
}
absl::Status Kernels::Gather(const GatherParams& p, void* stream) const {
  return cuda_ ? GatherCuda(p, stream) : GatherCpu(p, pool_.get());
}
absl::Status Kernels::BlockCopy(const BlockCopyParams& p, void* stream) const {
  return cuda_ ? BlockCopyCuda(p, stream) : BlockCopyCpu(p, pool_.get());
}

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

}  // namespace internal
namespace {

// Default block-table width: enough blocks for this many tokens.
constexpr int64_t kDefaultMaxTokensPerSequence = 131072;
// Per-layer alignment padding CacheStorage may add (four 256-byte carves).
constexpr int64_t kLayerPadding = 1024;

std::shared_ptr<spdlog::logger> Logger(const std::string& name) {
  if (!name.empty()) {
    if (std::shared_ptr<spdlog::logger> logger = spdlog::get(name)) {
      return logger;
    }
  }
  return spdlog::default_logger();
}

}  // namespace

absl::Status KVCacheManager::Impl::Init() {
  layout_.block_size = config_.block_size;
  layout_.num_heads = config_.num_kv_heads;
  layout_.head_size = config_.head_size;
  layout_.head_size_v =
      config_.head_size_v != 0 ? config_.head_size_v : config_.head_size;
  layout_.cache_dtype = config_.cache_dtype;

  // Capacity.
  CacheLayout one_block = layout_;
  one_block.num_blocks = 1;
  const int64_t block_bytes = LayerBytes(one_block) * config_.num_layers;
  int64_t num_blocks = config_.num_blocks;
  if (num_blocks == 0) {
    int64_t budget = config_.memory_budget_bytes;
    if (budget == 0) {
      size_t free_bytes = 0, total_bytes = 0;
      if (absl::Status s = device_->MemoryInfo(&free_bytes, &total_bytes);
          !s.ok()) {
        return s;
      }
      budget = static_cast<int64_t>(static_cast<double>(free_bytes) *
                                    config_.memory_fraction);
    }
    num_blocks = (budget - kLayerPadding * config_.num_layers) / block_bytes;
    if (num_blocks < 1) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "a capacity of ", budget, " bytes holds no block: one block of all ",
          config_.num_layers, " layers takes ", block_bytes, " bytes"));
    }
    num_blocks = std::min<int64_t>(num_blocks, INT32_MAX);
  }
  layout_.num_blocks = num_blocks;
  table_cols_ = config_.max_blocks_per_sequence;
  if (table_cols_ == 0) {
    table_cols_ = std::min<int64_t>(
        num_blocks, (kDefaultMaxTokensPerSequence + config_.block_size - 1) /
                        config_.block_size);
  }

  absl::StatusOr<std::unique_ptr<CacheStorage>> storage =
      CacheStorage::Create(device_.get(), layout_, config_.num_layers);
  if (!storage.ok()) return storage.status();
  storage_ = *std::move(storage);

  BlockManagerOptions options;
  options.num_blocks = static_cast<int32_t>(num_blocks);
  options.block_size = config_.block_size;
  options.enable_prefix_caching = config_.enable_prefix_caching;
  absl::StatusOr<std::unique_ptr<BlockManager>> blocks =
      BlockManager::Create(options);
  if (!blocks.ok()) return blocks.status();

  std::lock_guard<std::mutex> lock(mu_);
  blocks_ = *std::move(blocks);
  absl::StatusOr<std::unique_ptr<internal::StepBuffers>> steps =
      internal::StepBuffers::Create(device_.get(), config_.max_inflight_plans,
                                    config_.max_tokens_per_step,
                                    config_.max_sequences_per_step);
  if (!steps.ok()) return steps.status();
  steps_ = *std::move(steps);

  const size_t table_bytes =
      static_cast<size_t>(config_.max_sequences_per_step) * (table_cols_ + 1) *
      sizeof(int32_t);
  absl::StatusOr<Buffer> buffer = device_->AllocateStaging(table_bytes);
  if (!buffer.ok()) return buffer.status();
  table_staging_ = *std::move(buffer);
  buffer = device_->Allocate(table_bytes);
  if (!buffer.ok()) return buffer.status();
  table_device_ = *std::move(buffer);
  if (absl::Status s = device_->Zero(table_device_.data(), table_bytes);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<Event> event = device_->CreateEvent();
  if (!event.ok()) return event.status();
  table_uploaded_ = *std::move(event);
  buffer = device_->AllocateStaging(table_cols_ * sizeof(int32_t));
  if (!buffer.ok()) return buffer.status();
  gather_staging_ = *std::move(buffer);
  buffer = device_->Allocate(table_cols_ * sizeof(int32_t));
  if (!buffer.ok()) return buffer.status();
  gather_device_ = *std::move(buffer);

  Logger(config_.logger_name)
      ->info(
          "kvcache: {} backend{}, {} layers x [{} blocks, {} tokens, {} heads, "
          "K {} / V {}] {} (input {}), {:.1f} MiB of cache, {} tokens of "
          "capacity, prefix caching {}",
          device_->kind() == DeviceKind::kCuda ? "CUDA" : "CPU",
          device_->kind() == DeviceKind::kCuda
              ? absl::StrCat(" (device ", device_->ordinal(), ")")
              : std::string(),
          config_.num_layers, layout_.num_blocks, layout_.block_size,
          layout_.num_heads, layout_.head_size, layout_.head_size_v,
          std::string(DTypeName(layout_.cache_dtype)),
          std::string(DTypeName(config_.input_dtype)),
          static_cast<double>(storage_->total_bytes()) / (1 << 20),
          layout_.num_blocks * layout_.block_size,
          config_.enable_prefix_caching ? "on" : "off");
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::CheckBatch(
    absl::Span<const ReserveRequest> batch) const {
  if (batch.empty()) {
    return absl::InvalidArgumentError("reserve of an empty batch");
  }
  if (static_cast<int64_t>(batch.size()) > config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch of ", batch.size(), " sequences exceeds max_sequences_per_step ",
        config_.max_sequences_per_step));
  }
  int64_t tokens = 0;
  for (const ReserveRequest& request : batch) {
    if (const uint64_t plan = blocks_->PendingPlan(request.sequence);
        plan != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", request.sequence, " already has a reservation in plan ",
          plan, ": commit or abort it first"));
    }
    // Clamped per request so that hostile counts (INT64_MAX) cannot overflow
    // the sum (found by //fuzz:manager_fuzzer).
    tokens += std::clamp<int64_t>(request.num_tokens, 0,
                                  int64_t{config_.max_tokens_per_step} + 1);
  }
  if (tokens > config_.max_tokens_per_step) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch of ", tokens, " tokens exceeds max_tokens_per_step ",
        config_.max_tokens_per_step));
  }
  return absl::OkStatus();
}

absl::StatusOr<KVCacheManager::Impl::PlanState*> KVCacheManager::Impl::FindPlan(
    uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  if (it == plans_.end()) {
    return absl::NotFoundError(
        absl::StrCat("plan ", plan_id,
                     " not found (never reserved, or already committed or "
                     "aborted)"));
  }
  return &it->second;
}

void KVCacheManager::Impl::ReleasePlan(uint64_t plan_id) {
  auto it = plans_.find(plan_id);
  steps_->slot(it->second.slot).busy = false;
  plans_.erase(it);
}

absl::Status KVCacheManager::Impl::CopyOnWrite(PlanState& plan, int layer,
                                               void* stream) {
  if (plan.num_copies == 0 || plan.copied[layer]) return absl::OkStatus();
  internal::StepBuffers::Slot& slot = steps_->slot(plan.slot);
  if (absl::Status s = device_->StreamWaitEvent(stream, slot.uploaded);
      !s.ok()) {
    return s;
  }
  BlockCopyParams copy;
  copy.cache = storage_->layer(layer);
  copy.pairs = steps_->device_pairs(plan.slot);
  copy.num_pairs = plan.num_copies;
  if (absl::Status s = kernels_.BlockCopy(copy, stream); !s.ok()) {
    return internal::Annotate(s,
                              absl::StrCat("copy-on-write of layer ", layer));
  }
  ++counters_.kernel_launches;
  plan.copied[layer] = 1;
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Append(uint64_t plan_id, int layer,
                                          const TensorView& key,
                                          const TensorView& value,
                                          void* stream) {
  absl::StatusOr<PlanState*> found = FindPlan(plan_id);
  if (!found.ok()) return found.status();
  PlanState& plan = **found;
  if (absl::Status s = CheckLayer(layer); !s.ok()) return s;
  internal::ExpectedKV expected;
  expected.num_heads = layout_.num_heads;
  expected.head_size = layout_.head_size;
  expected.dtype = config_.input_dtype;
  expected.memory = memory_kind();
  expected.device = device_->ordinal();
  QuantizeWriteParams params;
  int64_t num_tokens = 0;
  if (absl::Status s =
          internal::CheckKVPair(key, value, expected, layout_.head_size_v,
                                &params.input, &num_tokens);
      !s.ok()) {
    return s;
  }
  const int64_t done = plan.appended[layer];
  if (done + num_tokens > plan.num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                     " of plan ", plan_id, " exceeds its reservation: ", done,
                     " of ", plan.num_tokens, " tokens already appended"));
  }
  internal::StepBuffers::Slot& slot = steps_->slot(plan.slot);
  if (absl::Status s = device_->StreamWaitEvent(stream, slot.uploaded);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CopyOnWrite(plan, layer, stream); !s.ok()) return s;
  const LayerCache& cache = storage_->layer(layer);
  params.num_tokens = num_tokens;
  params.slot_mapping = steps_->device_slots(plan.slot) + done;
  params.cache = cache;
  if (absl::Status s = kernels_.QuantizeWrite(params, stream); !s.ok()) {
    return internal::Annotate(s, absl::StrCat("append to layer ", layer));
  }
  ++counters_.kernel_launches;
  if (absl::Status s = device_->RecordEvent(slot.last_use, stream); !s.ok()) {
    return s;
  }
  plan.appended[layer] += num_tokens;
  counters_.tokens_appended += num_tokens;
  return absl::OkStatus();
}

}  // namespace kvcache
