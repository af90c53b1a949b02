#include "benchmarks/replay/replay_report.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace kvcache::replay {
namespace {

// Nearest-rank percentile (p in (0, 100]) of unsorted values; 0 when empty.
double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t rank = static_cast<size_t>(
      std::ceil(p / 100.0 * static_cast<double>(values.size())));
  return values[std::clamp<size_t>(rank, 1, values.size()) - 1];
}

}  // namespace

ReplayReport MakeReport(const ReplayStats& stats,
                        const MetricsSnapshot& metrics, int64_t bytes_per_token,
                        double wall_s) {
  ReplayReport r;
  r.requests_total = stats.requests_total;
  r.requests_finished = stats.requests_finished;
  r.requests_rejected = stats.requests_rejected;
  r.steps = stats.steps;
  r.tokens_appended = stats.tokens_appended();
  r.prefill_tokens = stats.prefill_tokens;
  r.recompute_tokens = stats.recompute_tokens;
  r.decode_tokens = stats.decode_tokens;
  r.layer_appends = metrics.tokens_appended;
  r.prefix_hit_rate = stats.prompt_tokens > 0
                          ? static_cast<double>(stats.prefix_hit_tokens) /
                                static_cast<double>(stats.prompt_tokens)
                          : 0.0;
  r.prefix_hit_rate_host =
      stats.prompt_tokens > 0
          ? static_cast<double>(stats.prefix_hit_tokens_host) /
                static_cast<double>(stats.prompt_tokens)
          : 0.0;
  r.host_tier_blocks = metrics.host_tier_blocks_total;
  r.tier_offloads = metrics.tier_offloads;
  r.tier_onboards = metrics.tier_onboards;
  r.host_tier_evictions = metrics.host_tier_evictions;
  r.tier_bytes_moved = metrics.tier_offload_bytes + metrics.tier_onboard_bytes;
  r.tier_offload_bytes = metrics.tier_offload_bytes;
  r.tier_offloads_skipped = metrics.tier_offloads_skipped;
  r.tier_offloads_unselected = metrics.tier_offloads_unselected;
  r.tier_offloads_waited = metrics.tier_offloads_waited;
  r.tier_offload_ahead_copies = metrics.tier_offload_ahead_copies;
  r.tier_offloads_ahead = metrics.tier_offloads_ahead;
  r.tier_offloads_kept = metrics.tier_offloads_kept;
  r.tier_evictions_deferred = metrics.tier_evictions_deferred;
  r.onboard_deferrals = stats.onboard_deferrals;
  r.evictions = metrics.evictions;
  r.preemptions = stats.preemptions;
  r.draft_tokens_accepted = stats.draft_tokens_accepted;
  r.draft_tokens_rejected = stats.draft_tokens_rejected;
  r.peak_blocks_in_use = stats.peak_blocks_in_use;
  r.total_blocks = metrics.blocks_total;
  r.host_ms_median = Percentile(stats.step_host_ms, 50.0);
  r.host_ms_p99 = Percentile(stats.step_host_ms, 99.0);
  for (double ms : stats.step_host_ms) r.host_s_total += ms / 1000.0;
  r.plan_s = stats.plan_ms / 1e3;
  r.plan_add_s = stats.plan_add_ms / 1e3;
  r.plan_can_reserve_s = stats.plan_can_reserve_ms / 1e3;
  r.plan_reserve_s = stats.plan_reserve_ms / 1e3;
  r.plan_loaded_s = stats.plan_loaded_ms / 1e3;
  r.enqueue_s = stats.enqueue_ms / 1e3;
  r.append_calls_s = stats.append_calls_ms / 1e3;
  r.wait_s = stats.wait_ms / 1e3;
  r.commit_s = stats.commit_ms / 1e3;
  r.finish_s = stats.finish_ms / 1e3;
  r.device_s = stats.device_ms / 1e3;
  r.device_extra_waited_s = stats.device_extra_waited_ms / 1e3;
  r.device_extra_other_s = stats.device_extra_other_ms / 1e3;
  r.device_before_s = stats.device_before_ms / 1e3;
  r.steps_waited = stats.steps_waited;
  r.decode_steps = static_cast<int64_t>(stats.decode_step_host_ms.size());
  r.graph_steps = stats.graph_steps;
  r.decode_host_ms_median = Percentile(stats.decode_step_host_ms, 50.0);
  r.decode_host_ms_p99 = Percentile(stats.decode_step_host_ms, 99.0);
  r.kernel_s = stats.kernel_ms / 1e3;
  r.attention_steps = static_cast<int64_t>(stats.attention_ms.size());
  if (r.attention_steps > 0) {
    r.attention_ms_median = Percentile(stats.attention_ms, 50.0);
    double sum = 0.0;
    for (double ms : stats.attention_ms) sum += ms;
    r.attention_ms_mean = sum / r.attention_steps;
  }
  r.append_gb_per_s = r.kernel_s > 0.0
                          ? static_cast<double>(r.tokens_appended) *
                                static_cast<double>(bytes_per_token) /
                                r.kernel_s / 1e9
                          : 0.0;
  r.quant_rel_l2 = stats.error.RelativeL2();
  r.error_samples = stats.error.samples;
  r.error_tokens = stats.error.tokens;
  r.simulated_s = stats.simulated_ms / 1e3;
  r.wall_s = wall_s;
  r.tokens_per_s =
      wall_s > 0.0 ? static_cast<double>(r.tokens_appended) / wall_s : 0.0;
  return r;
}

