#include "api/group_manager.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/event_sink_factory.h"
#include "api/gather_launches.h"
#include "api/logging.h"
#include "api/manager_metrics.h"
#include "core/status_macros.h"
#include "kernels/kernel_validation.h"
#include "spdlog/spdlog.h"

namespace kvcache::internal {
namespace {

using Lock = std::lock_guard<std::mutex>;

// Default block-table width: enough blocks for this many tokens (as the
// uniform manager).
constexpr int64_t kDefaultMaxTokensPerSequence = 131072;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

absl::StatusOr<std::unique_ptr<GroupManager>> GroupManager::Create(
    const KVCacheConfig& config, std::unique_ptr<Device> device) {
  if (config.host_tier_bytes != 0) {
    return absl::UnimplementedError(
        absl::StrCat("host_tier_bytes ", config.host_tier_bytes,
                     ": a host tier is not offered with layer_groups yet"));
  }
  KVCACHE_ASSIGN_OR_RETURN(const std::shared_ptr<spdlog::logger> logger,
                           MakeLogger(config));
  std::unique_ptr<GroupManager> m(new GroupManager(config));
  m->paging_ = ConfigPaging(config);
  Device* const dev = device.get();
  KVCACHE_ASSIGN_OR_RETURN(m->backend_,
                           CacheBackend::Create(config, std::move(device)));
  const int64_t num_blocks = m->backend_->layout().num_blocks;
  m->cols_ = config.max_blocks_per_sequence;
  if (m->cols_ == 0) {
    m->cols_ = std::min<int64_t>(
        num_blocks, CeilDiv(kDefaultMaxTokensPerSequence, config.block_size));
  }
  GroupBlockManagerOptions options;
  options.num_blocks = static_cast<int32_t>(num_blocks);
  options.block_size = config.block_size;
  options.enable_prefix_caching = config.enable_prefix_caching;
  for (const GroupTable& t : m->paging_.tables) {
    options.windows.push_back(t.sliding_window);
  }
  ExpectedKV& expected = m->expected_kv_;
  expected.num_heads = m->backend_->layout().num_heads;
  expected.head_size = m->backend_->layout().head_size;
  expected.dtype = config.input_dtype;
  expected.memory = m->backend_->memory_kind();
  expected.device = m->backend_->ordinal();

  Lock lock(m->mu_);
  KVCACHE_ASSIGN_OR_RETURN(m->events_, CreateEventSink(config));
  options.observer = m->events_.get();
  KVCACHE_ASSIGN_OR_RETURN(m->blocks_, GroupBlockManager::Create(options));
  const int64_t tables = static_cast<int64_t>(m->paging_.tables.size());
  KVCACHE_ASSIGN_OR_RETURN(
      m->plans_,
      PlanTable::Create(dev, config.num_layers, config.max_inflight_plans,
                        tables * config.max_tokens_per_step,
                        tables * config.max_sequences_per_step));
  KVCACHE_ASSIGN_OR_RETURN(
      m->lookups_,
      LookupBuffers::Create(dev, config.max_sequences_per_step, m->cols_));
  if (config.graph_max_tokens > 0) {
    KVCACHE_ASSIGN_OR_RETURN(
        m->graph_,
        GraphStepBuffers::Create(
            dev, config.graph_max_tokens,
            std::min(config.graph_max_tokens, config.max_sequences_per_step),
            m->cols_, tables, /*released=*/true));
    m->graph_tables_.reserve(m->graph_->max_sequences() * tables);
  }
  logger->info(absl::StrCat(m->backend_->Describe(config), ", ",
                            config.layer_groups.size(), " layer groups in ",
                            tables, " block tables, ",
                            m->paging_.layers_per_page, " layers per page"));
  return m;
}

absl::Status GroupManager::CheckLayer(int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", layer, " out of range [0, ", config_.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status GroupManager::CheckTable(int32_t table) const {
  const int32_t n = static_cast<int32_t>(paging_.tables.size());
  if (table < 0 || table >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table ", table, " out of range [0, ", n,
                     ") (LayerTable(layer) names a layer's table)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t> GroupManager::LayerTable(int layer) const {
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  return paging_.layer_table[layer];
}

absl::StatusOr<int64_t> GroupManager::AddSequence(
    SequenceId id, absl::Span<const TokenId> prompt, const ExtraKey& extra,
    PrefixHits* hits) {
  if (prompt.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt.size(), " tokens exceeds ", INT32_MAX, " tokens"));
  }
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(const int64_t computed,
                           blocks_->AddSequence(id, prompt, extra));
  if (hits != nullptr) *hits = PrefixHits{computed, 0};
  return computed;
}

absl::StatusOr<int64_t> GroupManager::PeekPrefix(
    absl::Span<const TokenId> prompt, const ExtraKey& extra) const {
  Lock lock(mu_);
  return blocks_->PeekPrefix(prompt, extra);
}

absl::Status GroupManager::CheckBatch(
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
    if (auto it = pending_.find(request.sequence); it != pending_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("reserve of sequence ", request.sequence, " while plan ",
                       it->second, " is in flight: commit or abort it first"));
    }
    if (request.num_tokens > config_.max_tokens_per_step) {
      return absl::InvalidArgumentError(absl::StrCat(
          "reserve of ", request.num_tokens, " tokens for sequence ",
          request.sequence, " exceeds max_tokens_per_step ",
          config_.max_tokens_per_step));
    }
    tokens += std::max<int64_t>(request.num_tokens, 0);
    // The block-table width: no table may outgrow it (unknown sequences
    // and bad counts are the allocator's to name).
    absl::StatusOr<int64_t> computed =
        blocks_->ComputedLength(request.sequence);
    if (computed.ok() && request.num_tokens > 0 &&
        CeilDiv(*computed + request.num_tokens, config_.block_size) > cols_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "reserve of ", request.num_tokens, " tokens for sequence ",
          request.sequence, " (", *computed, " computed) needs more than ",
          "max_blocks_per_sequence ", cols_, " blocks"));
    }
  }
  if (tokens > config_.max_tokens_per_step) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch of ", tokens, " tokens exceeds max_tokens_per_step ",
        config_.max_tokens_per_step));
  }
  return absl::OkStatus();
}

