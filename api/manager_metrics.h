// The metrics both managers (KVCacheManager::Impl, internal::GroupManager)
// read the same way from their parts: the pool's blocks, the prefix cache's
// counters, the sequences and plans, and the KV event sink's counts. Plain
// function; the caller holds its manager's lock. Internal to api/.

#ifndef KVCACHE_API_MANAGER_METRICS_H_
#define KVCACHE_API_MANAGER_METRICS_H_

#include <cstdint>

#include "allocator/block_manager.h"
#include "api/metrics.h"
#include "events/kv_event_sink.h"

namespace kvcache::internal {

// Fills the fields above into *s. `prefix` is the allocator's prefix-cache
// counters (queries, query_tokens, hit_tokens, evictions); `events` may be
// null (events off).
template <class PrefixStats>
void FillCommonMetrics(const PoolUsage& usage, const PrefixStats& prefix,
                       int64_t sequences, int64_t plans_in_flight,
                       const KVEventSink* events, MetricsSnapshot* s) {
  s->blocks_total = usage.total_blocks;
  s->blocks_free = usage.free_blocks;
  s->blocks_cached = usage.cached_blocks;
  s->blocks_in_use = usage.used_blocks;
  s->usage = usage.total_blocks > 0
                 ? static_cast<double>(usage.used_blocks) / usage.total_blocks
                 : 0.0;
  s->sequences = sequences;
  s->plans_in_flight = plans_in_flight;
  s->prefix_queries = prefix.queries;
  s->prefix_query_tokens = prefix.query_tokens;
  s->prefix_hit_tokens = prefix.hit_tokens;
  s->evictions = prefix.evictions;
  if (events != nullptr) {
    s->kv_event_batches = static_cast<int64_t>(events->batches());
    s->kv_event_batches_dropped = static_cast<int64_t>(events->dropped());
    s->kv_event_batches_unpublished =
        static_cast<int64_t>(events->unpublished());
  }
}

}  // namespace kvcache::internal

#endif  // KVCACHE_API_MANAGER_METRICS_H_
