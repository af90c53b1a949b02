#include "api/manager_impl.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/logging.h"
#include "api/tensor_checks.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"
#include "kernels/kernel_validation.h"
#include "spdlog/spdlog.h"

namespace kvcache {
namespace internal {

absl::Status Kernels::QuantizeWrite(const QuantizeWriteParams& p,
                                    void* stream) const {
  return cuda_ ? QuantizeWriteCuda(p, stream) : QuantizeWriteCpu(p);
}
absl::Status Kernels::Gather(const GatherParams& p, void* stream) const {
  return cuda_ ? GatherCuda(p, stream) : GatherCpu(p);
}
absl::Status Kernels::BlockCopy(const BlockCopyParams& p, void* stream) const {
  return cuda_ ? BlockCopyCuda(p, stream) : BlockCopyCpu(p);
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

}  // namespace

absl::StatusOr<int64_t> KVCacheManager::Impl::NumBlocks(
    int64_t block_bytes) const {
  if (config_.num_blocks != 0) return config_.num_blocks;
  int64_t budget = config_.memory_budget_bytes;
  if (budget == 0) {
    size_t free_bytes = 0, total_bytes = 0;
    if (absl::Status s = device_->MemoryInfo(&free_bytes, &total_bytes);
        !s.ok()) {
      return s;
    }
    const double bytes =
        static_cast<double>(free_bytes) * config_.memory_fraction;
    budget = bytes >= static_cast<double>(kMaxCacheBytes)
                 ? kMaxCacheBytes
                 : static_cast<int64_t>(bytes);
  }
  budget = std::min(budget, kMaxCacheBytes);
  const int64_t num_blocks =
      (budget - kLayerPadding * config_.num_layers) / block_bytes;
  if (num_blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a capacity of ", budget, " bytes holds no block: one block of all ",
        config_.num_layers, " layers takes ", block_bytes, " bytes"));
  }
  return std::min<int64_t>(num_blocks, INT32_MAX);
}