absl::Status GroupManager::CanReserve(
    absl::Span<const ReserveRequest> batch) const {
  Lock lock(mu_);
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  return blocks_->CanReserve(batch);
}

absl::StatusOr<StepPlanInfo> GroupManager::Reserve(
    absl::Span<const ReserveRequest> batch, void* stream) {
  Lock lock(mu_);
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  return ReservePlan(batch, 0, stream);
}

absl::StatusOr<StepPlanInfo> GroupManager::ReserveGraphStep(
    absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
    void* stream) {
  Lock lock(mu_);
  KVCACHE_RETURN_IF_ERROR(CheckBatch(batch));
  KVCACHE_RETURN_IF_ERROR(
      CheckGraphStep(graph_.get(), graph_plan_, batch, graph_tokens));
  return ReservePlan(batch, graph_tokens, stream);
}

absl::StatusOr<GraphStepInputs> GroupManager::GraphStep(int32_t table) const {
  KVCACHE_RETURN_IF_ERROR(CheckTable(table));
  Lock lock(mu_);
  if (graph_ == nullptr) {
    return absl::FailedPreconditionError(
        "no graph step: the manager was created with graph_max_tokens 0");
  }
  return graph_->inputs(table);
}

absl::Status GroupManager::WriteGraphStep(const GroupStepPlan& plan,
                                          absl::Span<const int64_t> slots,
                                          void* stream) {
  const size_t tables = paging_.tables.size();
  graph_tables_.resize(plan.sequences.size() * tables);
  KVCACHE_RETURN_IF_ERROR(blocks_->TablesWithVersion(
      plan.sequences, absl::MakeSpan(graph_tables_)));
  for (size_t i = 0; i < graph_tables_.size(); ++i) {
    // CheckBatch keeps every table within cols_ columns.
    if (static_cast<int64_t>(graph_tables_[i].blocks.size()) > cols_) {
      return absl::InternalError(
          absl::StrCat("sequence ", plan.sequences[i / tables], " holds ",
                       graph_tables_[i].blocks.size(), " blocks in table ",
                       i % tables, ", more than ", cols_, " columns"));
    }
  }
  return graph_->Write(slots, plan.num_tokens, plan.first_positions,
                       graph_tables_, stream);
}

