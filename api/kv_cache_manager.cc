#include "api/kv_cache_manager.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/step_buffers.h"
#include "api/tensor_checks.h"
#include "dlpack/dlpack.h"
#include "kernels/cpu_kernels.h"
#include "kernels/cuda_kernels.h"
#include "kvcache/cache_storage.h"
#include "kvcache/device.h"
#include "spdlog/spdlog.h"

namespace kvcache {
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

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

// Chooses the CPU or CUDA implementation of each kernel.
class Kernels {
 public:
  explicit Kernels(DeviceKind kind) : cuda_(kind == DeviceKind::kCuda) {}
  absl::Status QuantizeWrite(const QuantizeWriteParams& p, void* stream) const {
    return cuda_ ? QuantizeWriteCuda(p, stream) : QuantizeWriteCpu(p);
  }
  absl::Status Gather(const GatherParams& p, void* stream) const {
    return cuda_ ? GatherCuda(p, stream) : GatherCpu(p);
  }
  absl::Status BlockCopy(const BlockCopyParams& p, void* stream) const {
    return cuda_ ? BlockCopyCuda(p, stream) : BlockCopyCpu(p);
  }

 private:
  bool cuda_;
};

}  // namespace

class KVCacheManager::Impl {
 public:
  struct PlanState {
    int slot = 0;
    int64_t num_tokens = 0;
    std::vector<SequenceId> sequences;
    std::vector<int64_t> appended;  // Per layer.
    int64_t num_copies = 0;
  };

  Impl(const KVCacheConfig& config, std::unique_ptr<Device> device)
      : config_(config), device_(std::move(device)), kernels_(device_->kind()) {}

  absl::Status Init();

  KVCacheConfig config_;
  std::unique_ptr<Device> device_;
  Kernels kernels_;
  CacheLayout layout_;
  int64_t table_cols_ = 0;
  std::unique_ptr<CacheStorage> storage_;

  mutable std::mutex mu_;
  std::unique_ptr<BlockManager> blocks_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<internal::StepBuffers> steps_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, PlanState> plans_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<SequenceId, uint64_t> sequence_plan_ ABSL_GUARDED_BY(mu_);
  // Batch block table: int32 [max_sequences, table_cols_] then int32 seq_lens [max_sequences].
  Buffer table_staging_ ABSL_GUARDED_BY(mu_);
  Buffer table_device_ ABSL_GUARDED_BY(mu_);
  Event table_uploaded_ ABSL_GUARDED_BY(mu_);
  // One sequence's block table for Gather.
  Buffer gather_staging_ ABSL_GUARDED_BY(mu_);
  Buffer gather_device_ ABSL_GUARDED_BY(mu_);
  MetricsSnapshot counters_ ABSL_GUARDED_BY(mu_);

  MemoryKind memory_kind() const {
    return device_->kind() == DeviceKind::kCuda ? MemoryKind::kCuda
                                                : MemoryKind::kHost;
  }
  absl::Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= config_.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " out of range [0, ",
                       config_.num_layers, ")"));
    }
    return absl::OkStatus();
  }
  absl::Status CheckBatch(absl::Span<const ReserveRequest> batch) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<PlanState*> FindPlan(uint64_t plan_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleasePlan(uint64_t plan_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Append(uint64_t plan_id, int layer, const TensorView& key,
                      const TensorView& value, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
};

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

  const size_t table_bytes = static_cast<size_t>(config_.max_sequences_per_step) *
                             (table_cols_ + 1) * sizeof(int32_t);
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
          DTypeName(layout_.cache_dtype), DTypeName(config_.input_dtype),
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
    return absl::InvalidArgumentError(
        absl::StrCat("batch of ", batch.size(),
                     " sequences exceeds max_sequences_per_step ",
                     config_.max_sequences_per_step));
  }
  int64_t tokens = 0;
  for (const ReserveRequest& request : batch) {
    if (auto it = sequence_plan_.find(request.sequence);
        it != sequence_plan_.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", request.sequence, " already has a reservation in plan ",
          it->second, ": commit or abort it first"));
    }
    tokens += std::max<int64_t>(request.num_tokens, 0);
  }
  if (tokens > config_.max_tokens_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch of ", tokens, " tokens exceeds max_tokens_per_step ",
                     config_.max_tokens_per_step));
  }
  return absl::OkStatus();
}