absl::Status KVCacheManager::Impl::Init() {
  absl::StatusOr<std::shared_ptr<spdlog::logger>> logger =
      internal::MakeLogger(config_);
  if (!logger.ok()) return logger.status();
  layout_.block_size = config_.block_size;
  layout_.num_heads = config_.num_kv_heads;
  layout_.head_size = config_.head_size;
  layout_.head_size_v =
      config_.head_size_v != 0 ? config_.head_size_v : config_.head_size;
  layout_.cache_dtype = config_.cache_dtype;

  // Capacity, in checked arithmetic (ValidateConfig bounds every factor).
  absl::StatusOr<int64_t> block_bytes = BlockBytesAllLayers(config_);
  if (!block_bytes.ok()) return block_bytes.status();
  absl::StatusOr<int64_t> num_blocks = NumBlocks(*block_bytes);
  if (!num_blocks.ok()) return num_blocks.status();
  layout_.num_blocks = *num_blocks;
  if (absl::Status s = internal::ValidateLayout(layout_); !s.ok()) return s;
  table_cols_ = config_.max_blocks_per_sequence;
  if (table_cols_ == 0) {
    table_cols_ = std::min<int64_t>(
        *num_blocks, (kDefaultMaxTokensPerSequence + config_.block_size - 1) /
                         config_.block_size);
  }

  absl::StatusOr<std::unique_ptr<CacheStorage>> storage =
      CacheStorage::Create(device_.get(), layout_, config_.num_layers);
  if (!storage.ok()) return storage.status();
  storage_ = *std::move(storage);

  BlockManagerOptions options;
  options.num_blocks = static_cast<int32_t>(*num_blocks);
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

  (*logger)->info(
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
    if (request.num_tokens > config_.max_tokens_per_step) {
      return absl::InvalidArgumentError(absl::StrCat(
          "reserve of ", request.num_tokens, " tokens for sequence ",
          request.sequence, " exceeds max_tokens_per_step ",
          config_.max_tokens_per_step));
    }
    // Each term is at most max_tokens_per_step and a batch at most
    // max_sequences_per_step long: the sum cannot overflow. Counts below 1 are
    // the allocator's to refuse, by name.
    tokens += std::max<int64_t>(request.num_tokens, 0);
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

absl::Status KVCacheManager::Impl::ValidatePlans() const {
  std::vector<char> slot_taken(config_.max_inflight_plans, 0);
  for (const auto& [id, plan] : plans_) {
    const std::string name = absl::StrCat("plan ", id, ": ");
    if (plan.slot < 0 || plan.slot >= config_.max_inflight_plans ||
        slot_taken[plan.slot] || !steps_->slot(plan.slot).busy) {
      return absl::InternalError(absl::StrCat(name, "step slot ", plan.slot,
                                              " is not its own busy slot"));
    }
    slot_taken[plan.slot] = 1;
    if (plan.num_tokens < 1 || plan.num_tokens > config_.max_tokens_per_step ||
        plan.num_copies < 0 ||
        plan.num_copies > static_cast<int64_t>(plan.sequences.size()) ||
        static_cast<int>(plan.appended.size()) != config_.num_layers) {
      return absl::InternalError(
          absl::StrCat(name, plan.num_tokens, " tokens, ", plan.num_copies,
                       " copies for ", plan.sequences.size(), " sequences, ",
                       plan.appended.size(), " layers"));
    }
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      if (plan.appended[layer] < 0 || plan.appended[layer] > plan.num_tokens) {
        return absl::InternalError(
            absl::StrCat(name, "layer ", layer, " holds ", plan.appended[layer],
                         " of its ", plan.num_tokens, " tokens"));
      }
    }
    for (SequenceId seq : plan.sequences) {
      // A sequence freed since Reserve is gone; any other is still pending.
      if (blocks_->Contains(seq) && blocks_->PendingPlan(seq) != id) {
        return absl::InternalError(absl::StrCat(name, "sequence ", seq,
                                                " is pending in plan ",
                                                blocks_->PendingPlan(seq)));
      }
    }
  }
  if (steps_->num_busy() != static_cast<int>(plans_.size())) {
    return absl::InternalError(absl::StrCat(
        steps_->num_busy(), " busy step slots for ", plans_.size(), " plans"));
  }
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::CopyOnWrite(int slot, int64_t num_copies,
                                               void* stream) {
  if (num_copies == 0) return absl::OkStatus();
  internal::StepBuffers::Slot& buffers = steps_->slot(slot);
  BlockCopyParams copy;
  copy.pairs = steps_->device_pairs(slot);
  copy.num_pairs = num_copies;
  // Every layer's arguments first: a copy that cannot run is refused before
  // any runs.
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    copy.cache = storage_->layer(layer);
    if (absl::Status s = internal::ValidateBlockCopy(copy); !s.ok()) {
      return internal::Annotate(s,
                                absl::StrCat("copy-on-write of layer ", layer));
    }
  }
  if (absl::Status s = device_->StreamWaitEvent(stream, buffers.uploaded);
      !s.ok()) {
    return s;
  }
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    copy.cache = storage_->layer(layer);
    if (absl::Status s = kernels_.BlockCopy(copy, stream); !s.ok()) {
      return internal::Annotate(s,
                                absl::StrCat("copy-on-write of layer ", layer));
    }
  }
  // The next upload into this slot must wait for the copies' reads.
  return device_->RecordEvent(buffers.last_use, stream);
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
  // Against what is left, never done + num_tokens: a hostile count must not
  // overflow past the check (issue #12 item 4).
  const int64_t done = plan.appended[layer];
  if (num_tokens > plan.num_tokens - done) {
    return absl::InvalidArgumentError(
        absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                     " of plan ", plan_id, " exceeds its reservation: ", done,
                     " of ", plan.num_tokens, " tokens already appended"));
  }
  params.num_tokens = num_tokens;
  params.slot_mapping = steps_->device_slots(plan.slot) + done;
  params.cache = storage_->layer(layer);
  // Everything the kernel would refuse is refused before anything runs.
  if (absl::Status s = internal::ValidateQuantizeWrite(params); !s.ok()) {
    return internal::Annotate(s, absl::StrCat("append to layer ", layer));
  }
  internal::StepBuffers::Slot& slot = steps_->slot(plan.slot);
  if (absl::Status s = device_->StreamWaitEvent(stream, slot.uploaded);
      !s.ok()) {
    return s;
  }
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
