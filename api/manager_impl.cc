// The step (Reserve, Append, Commit, Abort) and the sequence life cycle of
// KVCacheManager::Impl; lookups are in manager_lookups.cc.

#include "api/manager_impl.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/logging.h"
#include "api/tensor_checks.h"
#include "core/status_macros.h"
#include "kernels/kernel_validation.h"
#include "spdlog/spdlog.h"

namespace kvcache {

using internal::Annotate;

namespace {

// Default block-table width: enough blocks for this many tokens.
constexpr int64_t kDefaultMaxTokensPerSequence = 131072;

}  // namespace

absl::StatusOr<std::unique_ptr<KVCacheManager::Impl>>
KVCacheManager::Impl::Create(const KVCacheConfig& config,
                             std::unique_ptr<Device> device) {
  KVCACHE_ASSIGN_OR_RETURN(const std::shared_ptr<spdlog::logger> logger,
                           internal::MakeLogger(config));
  std::unique_ptr<Impl> m(new Impl(config));
  Device* const dev = device.get();
  KVCACHE_ASSIGN_OR_RETURN(
      m->backend_, internal::CacheBackend::Create(config, std::move(device)));
  const int64_t num_blocks = m->backend_->layout().num_blocks;
  int64_t cols = config.max_blocks_per_sequence;
  if (cols == 0) {
    cols = std::min<int64_t>(
        num_blocks, (kDefaultMaxTokensPerSequence + config.block_size - 1) /
                        config.block_size);
  }
  BlockManagerOptions options;
  std::unique_ptr<internal::TierMover> tier;
  if (config.host_tier_bytes > 0) {
    KVCACHE_ASSIGN_OR_RETURN(tier, internal::TierMover::Create(
                                       *m->backend_, config.host_tier_bytes));
    options.host_tier_blocks = tier->num_slots();
  }
  options.num_blocks = static_cast<int32_t>(num_blocks);
  options.block_size = config.block_size;
  options.enable_prefix_caching = config.enable_prefix_caching;
  // The block table's width: Reserve refuses a sequence past it (issue #15:
  // BatchBlockTable found it only after the K/V was written).
  options.max_blocks_per_sequence = static_cast<int32_t>(cols);

  std::lock_guard<std::mutex> lock(m->mu_);
  KVCACHE_ASSIGN_OR_RETURN(m->blocks_, BlockManager::Create(options));
  m->tier_ = std::move(tier);
  KVCACHE_ASSIGN_OR_RETURN(
      m->plans_, internal::PlanTable::Create(dev, config.num_layers,
                                             config.max_inflight_plans,
                                             config.max_tokens_per_step,
                                             config.max_sequences_per_step));
  KVCACHE_ASSIGN_OR_RETURN(m->lookups_,
                           internal::LookupBuffers::Create(
                               dev, config.max_sequences_per_step, cols));
  if (config.num_q_heads > 0) {
    KVCACHE_ASSIGN_OR_RETURN(
        m->attention_,
        internal::AttentionBuffers::Create(dev, config.max_sequences_per_step,
                                           cols, config.num_q_heads,
                                           m->backend_->layout().head_size_v));
  }
  logger->info(m->backend_->Describe(config));
  return m;
}

absl::Status KVCacheManager::Impl::CheckLayer(int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", layer, " out of range [0, ", config_.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::CheckNotPending(SequenceId id,
                                                   const char* what) const {
  if (const uint64_t plan = blocks_->PendingPlan(id); plan != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " of sequence ", id, " while plan ", plan,
                     " is in flight: commit or abort it first"));
  }
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
    KVCACHE_RETURN_IF_ERROR(CheckNotPending(request.sequence, "reserve"));
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

absl::StatusOr<int64_t> KVCacheManager::Impl::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra,
    PrefixHits* hits) {
  // Lengths reach the engine as int32 (BatchBlockTable's seq_lens).
  if (prompt.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt.size(), " tokens exceeds ", INT32_MAX, " tokens"));
  }
  PrefixHitSplit split;
  AllowOffloadIfQueueIsFree();
  KVCACHE_ASSIGN_OR_RETURN(const int64_t computed,
                           blocks_->AddSequence(id, prompt, extra, &split));
  if (tier_ != nullptr) {
    KVCACHE_RETURN_IF_ERROR(
        RunTierCopies(last_stream_, id, /*onboarding=*/split.host_tokens > 0));
  }
  if (hits != nullptr)
    *hits = PrefixHits{split.device_tokens, split.host_tokens};
  return computed;
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Impl::Reserve(
    absl::Span<const ReserveRequest> batch, void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  // The plan's record is made before the allocator changes, so that running
  // out of memory (std::bad_alloc) cannot leave a half-made plan behind.
  KVCACHE_ASSIGN_OR_RETURN(internal::PlanTable::Pending pending,
                           plans_->Begin(batch.size()));
  StepPlanInfo info;
  info.sequences.reserve(batch.size());
  AllowOffloadIfQueueIsFree();
  absl::StatusOr<StepPlan> plan = blocks_->Reserve(batch);
  if (!plan.ok()) {
    if (absl::IsResourceExhausted(plan.status())) ++counters_.reserve_failures;
    return plan.status();
  }
  if (tier_ != nullptr) {
    // The evicted blocks' offloads read them before anything writes them:
    // the stream waits for the copies (on the CPU, Append and copy-on-write
    // wait).
    last_stream_ = stream;
    RunTierCopies(stream, 0, /*onboarding=*/false).IgnoreError();
    if (backend_->memory_kind() == MemoryKind::kCuda || !plan->copies.empty()) {
      if (absl::Status s = OrderAfterTierCopies(stream); !s.ok()) {
        blocks_->Abort(plan->id).IgnoreError();
        return s;
      }
    }
  }
  // Copy-on-write runs here, in every layer, so that no block table names a
  // copy before it holds the sequence's data; if it cannot, the plan is
  // undone.
  const int64_t num_copies = static_cast<int64_t>(plan->copies.size());
  absl::Status uploaded;
  try {  // The CPU kernels may allocate (std::bad_alloc).
    uploaded =
        plans_->Upload(pending, plan->slot_mapping, plan->copies, stream);
    if (uploaded.ok() && num_copies > 0) {
      uploaded = backend_->CopyBlocks(plans_->device_pairs(pending.slot),
                                      num_copies, stream);
      // The next upload into this slot must wait for the copies' reads.
      if (uploaded.ok()) {
        uploaded = backend_->device().RecordEvent(
            plans_->buffers().slot(pending.slot).last_use, stream);
      }
    }
  } catch (...) {
    blocks_->Abort(plan->id).IgnoreError();
    throw;
  }
  if (!uploaded.ok()) {
    blocks_->Abort(plan->id).IgnoreError();
    return uploaded;
  }
  // From here on nothing allocates.
  info.id = plan->id;
  info.num_tokens = static_cast<int64_t>(plan->slot_mapping.size());
  info.slot_mapping = plans_->buffers().device_slots(pending.slot);
  info.num_block_copies = num_copies;
  plans_->Add(std::move(pending), info.id, *plan);
  info.host_slot_mapping = std::move(plan->slot_mapping);
  const internal::PlanTable::Plan& added = **plans_->Find(info.id);
  info.sequences.assign(added.sequences.begin(), added.sequences.end());
  counters_.block_copies += num_copies;
  if (num_copies > 0) counters_.kernel_launches += config_.num_layers;
  return info;
}