absl::StatusOr<KVCacheManager::Impl::PlanState*>
KVCacheManager::Impl::FindPlan(uint64_t plan_id) {
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
  for (SequenceId id : it->second.sequences) sequence_plan_.erase(id);
  steps_->slot(it->second.slot).busy = false;
  plans_.erase(it);
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
  if (absl::Status s = internal::CheckKVPair(key, value, expected,
                                             layout_.head_size_v, &params.input,
                                             &num_tokens);
      !s.ok()) {
    return s;
  }
  const int64_t done = plan.appended[layer];
  if (done + num_tokens > plan.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "append of ", num_tokens, " tokens to layer ", layer, " of plan ",
        plan_id, " exceeds its reservation: ", done, " of ", plan.num_tokens,
        " tokens already appended"));
  }
  internal::StepBuffers::Slot& slot = steps_->slot(plan.slot);
  if (absl::Status s = device_->StreamWaitEvent(stream, slot.uploaded);
      !s.ok()) {
    return s;
  }
  const LayerCache& cache = storage_->layer(layer);
  if (done == 0 && plan.num_copies > 0) {
    BlockCopyParams copy;
    copy.cache = cache;
    copy.pairs = steps_->device_pairs(plan.slot);
    copy.num_pairs = plan.num_copies;
    if (absl::Status s = kernels_.BlockCopy(copy, stream); !s.ok()) {
      return Annotate(s, absl::StrCat("copy-on-write of layer ", layer));
    }
    ++counters_.kernel_launches;
  }
  params.num_tokens = num_tokens;
  params.slot_mapping = steps_->device_slots(plan.slot) + done;
  params.cache = cache;
  if (absl::Status s = kernels_.QuantizeWrite(params, stream); !s.ok()) {
    return Annotate(s, absl::StrCat("append to layer ", layer));
  }
  ++counters_.kernel_launches;
  if (absl::Status s = device_->RecordEvent(slot.last_use, stream); !s.ok()) {
    return s;
  }
  plan.appended[layer] += num_tokens;
  counters_.tokens_appended += num_tokens;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------

KVCacheManager::KVCacheManager(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
KVCacheManager::~KVCacheManager() = default;

absl::StatusOr<std::unique_ptr<KVCacheManager>> KVCacheManager::Create(
    const KVCacheConfig& config) {
  if (absl::Status s = ValidateConfig(config); !s.ok()) return s;
  std::unique_ptr<Device> device;
  if (config.backend == Backend::kCuda) {
    absl::StatusOr<std::unique_ptr<Device>> cuda =
        CreateCudaDevice(config.device);
    if (!cuda.ok()) return cuda.status();
    device = *std::move(cuda);
  } else {
    device = CreateCpuDevice();
  }
  auto impl = std::make_unique<Impl>(config, std::move(device));
  if (absl::Status s = impl->Init(); !s.ok()) return s;
  return std::unique_ptr<KVCacheManager>(new KVCacheManager(std::move(impl)));
}

absl::StatusOr<int64_t> KVCacheManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->AddSequence(id, prompt, extra);
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Reserve(
    absl::Span<const ReserveRequest> batch, void* stream) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  if (absl::Status s = m.CheckBatch(batch); !s.ok()) return s;
  const int slot = m.steps_->FindFree();
  if (slot < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        m.config_.max_inflight_plans,
        " plans are in flight (max_inflight_plans): commit or abort one first"));
  }
  absl::StatusOr<StepPlan> plan = m.blocks_->Reserve(batch);
  if (!plan.ok()) {
    if (absl::IsResourceExhausted(plan.status())) ++m.counters_.reserve_failures;
    return plan.status();
  }
  if (absl::Status s =
          m.steps_->Upload(slot, plan->slot_mapping, plan->copies, stream);
      !s.ok()) {
    m.blocks_->Abort(plan->id).IgnoreError();
    return s;
  }
  Impl::PlanState state;
  state.slot = slot;
  state.num_tokens = static_cast<int64_t>(plan->slot_mapping.size());
  state.sequences = plan->sequences;
  state.appended.assign(m.config_.num_layers, 0);
  state.num_copies = static_cast<int64_t>(plan->copies.size());
  m.steps_->slot(slot).busy = true;
  for (SequenceId id : plan->sequences) m.sequence_plan_[id] = plan->id;
  m.counters_.block_copies += state.num_copies;
  StepPlanInfo info;
  info.id = plan->id;
  info.num_tokens = state.num_tokens;
  info.slot_mapping = m.steps_->device_slots(slot);
  info.host_slot_mapping = std::move(plan->slot_mapping);
  info.num_block_copies = state.num_copies;
  m.plans_.emplace(plan->id, std::move(state));
  return info;
}

