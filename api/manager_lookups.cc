// The lookups of KVCacheManager::Impl: block tables, Gather, metrics and
// Validate. The step is in manager_impl.cc.

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/gather_launches.h"
#include "api/manager_impl.h"
#include "api/manager_metrics.h"
#include "api/tensor_checks.h"
#include "core/status_macros.h"
#include "kernels/kernel_validation.h"

namespace kvcache {

using internal::Annotate;

absl::StatusOr<BlockTableView> KVCacheManager::Impl::BatchBlockTable(
    absl::Span<const SequenceId> ids, void* stream) {
  if (ids.empty() ||
      static_cast<int64_t>(ids.size()) > config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table of ", ids.size(),
                     " sequences: expected 1 to max_sequences_per_step ",
                     config_.max_sequences_per_step));
  }
  KVCACHE_ASSIGN_OR_RETURN(const HostBatchTable batch, BatchTable(ids));
  return lookups_->UploadBatchTable(batch, stream);
}

absl::StatusOr<HostBatchTable> KVCacheManager::Impl::BatchTable(
    absl::Span<const SequenceId> ids) const {
  KVCACHE_ASSIGN_OR_RETURN(HostBatchTable batch, blocks_->BatchTable(ids));
  if (batch.max_blocks > lookups_->cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a sequence of this batch holds ", batch.max_blocks,
        " blocks, more than max_blocks_per_sequence ", lookups_->cols()));
  }
  return batch;
}

absl::StatusOr<int64_t> KVCacheManager::Impl::GatherableLength(
    SequenceId id, int layer, bool include_in_flight) const {
  KVCACHE_ASSIGN_OR_RETURN(const int64_t computed, blocks_->ComputedLength(id));
  const uint64_t plan_id = blocks_->PendingPlan(id);
  if (!include_in_flight || plan_id == 0) return computed;
  KVCACHE_ASSIGN_OR_RETURN(const internal::PlanTable::Plan* plan,
                           plans_->Find(plan_id));
  for (const PlanSequence& row : plan->sequences) {
    if (row.sequence != id || row.num_tokens == 0) continue;
    const int64_t appended = plan->appended[layer];
    if (plan->graph_tokens > 0) {
      if (appended == plan->graph_tokens) return computed + row.num_tokens;
      return absl::FailedPreconditionError(absl::StrCat(
          "gather of sequence ", id, " including graph step plan ", plan_id,
          ": its Appends of layer ", layer,
          " did not run on the host (a replayed graph); commit it first"));
    }
    return computed +
           std::clamp<int64_t>(appended - row.slot_offset, 0, row.num_tokens);
  }
  return computed;
}

absl::Status KVCacheManager::Impl::Gather(
    SequenceId id, int layer, int64_t token_begin, int64_t num_tokens,
    const TensorView& key_out, const TensorView& value_out, void* stream) {
  const GatherRequest request{id, token_begin, num_tokens};
  KVCACHE_RETURN_IF_ERROR(GatherBatch(absl::MakeConstSpan(&request, 1), layer,
                                      key_out, value_out, GatherOptions(),
                                      stream));
  if (num_tokens == 0) return absl::OkStatus();
  return backend_->device().SynchronizeStream(stream);
}

