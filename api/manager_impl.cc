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
    tier->copier().set_copy_blocks(config.tier_copy_thread_blocks);
    options.host_tier_blocks = tier->num_slots();
    options.tier_offload_min_hits = config.tier_offload_min_hits;
    // An offloaded block waits, unused, for its copy: no step waits for it.
    options.tier_hold_offloaded = config.tier_hold_offloads;
    options.tier_offload_ahead_blocks =
        config.tier_offload_ahead_blocks >= 0
            ? config.tier_offload_ahead_blocks
            : std::max<int64_t>(16, num_blocks / 16);
  }
  options.num_blocks = static_cast<int32_t>(num_blocks);
  options.block_size = config.block_size;
  options.enable_prefix_caching = config.enable_prefix_caching;
  // The block table's width: Reserve refuses a sequence past it (issue #15:
  // BatchBlockTable found it only after the K/V was written).
  options.max_blocks_per_sequence = static_cast<int32_t>(cols);

  // What every Append's K/V must be, fixed for the manager's life.
  internal::ExpectedKV& expected = m->expected_kv_;
  expected.num_heads = m->backend_->layout().num_heads;
  expected.head_size = m->backend_->layout().head_size;
  expected.dtype = config.input_dtype;
  expected.memory = m->backend_->memory_kind();
  expected.device = m->backend_->ordinal();

  std::lock_guard<std::mutex> lock(m->mu_);
  KVCACHE_ASSIGN_OR_RETURN(m->events_, CreateEvents(config));
  options.observer = m->events_.get();
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
  if (config.graph_max_tokens > 0) {
    KVCACHE_ASSIGN_OR_RETURN(
        m->graph_,
        internal::GraphStepBuffers::Create(
            dev, config.graph_max_tokens,
            std::min(config.graph_max_tokens, config.max_sequences_per_step),
            cols));
    m->graph_tables_.reserve(m->graph_->max_sequences());
  }
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
  // A sequence in flight, found through the allocator's batch lookups (no
  // search when the batch names the last one's sequences in order).
  size_t pending = 0;
  if (const uint64_t plan = blocks_->FirstPendingPlan(batch, &pending);
      plan != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "reserve of sequence ", batch[pending].sequence, " while plan ", plan,
        " is in flight: commit or abort it first"));
  }
  int64_t tokens = 0;
  for (const ReserveRequest& request : batch) {
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
    // Offloads are best effort: their failure drops the blocks, not the
    // call. A failed onboard has freed the sequence: the call fails.
    const bool onboarding = split.host_tokens > 0;
    absl::Status copied = RunTierCopies(last_stream_, id, onboarding);
    if (!copied.ok() && onboarding) return copied;
    // A device hit may be on blocks another sequence's onboard still fills.
    if (split.device_tokens > 0 && !OnboardDone(tier_onboard_last_)) {
      const absl::Span<const BlockId> table = *blocks_->BlockTable(id);
      const size_t hit_blocks =
          static_cast<size_t>(computed / config_.block_size);
      int64_t wait = 0;
      for (size_t i = 0; i < hit_blocks && i < table.size(); ++i) {
        wait = std::max(wait, tier_->onboard_batch(table[i]));
      }
      NotePendingOnboard(id, wait);
    }
  }
  if (hits != nullptr)
    *hits = PrefixHits{split.device_tokens, split.host_tokens};
  return computed;
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Impl::Reserve(
    absl::Span<const ReserveRequest> batch, void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  return ReservePlan(batch, 0, stream);
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Impl::ReserveGraphStep(
    absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
    void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  KVCACHE_RETURN_IF_ERROR(
      internal::CheckGraphStep(graph_.get(), graph_plan_, batch, graph_tokens));
  return ReservePlan(batch, graph_tokens, stream);
}

absl::StatusOr<StepPlanInfo> KVCacheManager::Impl::ReservePlan(
    absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
    void* stream) {
  // The plan's record is made before the allocator changes, so that running
  // out of memory (std::bad_alloc) cannot leave a half-made plan behind.
  KVCACHE_ASSIGN_OR_RETURN(internal::PlanTable::Pending pending,
                           plans_->Begin(batch.size()));
  StepPlanInfo info;
  info.sequences.reserve(batch.size());
  int64_t tier_onboard = 0;  // The onboard batch the plan's Appends wait for.
  AllowOffloadIfQueueIsFree();
  absl::StatusOr<StepPlan> plan = blocks_->Reserve(batch);
  if (absl::IsResourceExhausted(plan.status()) &&
      ReclaimHeldOffloads(plan.status())) {
    plan = blocks_->Reserve(batch);
  }
  if (!plan.ok()) {
    if (absl::IsResourceExhausted(plan.status())) ++counters_.reserve_failures;
    return plan.status();
  }
  if (tier_ != nullptr) {
    // The evicted blocks' offloads need no wait: the allocator holds each
    // offloaded block until its copy is done. Onboards (an AddSequence's)
    // are waited for, on CUDA here and by Append. A graph step's Appends wait on nothing (they may run inside a
    // stream capture, which may not wait on an event recorded outside it),
    // so its ordering after every tier copy so far happens here, on the
    // stream the step runs on, before the replay.
    last_stream_ = stream;
    RunTierCopies(stream, 0, /*onboarding=*/false).IgnoreError();
    // Copies ahead for the next steps' evictions (after this step's own
    // offloads, on the same lane).
    OffloadAhead(stream);
    tier_onboard = OnboardWaitFor(batch);
    if (backend_->memory_kind() == MemoryKind::kCuda || graph_tokens > 0 ||
        !plan->copies.empty()) {
      if (absl::Status s = OrderAfterTierCopies(stream, tier_onboard);
          !s.ok()) {
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
    // A graph step's Appends read the graph step's slot mapping, not the
    // plan's own (a graph step without copies leaves its step slot alone).
    if (graph_tokens == 0 || num_copies > 0) {
      uploaded = plans_->Upload(
          pending,
          graph_tokens > 0 ? absl::Span<const int64_t>() : plan->slot_mapping,
          plan->copies, stream);
    }
    if (uploaded.ok() && num_copies > 0) {
      uploaded = backend_->CopyBlocks(plans_->device_pairs(pending.slot),
                                      num_copies, stream);
      // The next upload into this slot must wait for the copies' reads.
      if (uploaded.ok()) {
        uploaded = backend_->device().RecordEvent(
            plans_->buffers().slot(pending.slot).last_use, stream);
      }
    }
    if (uploaded.ok() && graph_tokens > 0) {
      uploaded = WriteGraphStep(*plan, stream);
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
  info.graph_tokens = graph_tokens;
  info.slot_mapping = graph_tokens > 0
                          ? graph_->inputs().slot_mapping
                          : plans_->buffers().device_slots(pending.slot);
  info.num_block_copies = num_copies;
  plans_->Add(std::move(pending), info.id, *plan);
  internal::PlanTable::Plan& added_plan = **plans_->Find(info.id);
  added_plan.tier_onboard = tier_onboard;
  if (graph_tokens > 0) {
    added_plan.graph_tokens = graph_tokens;
    graph_plan_ = info.id;
  }
  info.host_slot_mapping = std::move(plan->slot_mapping);
  info.sequences.assign(added_plan.sequences.begin(),
                        added_plan.sequences.end());
  counters_.block_copies += num_copies;
  if (num_copies > 0) counters_.kernel_launches += config_.num_layers;
  return info;
}

absl::Status KVCacheManager::Impl::WriteGraphStep(const StepPlan& plan,
                                                  void* stream) {
  // The batch's tables (which include the blocks just reserved), in a vector
  // sized at Create, found through the allocator's lookups of the batch it
  // just reserved: no allocation, no search per step.
  graph_tables_.resize(plan.sequences.size());
  KVCACHE_RETURN_IF_ERROR(blocks_->BatchTablesWithVersion(
      plan.sequences, absl::MakeSpan(graph_tables_)));
  for (size_t i = 0; i < graph_tables_.size(); ++i) {
    // Reserve keeps every sequence within max_blocks_per_sequence columns.
    if (static_cast<int64_t>(graph_tables_[i].blocks.size()) >
        lookups_->cols()) {
      return absl::InternalError(
          absl::StrCat("sequence ", plan.sequences[i], " holds ",
                       graph_tables_[i].blocks.size(), " blocks, more than ",
                       lookups_->cols(), " columns"));
    }
  }
  return graph_->Write(plan.slot_mapping, plan.num_tokens, plan.first_positions,
                       graph_tables_, stream);
}

absl::StatusOr<GraphStepInputs> KVCacheManager::Impl::GraphStep() const {
  if (graph_ == nullptr) {
    return absl::FailedPreconditionError(
        "no graph step: the manager was created with graph_max_tokens 0");
  }
  return graph_->inputs();
}

absl::Status KVCacheManager::Impl::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  absl::Status fits = blocks_->CanReserve(batch);
  if (absl::IsResourceExhausted(fits) && ReclaimHeldOffloads(fits)) {
    fits = blocks_->CanReserve(batch);
  }
  return fits;
}

absl::Status KVCacheManager::Impl::Append(uint64_t plan_id, int layer,
                                          const TensorView& key,
                                          const TensorView& value,
                                          void* stream) {
  KVCACHE_ASSIGN_OR_RETURN(internal::PlanTable::Plan * plan,
                           plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  const CacheLayout& layout = backend_->layout();
  QuantizeWriteParams params;
  int64_t num_tokens = 0;
  KVCACHE_RETURN_IF_ERROR(internal::CheckKVPair(key, value, expected_kv_,
                                                layout.head_size_v,
                                                &params.input, &num_tokens));
  const int64_t done = plan->appended[layer];
  if (plan->graph_tokens > 0) {
    // A graph step: every Append writes the whole padded batch from the
    // graph step's slot mapping, so running it again (warm-up, then capture)
    // rewrites the same slots.
    if (num_tokens != plan->graph_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                       " of graph step plan ", plan_id,
                       ": expected its padded count ", plan->graph_tokens));
    }
    params.slot_mapping = graph_->inputs().slot_mapping;
  } else {
    // Against what is left, never done + num_tokens: a hostile count must
    // not overflow past the check.
    if (num_tokens > plan->num_tokens - done) {
      return absl::InvalidArgumentError(
          absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                       " of plan ", plan_id, " exceeds its reservation: ", done,
                       " of ", plan->num_tokens, " tokens already appended"));
    }
    params.slot_mapping = plans_->device_slots(*plan) + done;
  }
  params.num_tokens = num_tokens;
  params.cache = backend_->layer(layer);
  // Everything the kernel would refuse is refused before anything runs.
  if (absl::Status s = internal::ValidateQuantizeWrite(params); !s.ok()) {
    return Annotate(s, absl::StrCat("append to layer ", layer));
  }
  if (plan->graph_tokens > 0) {
    // No events: a stream being captured may not wait on or record one made
    // outside the capture. The graph step's inputs were uploaded on the
    // stream the step runs on (ReserveGraphStep's), which also waited there
    // for every host tier copy so far, so the order holds.
    if (absl::Status s = backend_->QuantizeWrite(params, stream); !s.ok()) {
      return Annotate(s, absl::StrCat("append to layer ", layer));
    }
    plan->appended[layer] = num_tokens;
  } else if (internal::StepBuffers& buffers = plans_->buffers();
             buffers.SameStreamAsWrite(plan->slot, stream)) {
    // On the stream that uploaded the slot mapping (Reserve's): stream order
    // alone, no event (api/step_buffers.h). Tier copies enqueued since (an
    // AddSequence's onboards) are still waited for; a no-op when none were.
    KVCACHE_RETURN_IF_ERROR(OrderAfterTierCopies(stream, plan->tier_onboard));
    if (absl::Status s = backend_->QuantizeWrite(params, stream); !s.ok()) {
      return Annotate(s, absl::StrCat("append to layer ", layer));
    }
    buffers.NoteReader(plan->slot, stream);
    plan->appended[layer] += num_tokens;
  } else {
    const internal::StepBuffers::Slot& slot = buffers.slot(plan->slot);
    Device& device = backend_->device();
    KVCACHE_RETURN_IF_ERROR(device.StreamWaitEvent(stream, slot.uploaded));
    KVCACHE_RETURN_IF_ERROR(OrderAfterTierCopies(stream, plan->tier_onboard));
    if (absl::Status s = backend_->QuantizeWrite(params, stream); !s.ok()) {
      return Annotate(s, absl::StrCat("append to layer ", layer));
    }
    KVCACHE_RETURN_IF_ERROR(device.RecordEvent(slot.last_use, stream));
    plan->appended[layer] += num_tokens;
  }
  ++counters_.kernel_launches;
  counters_.tokens_appended += num_tokens;
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::CheckAppended(
    uint64_t plan_id, const internal::PlanTable::Plan& plan) const {
  int64_t expected = plan.num_tokens;
  if (plan.graph_tokens > 0) {
    expected = plan.graph_tokens;
    // A graph step whose Appends the host never saw ran them in a replayed
    // graph: complete when a graph of that size was captured with every
    // layer (a capture's own step is checked below, like any plan).
    bool any = false;
    for (int64_t n : plan.appended) any = any || n > 0;
    if (!any) {
      if (graph_->IsCaptured(plan.graph_tokens)) return absl::OkStatus();
      return absl::FailedPreconditionError(absl::StrCat(
          "commit of graph step plan ", plan_id, " of ", plan.graph_tokens,
          " padded tokens: no Append ran on the host and no step of that size "
          "was ever committed with every layer appended (capture the graph "
          "with an Append for every layer first)"));
    }
  }
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    if (plan.appended[layer] != expected) {
      return absl::FailedPreconditionError(
          absl::StrCat("commit of plan ", plan_id, ": layer ", layer, " holds ",
                       plan.appended[layer], " of its ", expected, " tokens"));
    }
  }
  return absl::OkStatus();
}

void KVCacheManager::Impl::RemovePlan(uint64_t plan_id) {
  if (plan_id == graph_plan_) graph_plan_ = 0;
  plans_->Remove(plan_id);
}

absl::Status KVCacheManager::Impl::Commit(uint64_t plan_id) {
  KVCACHE_ASSIGN_OR_RETURN(const internal::PlanTable::Plan* plan,
                           plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckAppended(plan_id, *plan));
  KVCACHE_RETURN_IF_ERROR(blocks_->Commit(plan_id));
  for (const PlanSequence& s : plan->sequences)
    counters_.tokens_committed += s.num_tokens;  // 0 once removed.
  if (plan->graph_tokens > 0 && plan->appended[0] > 0) {
    graph_->MarkCaptured(plan->graph_tokens);
  }
  RemovePlan(plan_id);
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
  if (plan->graph_tokens > 0 && plan->appended[0] > 0) {
    graph_->MarkCaptured(plan->graph_tokens);
  }
  RemovePlan(plan_id);
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
      plan->graph_tokens > 0
          ? graph_->Pad(row->slot_offset, row->num_tokens, stream)
          : plans_->Pad(*plan, row->slot_offset, row->num_tokens, stream));
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
  RemovePlan(plan_id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Fork(SequenceId parent, SequenceId child) {
  KVCACHE_RETURN_IF_ERROR(CheckNotPending(parent, "fork"));
  KVCACHE_RETURN_IF_ERROR(blocks_->Fork(parent, child));
  // The child shares the parent's prefix, landed or not.
  NotePendingOnboard(child, OnboardWaitFor(absl::MakeConstSpan(&parent, 1)));
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Free(SequenceId id) {
  KVCACHE_RETURN_IF_ERROR(CheckNotPending(id, "free"));
  KVCACHE_RETURN_IF_ERROR(blocks_->Free(id));
  ForgetOnboard(id);
  return absl::OkStatus();
}

absl::Status KVCacheManager::Impl::Truncate(SequenceId id, int64_t new_length) {
  KVCACHE_RETURN_IF_ERROR(blocks_->Truncate(id, new_length));
  ForgetOnboard(id);
  return absl::OkStatus();
}

}  // namespace kvcache