absl::Status KVCacheManager::Append(uint64_t plan_id, int layer,
                                    const TensorView& key,
                                    const TensorView& value, void* stream) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->Append(plan_id, layer, key, value, stream);
}

absl::Status KVCacheManager::Append(uint64_t plan_id, int layer,
                                    const DLTensor& key, const DLTensor& value,
                                    void* stream) {
  absl::StatusOr<TensorView> k = FromDLPack(key);
  if (!k.ok()) return Annotate(k.status(), "key");
  absl::StatusOr<TensorView> v = FromDLPack(value);
  if (!v.ok()) return Annotate(v.status(), "value");
  return Append(plan_id, layer, *k, *v, stream);
}

absl::Status KVCacheManager::Commit(uint64_t plan_id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  absl::StatusOr<Impl::PlanState*> found = m.FindPlan(plan_id);
  if (!found.ok()) return found.status();
  const Impl::PlanState& plan = **found;
  for (int layer = 0; layer < m.config_.num_layers; ++layer) {
    if (plan.appended[layer] != plan.num_tokens) {
      return absl::FailedPreconditionError(absl::StrCat(
          "commit of plan ", plan_id, ": layer ", layer, " holds ",
          plan.appended[layer], " of its ", plan.num_tokens, " tokens"));
    }
  }
  if (absl::Status s = m.blocks_->Commit(plan_id); !s.ok()) return s;
  m.counters_.tokens_committed += plan.num_tokens;
  m.ReleasePlan(plan_id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Abort(uint64_t plan_id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  if (absl::StatusOr<Impl::PlanState*> found = m.FindPlan(plan_id);
      !found.ok()) {
    return found.status();
  }
  if (absl::Status s = m.blocks_->Abort(plan_id); !s.ok()) return s;
  m.ReleasePlan(plan_id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Fork(SequenceId parent, SequenceId child) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  if (auto it = impl_->sequence_plan_.find(parent);
      it != impl_->sequence_plan_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("fork of sequence ", parent, " while plan ", it->second,
                     " is in flight: commit or abort it first"));
  }
  return impl_->blocks_->Fork(parent, child);
}

absl::Status KVCacheManager::Free(SequenceId id) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  if (auto it = impl_->sequence_plan_.find(id);
      it != impl_->sequence_plan_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("free of sequence ", id, " while plan ", it->second,
                     " is in flight: commit or abort it first"));
  }
  return impl_->blocks_->Free(id);
}

absl::StatusOr<std::vector<BlockId>> KVCacheManager::BlockTable(
    SequenceId id) const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  absl::StatusOr<absl::Span<const BlockId>> table =
      impl_->blocks_->BlockTable(id);
  if (!table.ok()) return table.status();
  return std::vector<BlockId>(table->begin(), table->end());
}

absl::StatusOr<int64_t> KVCacheManager::SequenceLength(SequenceId id) const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->ComputedLength(id);
}

