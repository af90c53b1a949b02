// The lookups of KVCacheManager::Impl: block tables, Gather, metrics and
// Validate. The step is in manager_impl.cc.

#include <string>

#include "absl/strings/str_cat.h"
#include "api/manager_impl.h"
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

absl::Status KVCacheManager::Impl::Gather(
    SequenceId id, int layer, int64_t token_begin, int64_t num_tokens,
    const TensorView& key_out, const TensorView& value_out, void* stream) {
  KVCACHE_RETURN_IF_ERROR(CheckLayer(layer));
  KVCACHE_ASSIGN_OR_RETURN(const int64_t length, blocks_->ComputedLength(id));
  if (token_begin < 0 || num_tokens < 1 || token_begin > length ||
      num_tokens > length - token_begin) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gather of ", num_tokens, " tokens from token ", token_begin,
        " of sequence ", id, ": it has ", length, " computed tokens"));
  }
  const CacheLayout& layout = backend_->layout();
  internal::ExpectedKV expected;
  expected.num_tokens = num_tokens;
  expected.num_heads = layout.num_heads;
  expected.head_size = layout.head_size;
  expected.any_float_dtype = true;
  expected.memory = backend_->memory_kind();
  expected.device = backend_->ordinal();
  GatherParams params;
  int64_t checked_tokens = 0;
  KVCACHE_RETURN_IF_ERROR(
      internal::CheckKVPair(key_out, value_out, expected, layout.head_size_v,
                            &params.output, &checked_tokens));
  KVCACHE_ASSIGN_OR_RETURN(const absl::Span<const BlockId> table,
                           blocks_->BlockTable(id));
  const int64_t first = token_begin / layout.block_size;
  const int64_t last = (token_begin + num_tokens - 1) / layout.block_size;
  const int64_t count = last - first + 1;
  if (count > lookups_->cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gather of ", num_tokens, " tokens spans ", count,
        " blocks, more than max_blocks_per_sequence ", lookups_->cols()));
  }
  params.cache = backend_->layer(layer);
  params.block_table_len = count;
  params.token_begin = token_begin - first * layout.block_size;
  params.num_tokens = num_tokens;
  const std::string context = absl::StrCat("gather of layer ", layer);
  params.block_table = lookups_->gather_range();
  // Everything the kernel would refuse, and outputs that overlap each other
  // or the cache, are refused before anything runs.
  KVCACHE_RETURN_IF_ERROR(Annotate(internal::ValidateGather(params), context));
  KVCACHE_RETURN_IF_ERROR(internal::CheckGatherOutputs(
      params.output, num_tokens, layout, backend_->storage()));
  KVCACHE_RETURN_IF_ERROR(
      lookups_->UploadGatherRange(table.subspan(first, count), stream));
  KVCACHE_RETURN_IF_ERROR(OrderAfterTierCopies(stream));
  KVCACHE_RETURN_IF_ERROR(Annotate(backend_->Gather(params, stream), context));
  ++counters_.kernel_launches;
  return backend_->device().SynchronizeStream(stream);
}

MetricsSnapshot KVCacheManager::Impl::Metrics() const {
  MetricsSnapshot s = counters_;
  const PoolUsage usage = blocks_->Usage();
  const PrefixCacheStats prefix = blocks_->PrefixStats();
  s.blocks_total = usage.total_blocks;
  s.blocks_free = usage.free_blocks;
  s.blocks_cached = usage.cached_blocks;
  s.blocks_in_use = usage.used_blocks;
  s.usage = usage.total_blocks > 0
                ? static_cast<double>(usage.used_blocks) / usage.total_blocks
                : 0.0;
  s.sequences = blocks_->num_sequences();
  s.plans_in_flight = plans_->size();
  s.prefix_queries = prefix.queries;
  s.prefix_query_tokens = prefix.query_tokens;
  s.prefix_hit_tokens = prefix.hit_tokens;
  s.evictions = prefix.evictions;
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
  }
  s.prefix_hit_tokens_device = prefix.hit_tokens - prefix.host_hit_tokens;
  return s;
}

absl::Status KVCacheManager::Impl::Validate() const {
  KVCACHE_RETURN_IF_ERROR(blocks_->Validate());
  return plans_->Validate(config_.max_tokens_per_step);
}

}  // namespace kvcache