absl::Status KVCacheManager::Impl::GatherBatch(
    absl::Span<const GatherRequest> requests, int layer,
    const TensorView& key_out, const TensorView& value_out,
    const GatherOptions& options, void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  if (static_cast<int64_t>(requests.size()) > config_.max_sequences_per_step) {
    return absl::InvalidArgumentError(
        absl::StrCat("gather of ", requests.size(),
                     " sequences exceeds max_sequences_per_step ",
                     config_.max_sequences_per_step));
  }
  const CacheLayout& layout = backend_->layout();
  // Each request's range, then its blocks, concatenated.
  std::vector<BlockId> ranges;
  std::vector<int64_t> range_begin(requests.size(), 0);
  int64_t total = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const GatherRequest& r = requests[i];
    KVCACHE_ASSIGN_OR_RETURN(
        const int64_t length,
        GatherableLength(r.sequence, layer, options.include_in_flight));
    KVCACHE_RETURN_IF_ERROR(
        internal::CheckGatherRange(r, length, options.include_in_flight));
    range_begin[i] = static_cast<int64_t>(ranges.size());
    total += r.num_tokens;  // Each at most INT32_MAX: no overflow.
    if (r.num_tokens == 0) continue;
    KVCACHE_ASSIGN_OR_RETURN(const absl::Span<const BlockId> table,
                             blocks_->BlockTable(r.sequence));
    KVCACHE_RETURN_IF_ERROR(internal::AppendGatherBlocks(
        r, i, table, layout.block_size, lookups_->gather_capacity(), &ranges));
  }
  if (total == 0) return absl::OkStatus();
  KVCACHE_ASSIGN_OR_RETURN(
      const DenseKV output,
      internal::CheckGatherBatchOutputs(*backend_, total, key_out, value_out));
  KVCACHE_ASSIGN_OR_RETURN(const int32_t* device_ranges,
                           lookups_->UploadGatherRange(ranges, stream));
  absl::StatusOr<std::vector<GatherParams>> launches =
      internal::BuildGatherLaunches(requests, range_begin, device_ranges,
                                    backend_->layer(layer), layout.block_size,
                                    output, layer);
  absl::Status status = launches.status();
  if (status.ok() && !launches->empty()) {
    int64_t onboard = 0;  // The requests' prefixes still in flight.
    for (const GatherRequest& r : requests) {
      onboard = std::max(onboard,
                         OnboardWaitFor(absl::MakeConstSpan(&r.sequence, 1)));
    }
    status = OrderAfterTierCopies(stream, onboard);
  }
  const std::string context = absl::StrCat("gather of layer ", layer);
  for (size_t i = 0; status.ok() && i < launches->size(); ++i) {
    status = Annotate(backend_->Gather((*launches)[i], stream), context);
    if (status.ok()) ++counters_.kernel_launches;
  }
  // The range's readers are enqueued (or none ran): mark it, either way.
  absl::Status done = lookups_->GatherDone(stream);
  return status.ok() ? done : status;
}

MetricsSnapshot KVCacheManager::Impl::Metrics() const {
  MetricsSnapshot s = counters_;
  const PrefixCacheStats prefix = blocks_->PrefixStats();
  internal::FillCommonMetrics(blocks_->Usage(), prefix,
                              blocks_->num_sequences(), plans_->size(),
                              events_.get(), &s);
  if (tier_ != nullptr) {
    const TierUsage tier = blocks_->HostTierUsage();
    s.host_tier_blocks_total = tier.total_blocks;
    s.host_tier_blocks_stored = tier.stored_blocks;
    s.prefix_hit_tokens_host = prefix.host_hit_tokens;
    s.host_tier_evictions = prefix.host_evictions;
    s.tier_offloads = prefix.offloads;
    s.tier_onboards = prefix.onboards;
    s.tier_offload_bytes = tier_->offload_bytes();
    s.tier_onboard_bytes = tier_->onboard_bytes();
    s.tier_copy_failures = prefix.host_drops;
    s.tier_offloads_skipped = prefix.offloads_skipped;
    s.tier_offloads_unselected = prefix.offloads_unselected;
    s.tier_offloads_waited = prefix.offloads_waited;
    s.tier_offload_ahead_copies = prefix.ahead_copies;
    s.tier_offloads_ahead = prefix.offloads_ahead;
    s.tier_offloads_kept = prefix.offloads_kept;
    s.tier_evictions_deferred = prefix.evictions_deferred;
  }
  s.prefix_hit_tokens_device = prefix.hit_tokens - prefix.host_hit_tokens;
  return s;
}

absl::Status KVCacheManager::Impl::Validate() const {
  KVCACHE_RETURN_IF_ERROR(blocks_->Validate());
  return plans_->Validate(config_.max_tokens_per_step);
}

}  // namespace kvcache