absl::StatusOr<StepPlanInfo> GroupManager::ReservePlan(
    absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
    void* stream) {
  KVCACHE_ASSIGN_OR_RETURN(PlanTable::Pending pending,
                           plans_->Begin(batch.size()));
  StepPlanInfo info;
  info.sequences.reserve(batch.size());
  pending_.reserve(pending_.size() + batch.size());
  absl::StatusOr<GroupStepPlan> plan = blocks_->Reserve(batch);
  if (!plan.ok()) {
    if (absl::IsResourceExhausted(plan.status())) ++counters_.reserve_failures;
    return plan.status();
  }
  StepPlan step;
  std::vector<int64_t> all;
  absl::Status uploaded;
  try {
    const size_t n = plan->slot_mappings[0].size();
    all.reserve(n * plan->slot_mappings.size());
    for (const std::vector<int64_t>& m : plan->slot_mappings) {
      all.insert(all.end(), m.begin(), m.end());
    }
    step.sequences = plan->sequences;
    step.num_tokens = plan->num_tokens;
    step.first_positions = plan->first_positions;
    step.slot_mapping = plan->slot_mappings[0];
    // A graph step's Appends read the graph step's slot mappings, not the
    // plan's own (a graph step without copies leaves its step slot alone).
    if (graph_tokens == 0 || !plan->copies.empty()) {
      uploaded = plans_->Upload(
          pending, graph_tokens > 0 ? absl::Span<const int64_t>() : all,
          plan->copies, stream);
    }
    // Copy-on-write (shared partial blocks after Fork or Truncate) runs
    // here, on every page slot, before any Append of the step can write.
    if (uploaded.ok() && !plan->copies.empty()) {
      uploaded = backend_->CopyBlocks(plans_->device_pairs(pending.slot),
                                      static_cast<int64_t>(plan->copies.size()),
                                      stream);
      // The next upload into this slot must wait for the copies' reads.
      if (uploaded.ok()) {
        uploaded = backend_->device().RecordEvent(
            plans_->buffers().slot(pending.slot).last_use, stream);
      }
    }
    if (uploaded.ok() && graph_tokens > 0) {
      uploaded = WriteGraphStep(*plan, all, stream);
    }
  } catch (...) {
    blocks_->Abort(plan->id).IgnoreError();
    throw;
  }
  if (!uploaded.ok()) {
    blocks_->Abort(plan->id).IgnoreError();
    return uploaded;
  }
  // From here on nothing allocates (pending_ has the room).
  info.id = plan->id;
  info.num_tokens = static_cast<int64_t>(step.slot_mapping.size());
  info.graph_tokens = graph_tokens;
  info.slot_mapping = graph_tokens > 0
                          ? graph_->inputs(0).slot_mapping
                          : plans_->buffers().device_slots(pending.slot);
  plans_->Add(std::move(pending), info.id, step);
  if (graph_tokens > 0) {
    (*plans_->Find(info.id))->graph_tokens = graph_tokens;
    graph_plan_ = info.id;
  }
  for (SequenceId id : plan->sequences) pending_[id] = info.id;
  info.host_slot_mapping = std::move(step.slot_mapping);
  info.num_block_copies = static_cast<int64_t>(plan->copies.size());
  const PlanTable::Plan& added = **plans_->Find(info.id);
  info.sequences.assign(added.sequences.begin(), added.sequences.end());
  counters_.block_copies += info.num_block_copies;
  if (info.num_block_copies > 0) {
    counters_.kernel_launches += paging_.layers_per_page;
  }
  return info;
}