absl::StatusOr<BlockTableView> KVCacheManager::BatchBlockTable(
    absl::Span<const SequenceId> ids, void* stream) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  if (ids.empty() ||
      static_cast<int64_t>(ids.size()) > m.config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table of ", ids.size(),
                     " sequences: expected 1 to max_sequences_per_step ",
                     m.config_.max_sequences_per_step));
  }
  absl::StatusOr<BatchBlockTable> batch = m.blocks_->BatchTable(ids);
  if (!batch.ok()) return batch.status();
  if (batch->max_blocks > m.table_cols_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a sequence of this batch holds ", batch->max_blocks,
        " blocks, more than max_blocks_per_sequence ", m.table_cols_));
  }
  if (absl::Status s = m.device_->SynchronizeEvent(m.table_uploaded_);
      !s.ok()) {
    return s;
  }
  const int64_t rows = static_cast<int64_t>(ids.size());
  const int64_t cols = m.table_cols_;
  int32_t* staged = m.table_staging_.as<int32_t>();
  std::fill(staged, staged + rows * cols, 0);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(batch->table.data() + r * batch->max_blocks,
                batch->num_blocks[r], staged + r * cols);
  }
  int32_t* lens = staged + m.config_.max_sequences_per_step * cols;
  std::copy_n(batch->seq_lens.data(), rows, lens);
  int32_t* device_table = m.table_device_.as<int32_t>();
  int32_t* device_lens = device_table + m.config_.max_sequences_per_step * cols;
  for (absl::Status s :
       {m.device_->CopyToDeviceAsync(device_table, staged,
                                     rows * cols * sizeof(int32_t), stream),
        m.device_->CopyToDeviceAsync(device_lens, lens, rows * sizeof(int32_t),
                                     stream),
        m.device_->RecordEvent(m.table_uploaded_, stream)}) {
    if (!s.ok()) return s;
  }
  BlockTableView view;
  view.block_table = device_table;
  view.seq_lens = device_lens;
  view.num_sequences = static_cast<int32_t>(rows);
  view.max_blocks = batch->max_blocks;
  view.row_stride = static_cast<int32_t>(cols);
  return view;
}

absl::StatusOr<LayerView> KVCacheManager::GetLayerView(int layer) const {
  const Impl& m = *impl_;
  if (absl::Status s = m.CheckLayer(layer); !s.ok()) return s;
  const LayerCache& cache = m.storage_->layer(layer);
  const CacheLayout& l = m.layout_;
  LayerView view;
  view.key_cache = cache.key_cache;
  view.value_cache = cache.value_cache;
  view.key_scale = cache.key_scale;
  view.value_scale = cache.value_scale;
  view.cache_dtype = l.cache_dtype;
  view.memory = m.memory_kind();
  view.device = m.device_->ordinal();
  view.num_blocks = l.num_blocks;
  view.block_size = l.block_size;
  view.num_kv_heads = l.num_heads;
  view.head_size = l.head_size;
  view.head_size_v = l.head_size_v;
  const int64_t k[4] = {l.key_block_elems(), l.key_slot_elems(), l.head_size, 1};
  const int64_t v[4] = {l.value_block_elems(), l.value_slot_elems(),
                        l.head_size_v, 1};
  std::copy_n(k, 4, view.key_strides);
  std::copy_n(v, 4, view.value_strides);
  view.scale_strides[0] = l.scale_block_elems();
  view.scale_strides[1] = l.num_heads;
  view.scale_strides[2] = 1;
  return view;
}

