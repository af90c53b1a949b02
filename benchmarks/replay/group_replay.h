// GroupReplay: the trace replay for a model preset with layer groups
// (--model). It drives the allocator of layer groups (GroupBlockManager)
// with the trace under continuous batching, without K/V data (the manager
// does not serve layer groups yet), and measures what groups change: pages
// per table, the prefix hit rate, and the memory a context needs against the
// same model with every layer full. Not thread-safe.
//
// Scheduling: all requests arrive at once, in trace order. Each step, the
// running requests (oldest first) take one decode token or a prompt chunk
// from the token budget, then waiting requests join while budget and running
// slots remain. When Reserve is refused the newest running request is
// preempted: freed, and queued first to start again from its prompt.

#ifndef KVCACHE_BENCHMARKS_REPLAY_GROUP_REPLAY_H_
#define KVCACHE_BENCHMARKS_REPLAY_GROUP_REPLAY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "api/kv_cache_config.h"
#include "testing/trace.h"

namespace kvcache::replay {

struct GroupReplayOptions {
  int64_t token_budget = 2048;
  int max_running = 64;
  int64_t kv_bytes = int64_t{16} << 30;  // The pool: kv_bytes / page bytes.
  int64_t context_tokens = 32768;        // For the per-context figure.
};

struct GroupReplayReport {
  std::string model;
  int32_t tables = 0;
  int32_t layers_per_page = 0;
  int64_t page_bytes = 0;
  int64_t num_pages = 0;
  // Sum over layers of one token's K, V and scales (no paging).
  int64_t kv_bytes_per_token = 0;
  // Per config group: peak pages its tables held at once, and its tables.
  std::vector<int64_t> peak_pages_per_group;
  std::vector<int32_t> tables_per_group;
  int64_t peak_pages = 0;
  int64_t requests = 0, completed = 0, rejected = 0, preemptions = 0;
  int64_t steps = 0;
  double hit_rate = 0.0;  // Prompt tokens found cached / looked up.
  // One sequence of context_tokens: bytes of the pages it holds per 1024
  // tokens, with the windows and with every layer full.
  double bytes_per_1k_context = 0.0;
  double bytes_per_1k_context_all_full = 0.0;
};

// REQUIRES: config has layer groups and passed ValidateConfig.
absl::StatusOr<GroupReplayReport> RunGroupReplay(
    const std::string& model, const KVCacheConfig& config,
    const std::vector<TraceRequest>& trace, const GroupReplayOptions& options);

std::string FormatGroupReport(const GroupReplayReport& report);

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_GROUP_REPLAY_H_