absl::Status GroupManager::Append(uint64_t plan_id, int layer,
                                  const TensorView& key,
                                  const TensorView& value, void* stream) {
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(PlanTable::Plan * plan, plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  // The layer's own shape (groups may differ in heads, sizes and dtype).
  const CacheLayout& layout = backend_->layer(layer).layout;
  ExpectedKV expected = expected_kv_;
  expected.num_heads = layout.num_heads;
  expected.head_size = layout.head_size;
  QuantizeWriteParams params;
  int64_t num_tokens = 0;
  KVCACHE_RETURN_IF_ERROR(CheckKVPair(key, value, expected, layout.head_size_v,
                                      &params.input, &num_tokens));
  const int64_t done = plan->appended[layer];
  // Layer l writes through the slot mapping of its table.
  const int64_t table = paging_.layer_table[layer];
  if (plan->graph_tokens > 0) {
    // A graph step: the whole padded batch from table(l)'s fixed-address
    // mapping, so running it again (warm-up, then capture) rewrites the
    // same slots.
    if (num_tokens != plan->graph_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                       " of graph step plan ", plan_id,
                       ": expected its padded count ", plan->graph_tokens));
    }
    params.slot_mapping = graph_->inputs(table).slot_mapping;
  } else {
    if (num_tokens > plan->num_tokens - done) {
      return absl::InvalidArgumentError(
          absl::StrCat("append of ", num_tokens, " tokens to layer ", layer,
                       " of plan ", plan_id, " exceeds its reservation: ", done,
                       " of ", plan->num_tokens, " tokens already appended"));
    }
    params.slot_mapping =
        plans_->device_slots(*plan) + table * plan->num_tokens + done;
  }
  params.num_tokens = num_tokens;
  params.cache = backend_->layer(layer);
  if (absl::Status s = ValidateQuantizeWrite(params); !s.ok()) {
    return Annotate(s, absl::StrCat("append to layer ", layer));
  }
  if (plan->graph_tokens > 0) {
    // No events: a stream being captured may not wait on or record one made
    // outside the capture. The inputs were uploaded on the stream the step
    // runs on (ReserveGraphStep's), so stream order suffices.
    if (absl::Status s = backend_->QuantizeWrite(params, stream); !s.ok()) {
      return Annotate(s, absl::StrCat("append to layer ", layer));
    }
    plan->appended[layer] = num_tokens;
    ++counters_.kernel_launches;
    counters_.tokens_appended += num_tokens;
    return absl::OkStatus();
  }
  const StepBuffers::Slot& slot = plans_->buffers().slot(plan->slot);
  Device& device = backend_->device();
  KVCACHE_RETURN_IF_ERROR(device.StreamWaitEvent(stream, slot.uploaded));
  if (absl::Status s = backend_->QuantizeWrite(params, stream); !s.ok()) {
    return Annotate(s, absl::StrCat("append to layer ", layer));
  }
  KVCACHE_RETURN_IF_ERROR(device.RecordEvent(slot.last_use, stream));
  plan->appended[layer] += num_tokens;
  ++counters_.kernel_launches;
  counters_.tokens_appended += num_tokens;
  return absl::OkStatus();
}

void GroupManager::RemovePlan(uint64_t plan_id) {
  if (plan_id == graph_plan_) graph_plan_ = 0;
  absl::StatusOr<PlanTable::Plan*> plan = plans_->Find(plan_id);
  if (!plan.ok()) return;
  for (const PlanSequence& s : (*plan)->sequences) {
    // A sequence removed from the plan may be in another one by now.
    auto it = pending_.find(s.sequence);
    if (it != pending_.end() && it->second == plan_id) pending_.erase(it);
  }
  plans_->Remove(plan_id);
}