absl::Status KVCacheManager::Impl::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  return blocks_->CanReserve(batch);
}

absl::Status KVCacheManager::Impl::Append(uint64_t plan_id, int layer,
                                          const TensorView& key,
                                          const TensorView& value,
                                          void* stream) {
  KVCACHE_ASSIGN_OR_RETURN(internal::PlanTable::Plan * plan,
                           plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  const CacheLayout& layout = backend_->layout();
  internal::ExpectedKV expected;
  expected.num_heads = layout.num_heads;
  expected.head_size = layout.head_size;
  expected.dtype = config_.input_dtype;
  expected.memory = backend_->memory_kind();
  expected.device = backend_->ordinal();
  QuantizeWriteParams params;
  int64_t num_tokens = 0;
  KVCACHE_RETURN_IF_ERROR(internal::CheckKVPair(
      key, value, expected, layout.head_size_v, &params.input, &num_tokens));
  // Against what is left, never done + num_tokens: a hostile count must not
  // overflow past the check.
  const int64_t done = plan->appended[layer];
  if (num_tokens > plan->num_tokens - done) {
    return absl::InvalidArgumentError(
        absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                     " of plan ", plan_id, " exceeds its reservation: ", done,
                     " of ", plan->num_tokens, " tokens already appended"));
  }
  params.num_tokens = num_tokens;
  params.slot_mapping = plans_->device_slots(*plan) + done;
  params.cache = backend_->layer(layer);
  const std::string context = absl::StrCat("append to layer ", layer);
  // Everything the kernel would refuse is refused before anything runs.
  KVCACHE_RETURN_IF_ERROR(
      Annotate(internal::ValidateQuantizeWrite(params), context));
  const internal::StepBuffers::Slot& slot = plans_->buffers().slot(plan->slot);
  Device& device = backend_->device();
  KVCACHE_RETURN_IF_ERROR(device.StreamWaitEvent(stream, slot.uploaded));
  KVCACHE_RETURN_IF_ERROR(OrderAfterTierCopies(stream));
  KVCACHE_RETURN_IF_ERROR(
      Annotate(backend_->QuantizeWrite(params, stream), context));
  ++counters_.kernel_launches;
  KVCACHE_RETURN_IF_ERROR(device.RecordEvent(slot.last_use, stream));
  plan->appended[layer] += num_tokens;
  counters_.tokens_appended += num_tokens;
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::CheckAppended(
    uint64_t plan_id, const internal::PlanTable::Plan& plan) const {
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    if (plan.appended[layer] != plan.num_tokens) {
      return absl::FailedPreconditionError(absl::StrCat(
          "commit of plan ", plan_id, ": layer ", layer, " holds ",
          plan.appended[layer], " of its ", plan.num_tokens, " tokens"));
    }
  }
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Commit(uint64_t plan_id) {
  KVCACHE_ASSIGN_OR_RETURN(const internal::PlanTable::Plan* plan,
                           plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckAppended(plan_id, *plan));
  KVCACHE_RETURN_IF_ERROR(blocks_->Commit(plan_id));
  for (const PlanSequence& s : plan->sequences)
    counters_.tokens_committed += s.num_tokens;  // 0 once removed.
  plans_->Remove(plan_id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Commit(uint64_t plan_id,
                                          absl::Span<const int64_t> accepted) {
  KVCACHE_ASSIGN_OR_RETURN(const internal::PlanTable::Plan* plan,
                           plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckAppended(plan_id, *plan));
  KVCACHE_RETURN_IF_ERROR(blocks_->Commit(plan_id, accepted));
  // The allocator checked the sizes and every entry of a sequence in the plan.
  for (size_t i = 0; i < plan->sequences.size(); ++i) {
    const int64_t reserved = plan->sequences[i].num_tokens;
    if (reserved == 0) continue;  // Removed: its entry is ignored.
    counters_.tokens_committed += accepted[i];
    counters_.tokens_rejected += reserved - accepted[i];
  }
  plans_->Remove(plan_id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::RemoveFromPlan(uint64_t plan_id,
                                                  SequenceId sequence,
                                                  void* stream) {
  KVCACHE_ASSIGN_OR_RETURN(internal::PlanTable::Plan * plan,
                           plans_->Find(plan_id));
  PlanSequence* row = nullptr;
  for (PlanSequence& s : plan->sequences) {
    if (s.sequence == sequence && s.num_tokens > 0) row = &s;
  }
  // Not in the plan: the allocator names the cause (and changes nothing).
  if (row == nullptr) return blocks_->RemoveFromPlan(plan_id, sequence);
  // Its rows become padding first: if that fails, nothing changed.
  KVCACHE_RETURN_IF_ERROR(
      plans_->Pad(*plan, row->slot_offset, row->num_tokens, stream));
  KVCACHE_RETURN_IF_ERROR(blocks_->RemoveFromPlan(plan_id, sequence));
  row->num_tokens = 0;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PlanSequence>> KVCacheManager::Impl::PlanLayout(
    uint64_t plan_id) {
  KVCACHE_ASSIGN_OR_RETURN(const internal::PlanTable::Plan* plan,
                           plans_->Find(plan_id));
  return plan->sequences;
}

absl::Status KVCacheManager::Impl::Abort(uint64_t plan_id) {
  KVCACHE_RETURN_IF_ERROR(plans_->Find(plan_id).status());
  KVCACHE_RETURN_IF_ERROR(blocks_->Abort(plan_id));
  plans_->Remove(plan_id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Fork(SequenceId parent, SequenceId child) {
  KVCACHE_RETURN_IF_ERROR(CheckNotPending(parent, "fork"));
  return blocks_->Fork(parent, child);
}

absl::Status KVCacheManager::Impl::Free(SequenceId id) {
  KVCACHE_RETURN_IF_ERROR(CheckNotPending(id, "free"));
  return blocks_->Free(id);
}

}  // namespace kvcache
