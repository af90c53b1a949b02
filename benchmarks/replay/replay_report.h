// ReplayReport: the figures of one trace replay, printed as text or JSON.
// Plain value type.

#ifndef KVCACHE_BENCHMARKS_REPLAY_REPLAY_REPORT_H_
#define KVCACHE_BENCHMARKS_REPLAY_REPLAY_REPORT_H_

#include <cstdint>
#include <string>

#include "api/metrics.h"
#include "benchmarks/replay/replay_scheduler.h"

namespace kvcache::replay {

struct ReplayReport {
  std::string backend;
  std::string cache_dtype;
  int64_t num_layers = 0;
  int64_t requests_total = 0;
  int64_t requests_finished = 0;
  int64_t requests_rejected = 0;
  int64_t steps = 0;
  int64_t tokens_appended = 0;  // Prefill + decode tokens (each all layers).
  int64_t prefill_tokens = 0;
  int64_t recompute_tokens = 0;
  int64_t decode_tokens = 0;
  int64_t layer_appends = 0;     // Manager metric: tokens x layers.
  double prefix_hit_rate = 0.0;  // Prompt tokens found cached.
  // Host tier (--host_tier_gb; zero without one): the hit rate's part found
  // there, the tier's size and its traffic.
  double prefix_hit_rate_host = 0.0;
  int64_t host_tier_blocks = 0;
  int64_t tier_offloads = 0;
  int64_t tier_onboards = 0;
  int64_t host_tier_evictions = 0;
  int64_t tier_bytes_moved = 0;
  int64_t tier_offload_bytes = 0;
  // Evicted blocks not offloaded: copy queue busy / too few prefix hits.
  int64_t tier_offloads_skipped = 0;
  int64_t tier_offloads_unselected = 0;
  int64_t tier_offloads_waited = 0;  // Steps' writes waited for their copy.
  int64_t tier_offload_ahead_copies = 0;  // Copies made before eviction.
  int64_t tier_offloads_ahead = 0;        // Offloads that used one.
  int64_t tier_offloads_kept = 0;  // Offloads whose slot was kept (no copy).
  // Evictions that passed over a block whose copy ahead was still running.
  int64_t tier_evictions_deferred = 0;
  // --async_onboard: steps requests sat out while their prefix was copied
  // in (on or off).
  bool async_onboard = true;
  int64_t onboard_deferrals = 0;
  int64_t evictions = 0;
  int64_t preemptions = 0;
  int spec_tokens = 0;  // Draft tokens per decode step (--spec_tokens).
  int64_t draft_tokens_accepted = 0;
  int64_t draft_tokens_rejected = 0;
  int64_t peak_blocks_in_use = 0;
  int64_t total_blocks = 0;
  double host_ms_median = 0.0;  // Per step.
  double host_ms_p99 = 0.0;
  double host_s_total = 0.0;  // Sum over steps.
  // The steps' wall time by part (ReplayStats::plan_ms and the rest), s.
  double plan_s = 0.0;
  // Of plan_s: AddSequence, CanReserve, Reserve and PrefixLoaded.
  double plan_add_s = 0.0;
  double plan_can_reserve_s = 0.0;
  double plan_reserve_s = 0.0;
  double plan_loaded_s = 0.0;
  double enqueue_s = 0.0;
  double append_calls_s = 0.0;  // Of enqueue_s.
  double wait_s = 0.0;
  double commit_s = 0.0;
  double finish_s = 0.0;
  double device_s = 0.0;  // ReplayStats::device_ms and the rest, in s.
  double device_extra_waited_s = 0.0;
  double device_extra_other_s = 0.0;
  double device_before_s = 0.0;  // ReplayStats::device_before_ms, in s.
  int64_t steps_waited = 0;
  // --pipeline: the host planned each step while the step before ran.
  bool pipeline = true;
  int steps_in_flight = 2;
  // Steps of decode tokens only, and how many ran in a CUDA graph
  // (--cuda_graph).
  bool cuda_graph = false;
  int64_t decode_steps = 0;
  int64_t graph_steps = 0;
  double decode_host_ms_median = 0.0;
  double decode_host_ms_p99 = 0.0;
  double kernel_s = 0.0;
  // --attention: attention over all layers per step (0 steps when off).
  int64_t attention_steps = 0;
  double attention_ms_median = 0.0;
  double attention_ms_mean = 0.0;
  double append_gb_per_s = 0.0;  // (K/V read + cache/scales written) / kernel.
  double quant_rel_l2 = 0.0;
  int64_t error_samples = 0;
  int64_t error_tokens = 0;
  double simulated_s = 0.0;
  double wall_s = 0.0;
  double tokens_per_s = 0.0;  // tokens_appended / wall_s.
};

ReplayReport MakeReport(const ReplayStats& stats,
                        const MetricsSnapshot& metrics, int64_t bytes_per_token,
                        double wall_s);

std::string ReportText(const ReplayReport& report);
std::string ReportJson(const ReplayReport& report);

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_REPLAY_REPORT_H_