absl::Status GroupManager::CheckAppended(uint64_t plan_id,
                                         const PlanTable::Plan& plan) const {
  int64_t expected = plan.num_tokens;
  if (plan.graph_tokens > 0) {
    expected = plan.graph_tokens;
    // No Append seen on the host: a replay of a graph captured complete.
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

absl::Status GroupManager::Commit(uint64_t plan_id) {
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(const PlanTable::Plan* plan, plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckAppended(plan_id, *plan));
  KVCACHE_RETURN_IF_ERROR(blocks_->Commit(plan_id));
  for (const PlanSequence& s : plan->sequences) {
    counters_.tokens_committed += s.num_tokens;  // 0 once removed.
  }
  if (plan->graph_tokens > 0 && plan->appended[0] > 0) {
    graph_->MarkCaptured(plan->graph_tokens);
  }
  RemovePlan(plan_id);
  return absl::OkStatus();
}

absl::Status GroupManager::Commit(uint64_t plan_id,
                                  absl::Span<const int64_t> accepted) {
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(const PlanTable::Plan* plan, plans_->Find(plan_id));
  KVCACHE_RETURN_IF_ERROR(CheckAppended(plan_id, *plan));
  KVCACHE_RETURN_IF_ERROR(blocks_->Commit(plan_id, accepted));
  // The allocator checked the size and every entry of a sequence in the plan.
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

absl::Status GroupManager::RemoveFromPlan(uint64_t plan_id, SequenceId sequence,
                                          void* stream) {
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(PlanTable::Plan * plan, plans_->Find(plan_id));
  PlanSequence* row = nullptr;
  for (PlanSequence& s : plan->sequences) {
    if (s.sequence == sequence && s.num_tokens > 0) row = &s;
  }
  // Not in the plan: the allocator names the cause (and changes nothing).
  if (row == nullptr) return blocks_->RemoveFromPlan(plan_id, sequence);
  // Its rows of every table's mapping become padding first: if that fails,
  // the allocator has not changed.
  if (plan->graph_tokens > 0) {
    KVCACHE_RETURN_IF_ERROR(
        graph_->Pad(row->slot_offset, row->num_tokens, stream));
  } else {
    for (size_t t = 0; t < paging_.tables.size(); ++t) {
      KVCACHE_RETURN_IF_ERROR(plans_->Pad(
          *plan, static_cast<int64_t>(t) * plan->num_tokens + row->slot_offset,
          row->num_tokens, stream));
    }
  }
  KVCACHE_RETURN_IF_ERROR(blocks_->RemoveFromPlan(plan_id, sequence));
  row->num_tokens = 0;
  pending_.erase(sequence);
  return absl::OkStatus();
}

absl::Status GroupManager::Truncate(SequenceId id, int64_t new_length) {
  Lock lock(mu_);
  return blocks_->Truncate(id, new_length);
}

absl::Status GroupManager::Fork(SequenceId parent, SequenceId child) {
  Lock lock(mu_);
  if (auto it = pending_.find(parent); it != pending_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("fork of sequence ", parent, " while plan ", it->second,
                     " is in flight: commit or abort it first"));
  }
  return blocks_->Fork(parent, child);
}

absl::Status GroupManager::Abort(uint64_t plan_id) {
  Lock lock(mu_);
  KVCACHE_RETURN_IF_ERROR(plans_->Find(plan_id).status());
  KVCACHE_RETURN_IF_ERROR(blocks_->Abort(plan_id));
  RemovePlan(plan_id);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PlanSequence>> GroupManager::PlanLayout(
    uint64_t plan_id) const {
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(const PlanTable::Plan* plan, plans_->Find(plan_id));
  return plan->sequences;
}

absl::Status GroupManager::Free(SequenceId id) {
  Lock lock(mu_);
  if (auto it = pending_.find(id); it != pending_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("free of sequence ", id, " while plan ", it->second,
                     " is in flight: commit or abort it first"));
  }
  return blocks_->Free(id);
}

absl::StatusOr<std::vector<BlockId>> GroupManager::BlockTable(
    SequenceId id, int32_t table) const {
  KVCACHE_RETURN_IF_ERROR(CheckTable(table));
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(const absl::Span<const BlockId> t,
                           blocks_->BlockTable(id, table));
  return std::vector<BlockId>(t.begin(), t.end());
}

absl::StatusOr<int64_t> GroupManager::SequenceLength(SequenceId id) const {
  Lock lock(mu_);
  return blocks_->ComputedLength(id);
}

absl::StatusOr<int64_t> GroupManager::KnownLength(SequenceId id) const {
  Lock lock(mu_);
  return blocks_->KnownLength(id);
}

absl::StatusOr<BlockTableView> GroupManager::BatchBlockTable(
    absl::Span<const SequenceId> ids, int32_t table, void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckTable(table));
  if (ids.empty() ||
      static_cast<int64_t>(ids.size()) > config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table of ", ids.size(),
                     " sequences: expected 1 to max_sequences_per_step ",
                     config_.max_sequences_per_step));
  }
  Lock lock(mu_);
  KVCACHE_ASSIGN_OR_RETURN(const HostBatchTable batch,
                           blocks_->BatchTable(ids, table));
  if (batch.max_blocks > lookups_->cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a sequence of this batch holds ", batch.max_blocks,
        " blocks, more than max_blocks_per_sequence ", lookups_->cols()));
  }
  return lookups_->UploadBatchTable(batch, stream);
}

