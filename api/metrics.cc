#include "api/metrics.h"

#include <charconv>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvcache {
namespace {

// Integers are printed exactly (absl::StrCat of a double keeps six significant
// digits: 1234567 would read back as 1234570).
void Add(std::string* out, absl::string_view name, absl::string_view type,
         absl::string_view help, const absl::AlphaNum& value) {
  absl::StrAppend(out, "# HELP kvcache_", name, " ", help, "\n# TYPE kvcache_",
                  name, " ", type, "\nkvcache_", name, " ", value, "\n");
}

// The host tier's metrics, labelled by tier (device, host) or direction.
void AppendTierText(std::string* out, const MetricsSnapshot& m) {
  absl::StrAppend(
      out,
      "# HELP kvcache_prefix_hit_tokens_by_tier_total Prompt tokens found "
      "computed, by the tier that held them.\n"
      "# TYPE kvcache_prefix_hit_tokens_by_tier_total counter\n",
      "kvcache_prefix_hit_tokens_by_tier_total{tier=\"device\"} ",
      m.prefix_hit_tokens_device, "\n",
      "kvcache_prefix_hit_tokens_by_tier_total{tier=\"host\"} ",
      m.prefix_hit_tokens_host, "\n");
  absl::StrAppend(
      out,
      "# HELP kvcache_tier_evictions_total Cached blocks evicted, by tier.\n"
      "# TYPE kvcache_tier_evictions_total counter\n",
      "kvcache_tier_evictions_total{tier=\"device\"} ", m.evictions, "\n",
      "kvcache_tier_evictions_total{tier=\"host\"} ", m.host_tier_evictions,
      "\n");
  absl::StrAppend(
      out,
      "# HELP kvcache_tier_blocks_moved_total Whole blocks copied between "
      "tiers.\n# TYPE kvcache_tier_blocks_moved_total counter\n",
      "kvcache_tier_blocks_moved_total{direction=\"offload\"} ",
      m.tier_offloads, "\n",
      "kvcache_tier_blocks_moved_total{direction=\"onboard\"} ",
      m.tier_onboards, "\n");
  absl::StrAppend(
      out,
      "# HELP kvcache_tier_bytes_moved_total Bytes copied between tiers.\n"
      "# TYPE kvcache_tier_bytes_moved_total counter\n",
      "kvcache_tier_bytes_moved_total{direction=\"offload\"} ",
      m.tier_offload_bytes, "\n",
      "kvcache_tier_bytes_moved_total{direction=\"onboard\"} ",
      m.tier_onboard_bytes, "\n");
  absl::StrAppend(out,
                  "# HELP kvcache_host_tier_blocks Host-tier blocks by state.\n"
                  "# TYPE kvcache_host_tier_blocks gauge\n",
                  "kvcache_host_tier_blocks{state=\"stored\"} ",
                  m.host_tier_blocks_stored, "\n",
                  "kvcache_host_tier_blocks{state=\"total\"} ",
                  m.host_tier_blocks_total, "\n");
  Add(out, "tier_copy_failures_total", "counter",
      "Blocks dropped because their tier copy failed.", m.tier_copy_failures);
  Add(out, "tier_offloads_skipped_total", "counter",
      "Evicted blocks not offloaded because the copy queue was busy.",
      m.tier_offloads_skipped);
  Add(out, "tier_offloads_unselected_total", "counter",
      "Evicted blocks not offloaded for want of prefix hits "
      "(tier_offload_min_hits).",
      m.tier_offloads_unselected);
  Add(out, "tier_offloads_waited_total", "counter",
      "Offloads a later write waited for (no block to spare to hold).",
      m.tier_offloads_waited);
  Add(out, "tier_offload_ahead_copies_total", "counter",
      "Copies of cached blocks made before their eviction (offload ahead).",
      m.tier_offload_ahead_copies);
  Add(out, "tier_offloads_ahead_total", "counter",
      "Offloads that used a copy made ahead (no copy of their own).",
      m.tier_offloads_ahead);
  Add(out, "tier_offloads_kept_total", "counter",
      "Offloads of blocks back from the tier whose slot still held them (no "
      "copy).",
      m.tier_offloads_kept);
  Add(out, "tier_evictions_deferred_total", "counter",
      "Evictions that passed over a block whose copy ahead was still running.",
      m.tier_evictions_deferred);
}

}  // namespace

std::string ToPrometheusText(const MetricsSnapshot& m) {
  std::string out;
  absl::StrAppend(&out,
                  "# HELP kvcache_blocks KV-cache blocks by state.\n"
                  "# TYPE kvcache_blocks gauge\n",
                  "kvcache_blocks{state=\"free\"} ", m.blocks_free, "\n",
                  "kvcache_blocks{state=\"cached\"} ", m.blocks_cached, "\n",
                  "kvcache_blocks{state=\"in_use\"} ", m.blocks_in_use, "\n");
  Add(&out, "blocks_total", "gauge", "Blocks in the pool.", m.blocks_total);
  // The shortest text that reads back as exactly m.usage.
  char usage[32];
  const std::to_chars_result usage_end =
      std::to_chars(usage, usage + sizeof(usage), m.usage);
  Add(&out, "usage_ratio", "gauge", "Blocks in use over total blocks.",
      absl::string_view(usage, usage_end.ptr - usage));
  Add(&out, "sequences", "gauge", "Live sequences.", m.sequences);
  Add(&out, "plans_in_flight", "gauge", "Reserved, uncommitted step plans.",
      m.plans_in_flight);
  Add(&out, "prefix_queries_total", "counter",
      "Prompts looked up in the prefix cache.", m.prefix_queries);
  Add(&out, "prefix_query_tokens_total", "counter",
      "Prompt tokens looked up in the prefix cache.", m.prefix_query_tokens);
  Add(&out, "prefix_hit_tokens_total", "counter",
      "Prompt tokens found already computed.", m.prefix_hit_tokens);
  Add(&out, "evictions_total", "counter", "Cached blocks evicted for reuse.",
      m.evictions);
  Add(&out, "tokens_appended_total", "counter",
      "Tokens quantized into the cache, summed over layers.",
      m.tokens_appended);
  Add(&out, "tokens_committed_total", "counter", "Tokens committed.",
      m.tokens_committed);
  Add(&out, "tokens_rejected_total", "counter",
      "Reserved tokens rolled back at commit (rejected draft tokens).",
      m.tokens_rejected);
  Add(&out, "kernel_launches_total", "counter", "Cache kernels launched.",
      m.kernel_launches);
  Add(&out, "reserve_failures_total", "counter",
      "Reserve calls refused for lack of room.", m.reserve_failures);
  Add(&out, "block_copies_total", "counter", "Copy-on-write block copies.",
      m.block_copies);
  Add(&out, "kv_event_batches_total", "counter", "KV event batches made.",
      m.kv_event_batches);
  Add(&out, "kv_event_batches_dropped_total", "counter",
      "KV event batches dropped unread (TakeEvents queue full).",
      m.kv_event_batches_dropped);
  Add(&out, "kv_event_batches_unpublished_total", "counter",
      "KV event batches the ZeroMQ publisher did not send.",
      m.kv_event_batches_unpublished);
  if (m.host_tier_blocks_total > 0) AppendTierText(&out, m);
  return out;
}

}  // namespace kvcache