std::string ReportText(const ReplayReport& r) {
  std::string out =
      absl::StrFormat("trace replay: %s backend, %s cache, %d layers\n",
                      r.backend, r.cache_dtype, r.num_layers);
  absl::StrAppendFormat(
      &out, "  requests finished     %d of %d (%d rejected)\n",
      r.requests_finished, r.requests_total, r.requests_rejected);
  absl::StrAppendFormat(&out,
                        "  tokens appended       %d (prefill %d, of which "
                        "recomputed %d; decode %d)\n",
                        r.tokens_appended, r.prefill_tokens, r.recompute_tokens,
                        r.decode_tokens);
  absl::StrAppendFormat(&out, "  layer appends         %d (tokens x layers)\n",
                        r.layer_appends);
  absl::StrAppendFormat(&out, "  steps                 %d\n", r.steps);
  if (r.host_tier_blocks > 0) {
    absl::StrAppendFormat(
        &out,
        "  prefix hit rate       %.1f%% (device %.1f%%, host tier %.1f%%)\n",
        100.0 * r.prefix_hit_rate,
        100.0 * (r.prefix_hit_rate - r.prefix_hit_rate_host),
        100.0 * r.prefix_hit_rate_host);
  } else {
    absl::StrAppendFormat(&out, "  prefix hit rate       %.1f%%\n",
                          100.0 * r.prefix_hit_rate);
  }
  absl::StrAppendFormat(&out, "  evictions             %d blocks\n",
                        r.evictions);
  if (r.host_tier_blocks > 0) {
    absl::StrAppendFormat(
        &out,
        "  host tier             %d blocks: %d offloaded, %d onboarded, %d "
        "evicted (%.2f GB moved)\n",
        r.host_tier_blocks, r.tier_offloads, r.tier_onboards,
        r.host_tier_evictions, static_cast<double>(r.tier_bytes_moved) / 1e9);
    absl::StrAppendFormat(
        &out,
        "  tier offload policy   %.2f GB offloaded (%d waited for; %d copied "
        "ahead, %d offloads used one, %d needed no copy: slot kept since "
        "their onboard; %d evictions passed over a copy ahead still "
        "running); not offloaded: %d unselected (too few hits), %d skipped "
        "(copy queue busy)\n",
        static_cast<double>(r.tier_offload_bytes) / 1e9, r.tier_offloads_waited,
        r.tier_offload_ahead_copies, r.tier_offloads_ahead,
        r.tier_offloads_kept, r.tier_evictions_deferred,
        r.tier_offloads_unselected, r.tier_offloads_skipped);
    absl::StrAppendFormat(
        &out,
        "  onboarding            --async_onboard %s: %d request-steps sat out "
        "waiting for their prefix\n",
        r.async_onboard ? "on" : "off", r.onboard_deferrals);
  }
  absl::StrAppendFormat(&out, "  preemptions           %d\n", r.preemptions);
  if (r.spec_tokens > 0) {
    absl::StrAppendFormat(
        &out,
        "  speculation           %d drafts/step: %d accepted, %d rejected\n",
        r.spec_tokens, r.draft_tokens_accepted, r.draft_tokens_rejected);
  }
  absl::StrAppendFormat(&out, "  peak blocks in use    %d of %d\n",
                        r.peak_blocks_in_use, r.total_blocks);
  absl::StrAppendFormat(&out,
                        "  host time per step    median %.3f ms, p99 %.3f ms "
                        "(%.3f s in all)\n",
                        r.host_ms_median, r.host_ms_p99, r.host_s_total);
  absl::StrAppendFormat(
      &out,
      "  decode-only steps     %d (%d in a CUDA graph, --cuda_graph %s): host "
      "time median %.3f ms, p99 %.3f ms\n",
      r.decode_steps, r.graph_steps, r.cuda_graph ? "on" : "off",
      r.decode_host_ms_median, r.decode_host_ms_p99);
  absl::StrAppendFormat(&out, "  kernel time           %.3f s\n", r.kernel_s);
  absl::StrAppendFormat(
      &out,
      "  step time by part     plan %.3f s, enqueue %.3f s (Append calls "
      "%.3f s), wait for kernels %.3f s (%s), commit %.3f s, finish %.3f "
      "s\n",
      r.plan_s, r.enqueue_s, r.append_calls_s, r.wait_s,
      r.pipeline ? absl::StrCat("--pipeline on: up to ", r.steps_in_flight,
                                " steps in flight, the host waits for the "
                                "oldest")
                 : std::string("--pipeline off: each step waits for its own"),
      r.commit_s, r.finish_s);
  absl::StrAppendFormat(
      &out,
      "  plan by call          AddSequence %.3f s, CanReserve %.3f s, Reserve "
      "%.3f s, PrefixLoaded %.3f s, the rest %.3f s\n",
      r.plan_add_s, r.plan_can_reserve_s, r.plan_reserve_s, r.plan_loaded_s,
      r.plan_s - r.plan_add_s - r.plan_can_reserve_s - r.plan_reserve_s -
          r.plan_loaded_s);
  absl::StrAppendFormat(
      &out,
      "  device time of steps  %.3f s: beyond the Appends %.3f s in the %d "
      "steps that waited for an offload, %.3f s in the others; before the "
      "steps %.3f s (from each plan's start: the plan, and host-tier copies "
      "it ordered the step after)\n",
      r.device_s, r.device_extra_waited_s, r.steps_waited,
      r.device_extra_other_s, r.device_before_s);
  if (r.attention_steps > 0) {
    absl::StrAppendFormat(
        &out,
        "  attention per step    median %.3f ms, mean %.3f ms (%d steps)\n",
        r.attention_ms_median, r.attention_ms_mean, r.attention_steps);
  }
  absl::StrAppendFormat(&out, "  append bandwidth      %.2f GB/s\n",
                        r.append_gb_per_s);
  absl::StrAppendFormat(&out,
                        "  quantization error    %.3e relative L2 (%d blocks, "
                        "%d tokens gathered)\n",
                        r.quant_rel_l2, r.error_samples, r.error_tokens);
  absl::StrAppendFormat(&out,
                        "  wall time             %.1f s (%.0f tokens/s; %.1f s "
                        "of trace time)\n",
                        r.wall_s, r.tokens_per_s, r.simulated_s);
  return out;
}