absl::StatusOr<LayerView> GroupManager::GetLayerView(int layer) const {
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  return backend_->View(layer);
}

absl::StatusOr<int64_t> GroupManager::GatherableLength(
    SequenceId id, int layer, bool include_in_flight) const {
  KVCACHE_ASSIGN_OR_RETURN(const int64_t computed, blocks_->ComputedLength(id));
  auto it = pending_.find(id);
  if (!include_in_flight || it == pending_.end()) return computed;
  KVCACHE_ASSIGN_OR_RETURN(const PlanTable::Plan* plan,
                           plans_->Find(it->second));
  for (const PlanSequence& row : plan->sequences) {
    if (row.sequence != id || row.num_tokens == 0) continue;
    if (plan->graph_tokens > 0 && plan->appended[layer] != plan->graph_tokens) {
      return absl::FailedPreconditionError(absl::StrCat(
          "gather of sequence ", id, " including graph step plan ", it->second,
          ": its Appends of layer ", layer,
          " did not run on the host (a replayed graph); commit it first"));
    }
    return computed +
           std::clamp<int64_t>(plan->appended[layer] - row.slot_offset, 0,
                               row.num_tokens);
  }
  return computed;
}

absl::Status GroupManager::GatherBatch(absl::Span<const GatherRequest> requests,
                                       int layer, const TensorView& key_out,
                                       const TensorView& value_out,
                                       const GatherOptions& options,
                                       void* stream, bool wait) {
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  if (static_cast<int64_t>(requests.size()) > config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("gather of ", requests.size(),
                     " sequences exceeds max_sequences_per_step ",
                     config_.max_sequences_per_step));
  }
  const int32_t table = paging_.layer_table[layer];
  const CacheLayout& layout = backend_->layer(layer).layout;
  Lock lock(mu_);
  std::vector<BlockId> ranges;
  std::vector<int64_t> range_begin(requests.size(), 0);
  int64_t total = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const GatherRequest& r = requests[i];
    KVCACHE_ASSIGN_OR_RETURN(
        const int64_t length,
        GatherableLength(r.sequence, layer, options.include_in_flight));
    KVCACHE_RETURN_IF_ERROR(
        CheckGatherRange(r, length, options.include_in_flight));
    range_begin[i] = static_cast<int64_t>(ranges.size());
    total += r.num_tokens;
    if (r.num_tokens == 0) continue;
    KVCACHE_ASSIGN_OR_RETURN(const absl::Span<const BlockId> t,
                             blocks_->BlockTable(r.sequence, table));
    const int64_t first = r.token_begin / layout.block_size;
    // Blocks released from a sliding window are gone: refuse to read them.
    if (t[first] == kNullBlock) {
      int64_t readable = first;
      while (readable < static_cast<int64_t>(t.size()) &&
             t[readable] == kNullBlock) {
        ++readable;
      }
      return absl::OutOfRangeError(absl::StrCat(
          "gather of sequence ", r.sequence, " from token ", r.token_begin,
          " in layer ", layer, ": that block left the sliding window of ",
          paging_.tables[table].sliding_window,
          " tokens and was released; this layer holds tokens from ",
          readable * layout.block_size, " on"));
    }
    KVCACHE_RETURN_IF_ERROR(AppendGatherBlocks(
        r, i, t, layout.block_size, lookups_->gather_capacity(), &ranges));
  }
  if (total == 0) return absl::OkStatus();
  KVCACHE_ASSIGN_OR_RETURN(
      const DenseKV output,
      CheckGatherBatchOutputs(*backend_, total, key_out, value_out, layer));
  KVCACHE_ASSIGN_OR_RETURN(const int32_t* device_ranges,
                           lookups_->UploadGatherRange(ranges, stream));
  absl::StatusOr<std::vector<GatherParams>> launches = BuildGatherLaunches(
      requests, range_begin, device_ranges, backend_->layer(layer),
      layout.block_size, output, layer);
  absl::Status status = launches.status();
  const std::string context = absl::StrCat("gather of layer ", layer);
  for (size_t i = 0; status.ok() && i < launches->size(); ++i) {
    status = Annotate(backend_->Gather((*launches)[i], stream), context);
    if (status.ok()) ++counters_.kernel_launches;
  }
  absl::Status done = lookups_->GatherDone(stream);
  if (!status.ok()) return status;
  KVCACHE_RETURN_IF_ERROR(done);
  if (wait) return backend_->device().SynchronizeStream(stream);
  return absl::OkStatus();
}