absl::Status KVCacheManager::Gather(SequenceId id, int layer,
                                    int64_t token_begin, int64_t num_tokens,
                                    const TensorView& key_out,
                                    const TensorView& value_out, void* stream) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  if (absl::Status s = m.CheckLayer(layer); !s.ok()) return s;
  absl::StatusOr<int64_t> length = m.blocks_->ComputedLength(id);
  if (!length.ok()) return length.status();
  if (token_begin < 0 || num_tokens < 1 || token_begin > *length ||
      num_tokens > *length - token_begin) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gather of tokens [", token_begin, ", ", token_begin + num_tokens,
        ") of sequence ", id, ": it has ", *length, " computed tokens"));
  }
  internal::ExpectedKV expected;
  expected.num_tokens = num_tokens;
  expected.num_heads = m.layout_.num_heads;
  expected.head_size = m.layout_.head_size;
  expected.any_float_dtype = true;
  expected.memory = m.memory_kind();
  expected.device = m.device_->ordinal();
  GatherParams params;
  int64_t checked_tokens = 0;
  if (absl::Status s =
          internal::CheckKVPair(key_out, value_out, expected,
                                m.layout_.head_size_v, &params.output,
                                &checked_tokens);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<absl::Span<const BlockId>> table = m.blocks_->BlockTable(id);
  if (!table.ok()) return table.status();
  const int64_t first = token_begin / m.layout_.block_size;
  const int64_t last = (token_begin + num_tokens - 1) / m.layout_.block_size;
  const int64_t count = last - first + 1;
  if (count > m.table_cols_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gather of ", num_tokens, " tokens spans ", count,
        " blocks, more than max_blocks_per_sequence ", m.table_cols_));
  }
  int32_t* staged = m.gather_staging_.as<int32_t>();
  std::copy_n(table->data() + first, count, staged);
  if (absl::Status s = m.device_->CopyToDeviceAsync(
          m.gather_device_.data(), staged, count * sizeof(int32_t), stream);
      !s.ok()) {
    return s;
  }
  params.cache = m.storage_->layer(layer);
  params.block_table = m.gather_device_.as<int32_t>();
  params.block_table_len = count;
  params.token_begin = token_begin - first * m.layout_.block_size;
  params.num_tokens = num_tokens;
  if (absl::Status s = m.kernels_.Gather(params, stream); !s.ok()) {
    return Annotate(s, absl::StrCat("gather of layer ", layer));
  }
  ++m.counters_.kernel_launches;
  return m.device_->SynchronizeStream(stream);
}

int64_t KVCacheManager::FreeBlocks() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->Usage().free_blocks;
}

int64_t KVCacheManager::EvictableBlocks() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->Usage().cached_blocks;
}

int64_t KVCacheManager::TotalBlocks() const { return impl_->layout_.num_blocks; }

absl::Status KVCacheManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  if (absl::Status s = impl_->CheckBatch(batch); !s.ok()) return s;
  return impl_->blocks_->CanReserve(batch);
}

absl::StatusOr<int64_t> KVCacheManager::TokensThatFit(SequenceId id) const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->TokensThatFit(id);
}

MetricsSnapshot KVCacheManager::Metrics() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu_);
  MetricsSnapshot s = m.counters_;
  const PoolUsage usage = m.blocks_->Usage();
  const PrefixCacheStats prefix = m.blocks_->PrefixStats();
  s.blocks_total = usage.total_blocks;
  s.blocks_free = usage.free_blocks;
  s.blocks_cached = usage.cached_blocks;
  s.blocks_in_use = usage.used_blocks;
  s.usage = usage.total_blocks > 0 ? static_cast<double>(usage.used_blocks) /
                                         usage.total_blocks
                                   : 0.0;
  s.sequences = m.blocks_->num_sequences();
  s.plans_in_flight = static_cast<int64_t>(m.plans_.size());
  s.prefix_queries = prefix.queries;
  s.prefix_query_tokens = prefix.query_tokens;
  s.prefix_hit_tokens = prefix.hit_tokens;
  s.evictions = prefix.evictions;
  return s;
}

std::string KVCacheManager::MetricsText() const {
  return ToPrometheusText(Metrics());
}

const KVCacheConfig& KVCacheManager::config() const { return impl_->config_; }

absl::Status KVCacheManager::Validate() const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->blocks_->Validate();
}

}  // namespace kvcache