std::string ReportJson(const ReplayReport& r) {
  const nlohmann::json j = {
      {"backend", r.backend},
      {"cache_dtype", r.cache_dtype},
      {"num_layers", r.num_layers},
      {"requests_total", r.requests_total},
      {"requests_finished", r.requests_finished},
      {"requests_rejected", r.requests_rejected},
      {"steps", r.steps},
      {"tokens_appended", r.tokens_appended},
      {"prefill_tokens", r.prefill_tokens},
      {"recompute_tokens", r.recompute_tokens},
      {"decode_tokens", r.decode_tokens},
      {"layer_appends", r.layer_appends},
      {"prefix_hit_rate", r.prefix_hit_rate},
      {"prefix_hit_rate_host", r.prefix_hit_rate_host},
      {"host_tier_blocks", r.host_tier_blocks},
      {"tier_offloads", r.tier_offloads},
      {"tier_onboards", r.tier_onboards},
      {"host_tier_evictions", r.host_tier_evictions},
      {"tier_bytes_moved", r.tier_bytes_moved},
      {"tier_offload_bytes", r.tier_offload_bytes},
      {"tier_offloads_skipped", r.tier_offloads_skipped},
      {"tier_offloads_unselected", r.tier_offloads_unselected},
      {"tier_offloads_waited", r.tier_offloads_waited},
      {"tier_offload_ahead_copies", r.tier_offload_ahead_copies},
      {"tier_offloads_ahead", r.tier_offloads_ahead},
      {"tier_offloads_kept", r.tier_offloads_kept},
      {"tier_evictions_deferred", r.tier_evictions_deferred},
      {"async_onboard", r.async_onboard},
      {"onboard_deferrals", r.onboard_deferrals},
      {"evictions", r.evictions},
      {"preemptions", r.preemptions},
      {"spec_tokens", r.spec_tokens},
      {"draft_tokens_accepted", r.draft_tokens_accepted},
      {"draft_tokens_rejected", r.draft_tokens_rejected},
      {"peak_blocks_in_use", r.peak_blocks_in_use},
      {"total_blocks", r.total_blocks},
      {"host_ms_per_step_median", r.host_ms_median},
      {"host_ms_per_step_p99", r.host_ms_p99},
      {"host_s_total", r.host_s_total},
      {"plan_s", r.plan_s},
      {"plan_add_s", r.plan_add_s},
      {"plan_can_reserve_s", r.plan_can_reserve_s},
      {"plan_reserve_s", r.plan_reserve_s},
      {"plan_loaded_s", r.plan_loaded_s},
      {"enqueue_s", r.enqueue_s},
      {"append_calls_s", r.append_calls_s},
      {"wait_s", r.wait_s},
      {"commit_s", r.commit_s},
      {"finish_s", r.finish_s},
      {"device_s", r.device_s},
      {"device_extra_waited_s", r.device_extra_waited_s},
      {"device_extra_other_s", r.device_extra_other_s},
      {"device_before_s", r.device_before_s},
      {"steps_waited", r.steps_waited},
      {"pipeline", r.pipeline},
      {"steps_in_flight", r.steps_in_flight},
      {"cuda_graph", r.cuda_graph},
      {"decode_steps", r.decode_steps},
      {"graph_steps", r.graph_steps},
      {"decode_host_ms_per_step_median", r.decode_host_ms_median},
      {"decode_host_ms_per_step_p99", r.decode_host_ms_p99},
      {"attention_steps", r.attention_steps},
      {"attention_ms_per_step_median", r.attention_ms_median},
      {"attention_ms_per_step_mean", r.attention_ms_mean},
      {"kernel_s", r.kernel_s},
      {"append_gb_per_s", r.append_gb_per_s},
      {"quant_rel_l2_error", r.quant_rel_l2},
      {"error_samples", r.error_samples},
      {"error_tokens", r.error_tokens},
      {"simulated_s", r.simulated_s},
      {"wall_s", r.wall_s},
      {"tokens_per_s", r.tokens_per_s},
  };
  return j.dump(2) + "\n";
}

}  // namespace kvcache::replay
