// MetricsSnapshot: a consistent copy of a KVCacheManager's counters and gauges,
// and its text dump in the Prometheus exposition format. Plain value type.

#ifndef KVCACHE_API_METRICS_H_
#define KVCACHE_API_METRICS_H_

#include <cstdint>
#include <string>

namespace kvcache {

struct MetricsSnapshot {
  // Gauges.
  int64_t blocks_total = 0;
  int64_t blocks_free = 0;
  int64_t blocks_cached = 0;  // Hashed and unreferenced: evictable.
  int64_t blocks_in_use = 0;
  double usage = 0.0;  // blocks_in_use / blocks_total.
  int64_t sequences = 0;
  int64_t plans_in_flight = 0;
  // Counters.
  int64_t prefix_queries = 0;
  int64_t prefix_query_tokens = 0;
  int64_t prefix_hit_tokens = 0;
  int64_t evictions = 0;
  int64_t tokens_appended = 0;  // Tokens written, summed over layers.
  int64_t tokens_committed =
      0;  // Tokens committed (once per token, not per layer).
  int64_t kernel_launches = 0;
  // Reserved tokens rolled back by Commit(plan, accepted) (rejected drafts).
  int64_t tokens_rejected = 0;
  int64_t reserve_failures = 0;  // Reserve calls refused for lack of room.
  int64_t block_copies =
      0;  // Copy-on-write block copies (per block, all layers).

  // Host tier (README "Host tier"; all zero without one). Hits by tier:
  // prefix_hit_tokens = prefix_hit_tokens_device + prefix_hit_tokens_host.
  // Evictions by tier: `evictions` (device; each offloaded when the tier has
  // room) and host_tier_evictions (dropped from the tier's LRU).
  int64_t host_tier_blocks_total = 0;   // Gauge: blocks the tier holds at most.
  int64_t host_tier_blocks_stored = 0;  // Gauge: blocks it holds now.
  int64_t prefix_hit_tokens_device = 0;
  int64_t prefix_hit_tokens_host = 0;  // Onboarded from the tier.
  int64_t host_tier_evictions = 0;
  int64_t tier_offloads = 0;  // Blocks copied device -> host.
  int64_t tier_onboards = 0;  // Blocks copied host -> device.
  int64_t tier_offload_bytes = 0;
  int64_t tier_onboard_bytes = 0;
  // Blocks dropped because their tier copy failed (never half-copied).
  int64_t tier_copy_failures = 0;
  // Evicted blocks not offloaded: the copy queue was busy (over
  // tier_offload_max_in_flight_bytes, or the call had no block to spare
  // while the copy runs), or, unselected, the block had fewer prefix hits
  // than tier_offload_min_hits.
  int64_t tier_offloads_skipped = 0;
  int64_t tier_offloads_unselected = 0;
  // Offloads a later write had to wait for: the call that evicted the block
  // had none to spare to hold it until its copy was done (README "Host
  // tier"); zero means no step waited for an offload.
  int64_t tier_offloads_waited = 0;
  // Offload ahead (tier_offload_ahead_blocks): copies made of cached blocks
  // before their eviction, and the offloads that used one (needing no copy
  // of their own); the difference, less those still waiting, went unused.
  int64_t tier_offload_ahead_copies = 0;
  int64_t tier_offloads_ahead = 0;
  // Offloads of blocks that came from the tier (onboarded, or promoted by a
  // commit of content it held) and were evicted again while their tier slot
  // was still kept for them: the slot already held their bytes, so no copy
  // at all (README "Host tier").
  int64_t tier_offloads_kept = 0;
  // Evictions that passed over a block whose copy ahead was still running
  // (it became the newest cached block instead of being reused at once, so
  // no step waited for that copy on the device; README "Host tier").
  int64_t tier_evictions_deferred = 0;
  // KV events (zero unless enable_kv_events): batches made, batches dropped
  // before TakeEvents read them (queue full), batches the ZeroMQ publisher
  // could not send (its queue full, or a failed send).
  int64_t kv_event_batches = 0;
  int64_t kv_event_batches_dropped = 0;
  int64_t kv_event_batches_unpublished = 0;
};

// "# HELP ...\n# TYPE ...\nkvcache_blocks{state=\"free\"} 12\n..." with names
// prefixed "kvcache_".
std::string ToPrometheusText(const MetricsSnapshot& metrics);

}  // namespace kvcache

#endif  // KVCACHE_API_METRICS_H_