std::vector<KVEventBatch> GroupManager::TakeEvents() {
  Lock lock(mu_);
  if (events_ == nullptr) return {};
  return events_->Take();
}

absl::Status GroupManager::ResetPrefixCache() {
  Lock lock(mu_);
  return blocks_->ResetPrefixCache();
}

std::vector<BlockHash> GroupManager::RegisteredHashesForTesting() const {
  Lock lock(mu_);
  return blocks_->RegisteredHashesForTesting();
}

int64_t GroupManager::FreeBlocks() const {
  Lock lock(mu_);
  return blocks_->Usage().free_blocks;
}

int64_t GroupManager::EvictableBlocks() const {
  Lock lock(mu_);
  return blocks_->Usage().cached_blocks;
}

int64_t GroupManager::HeldBlocks(int32_t table) const {
  if (!CheckTable(table).ok()) return 0;
  Lock lock(mu_);
  return blocks_->HeldBlocks(table);
}

MetricsSnapshot GroupManager::Metrics() const {
  Lock lock(mu_);
  MetricsSnapshot s = counters_;
  const GroupPrefixStats& prefix = blocks_->PrefixStats();
  FillCommonMetrics(blocks_->Usage(), prefix, blocks_->num_sequences(),
                    plans_->size(), events_.get(), &s);
  s.prefix_hit_tokens_device = prefix.hit_tokens;
  return s;
}

absl::Status GroupManager::Validate() const {
  Lock lock(mu_);
  KVCACHE_RETURN_IF_ERROR(blocks_->Validate());
  return plans_->Validate(static_cast<int64_t>(paging_.tables.size()) *
                          config_.max_tokens_per_step);
}

}  // namespace kvcache::internal
