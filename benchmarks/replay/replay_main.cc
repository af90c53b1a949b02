// Replays the Mooncake conversation trace through a KVCacheManager: continuous
// batching with chunked prefill, one-token decode steps, preemption on a full
// pool, synthetic K/V for every layer. Prints a report (README.md, "Main job:
// trace replay"); --json writes it as JSON too.
//
//   bazel run -c opt //benchmarks/replay:replay -- --backend=cuda
//   --max_requests=0

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "benchmarks/replay/group_replay.h"
#include "benchmarks/replay/kv_writer.h"
#include "benchmarks/replay/model_presets.h"
#include "benchmarks/replay/progress.h"
#include "benchmarks/replay/replay_report.h"
#include "benchmarks/replay/replay_scheduler.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "storage/device.h"
#include "testing/trace.h"

ABSL_FLAG(std::string, trace, "data/mooncake_conversation_trace.jsonl",
          "Mooncake trace (JSONL). A relative path is tried against "
          "$BUILD_WORKSPACE_DIRECTORY (bazel run), then the working "
          "directory; $KVCACHE_DATA_DIR/mooncake_conversation_trace.jsonl "
          "is tried last.");
ABSL_FLAG(int64_t, max_requests, 3000,
          "Replay the first N requests of the trace; 0 = all (12,031).");
ABSL_FLAG(bool, back_to_back, false,
          "Ignore timestamps: every request arrives at time 0.");
ABSL_FLAG(double, step_ms, 50.0,
          "Simulated model time per step: arrivals are compared with a clock "
          "that advances this much per step (idle gaps are skipped).");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda.");
ABSL_FLAG(int, device, 0, "CUDA device ordinal.");
ABSL_FLAG(int, num_layers, 2,
          "Model layers (a small default shape, so that the default run on a "
          "CPU reaches far enough into the trace for its prefixes to repeat; "
          "a Llama-3-8B-like shape is 32 layers, 8 KV heads, head size 128).");
ABSL_FLAG(int, num_kv_heads, 2, "KV heads.");
ABSL_FLAG(int, head_size, 64, "Head size of K (and V).");
ABSL_FLAG(std::string, cache_dtype, "int8",
          "int8, fp8 (e4m3), bf16 or fp16. K/V input is bf16 (fp16 for an "
          "fp16 cache).");
ABSL_FLAG(int, block_size, 16, "Tokens per block.");
ABSL_FLAG(int64_t, num_blocks, 16384,
          "Pool capacity in blocks (shared by all layers); 0 = use "
          "--memory_fraction.");
ABSL_FLAG(double, memory_fraction, 0.0,
          "Capacity as a fraction of free device memory (with "
          "--num_blocks=0).");
ABSL_FLAG(int, max_running, 64, "Most requests running at once.");
ABSL_FLAG(int64_t, token_budget, 2048, "Tokens per step (prefill + decode).");
ABSL_FLAG(int, error_samples, 64,
          "Committed blocks gathered back to measure the quantization error.");
ABSL_FLAG(bool, attention, false,
          "After each step's Commit, run KVCacheManager::Attention over every "
          "layer for the step's sequences (one query token each, GQA "
          "--attention_group) and report its time per step.");
ABSL_FLAG(int, attention_group, 4, "Query heads per KV head for --attention.");
ABSL_FLAG(bool, cuda_graph, false,
          "Run steps of decode tokens only as graph steps: ReserveGraphStep "
          "padded to a power of two, every layer's fill and Append captured "
          "once per padded size in a CUDA graph and replayed (--backend=cuda). "
          "The report gives the host time of decode-only steps either way.");
ABSL_FLAG(bool, pipeline, true,
          "Plan, enqueue and commit step N+1 while the device runs the steps "
          "before it (up to --steps_in_flight in flight), as an engine's "
          "asynchronous scheduling does; false: wait for each step's kernels "
          "before its Commit and the next plan.");
ABSL_FLAG(int, steps_in_flight, 3,
          "--pipeline: steps enqueued before the host waits for the oldest, "
          "in [2, 8] (2: the host plans one step ahead; more than the "
          "manager's max_inflight_plans, 4, makes Reserve wait for uploads).");
ABSL_FLAG(int, spec_tokens, 0,
          "Speculative decoding: draft tokens reserved per decode step; "
          "accepted = 1 + (request + step) % (k + 1) of the 1 + k tokens "
          "(see replay_scheduler.h).");
ABSL_FLAG(std::string, model, "",
          "A model preset with layer groups (llama3-8b, gemma3-27b, "
          "gpt-oss-120b, deepseek-v3): replays the trace through the layer "
          "groups' allocator (no K/V data) and reports KV bytes per token, "
          "peak pages per group, the hit rate and memory per 1k tokens of "
          "context against every layer full (README \"Layer groups\").");
ABSL_FLAG(double, model_kv_gib, 16.0,
          "--model: the pool's size in GiB of pages.");
ABSL_FLAG(int64_t, context_tokens, 32768,
          "--model: the context length of the per-1k-tokens figure.");
ABSL_FLAG(double, host_tier_gb, 2.0,
          "Host tier behind the cache, in GiB of host memory (pinned on CUDA); "
          "0 = none.");
ABSL_FLAG(bool, async_onboard, true,
          "Host tier: a request whose prefix is still being copied in from "
          "the tier sits out the steps until it lands "
          "(KVCacheManager::PrefixLoaded), so other requests' steps hide the "
          "copy; false: it joins at once and its step waits for the copy.");
ABSL_FLAG(int32_t, tier_offload_min_hits,
          kvcache::KVCacheConfig().tier_offload_min_hits,
          "Host tier: offload only evicted blocks with at least this many "
          "prefix hits (KVCacheConfig::tier_offload_min_hits; 0 = all).");
ABSL_FLAG(double, tier_offload_max_in_flight_mb,
          static_cast<double>(
              kvcache::KVCacheConfig().tier_offload_max_in_flight_bytes) /
              (1 << 20),
          "Host tier: MiB of copies in flight past which evicted blocks are "
          "dropped, not offloaded (tier_offload_max_in_flight_bytes; 0 = no "
          "bound).");
ABSL_FLAG(int64_t, tier_offload_ahead_blocks,
          kvcache::KVCacheConfig().tier_offload_ahead_blocks,
          "Offload ahead: cached blocks next in line for eviction copied to "
          "the tier before it (KVCacheConfig::tier_offload_ahead_blocks; -1 = "
          "1/16 of the cache, 0 = off).");
ABSL_FLAG(int32_t, tier_copy_thread_blocks,
          kvcache::KVCacheConfig().tier_copy_thread_blocks,
          "Host tier on CUDA: thread blocks per copy kernel; 0 = the copy "
          "engines (KVCacheConfig::tier_copy_thread_blocks).");
ABSL_FLAG(bool, tier_hold_offloads, kvcache::KVCacheConfig().tier_hold_offloads,
          "Host tier: hold an offloaded block until its copy is done instead "
          "of reusing it at once (KVCacheConfig::tier_hold_offloads).");
ABSL_FLAG(std::string, json, "", "Also write the report as JSON to this path.");
ABSL_FLAG(double, progress_interval_s, 10.0,
          "Seconds between progress lines when stderr is not a terminal.");

namespace kvcache::replay {
namespace {

std::string ResolveTrace(const std::string& flag) {
  std::vector<std::string> candidates;
  if (!flag.empty() && flag[0] != '/') {
    if (const char* ws = std::getenv("BUILD_WORKSPACE_DIRECTORY")) {
      candidates.push_back(absl::StrCat(ws, "/", flag));
    }
  }
  candidates.push_back(flag);
  if (const char* dir = std::getenv("KVCACHE_DATA_DIR")) {
    candidates.push_back(
        absl::StrCat(dir, "/mooncake_conversation_trace.jsonl"));
  }
  for (const std::string& path : candidates) {
    if (access(path.c_str(), R_OK) == 0) return path;
  }
  return flag;
}

absl::StatusOr<KVCacheConfig> MakeConfig() {
  KVCacheConfig config;
  config.num_layers = absl::GetFlag(FLAGS_num_layers);
  config.num_kv_heads = absl::GetFlag(FLAGS_num_kv_heads);
  config.head_size = absl::GetFlag(FLAGS_head_size);
  config.block_size = absl::GetFlag(FLAGS_block_size);
  absl::StatusOr<DType> dtype = ParseDType(absl::GetFlag(FLAGS_cache_dtype));
  if (!dtype.ok()) return dtype.status();
  config.cache_dtype = *dtype;
  config.input_dtype =
      *dtype == DType::kFloat16 ? DType::kFloat16 : DType::kBFloat16;
  const std::string backend = absl::GetFlag(FLAGS_backend);
  if (backend != "cpu" && backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend ", backend, " is not cpu or cuda"));
  }
  config.backend = backend == "cuda" ? Backend::kCuda : Backend::kCpu;
  config.device = absl::GetFlag(FLAGS_device);
  config.num_blocks = absl::GetFlag(FLAGS_num_blocks);
  if (config.num_blocks == 0) {
    config.memory_fraction = absl::GetFlag(FLAGS_memory_fraction);
  }
  config.max_tokens_per_step =
      static_cast<int32_t>(absl::GetFlag(FLAGS_token_budget));
  config.max_sequences_per_step = std::max(1, absl::GetFlag(FLAGS_max_running));
  config.logger_name = "replay";
  const double tier_gb = absl::GetFlag(FLAGS_host_tier_gb);
  if (!(tier_gb >= 0.0 && tier_gb < 1e6)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--host_tier_gb ", tier_gb, " is not in [0, 1e6)"));
  }
  config.host_tier_bytes = static_cast<int64_t>(tier_gb * (1 << 30));
  config.tier_offload_min_hits = absl::GetFlag(FLAGS_tier_offload_min_hits);
  const double in_flight_mb =
      absl::GetFlag(FLAGS_tier_offload_max_in_flight_mb);
  if (!(in_flight_mb >= 0.0 && in_flight_mb < 1e9)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tier_offload_max_in_flight_mb ", in_flight_mb,
                     " is not in [0, 1e9)"));
  }
  config.tier_offload_max_in_flight_bytes =
      static_cast<int64_t>(in_flight_mb * (1 << 20));
  config.tier_hold_offloads = absl::GetFlag(FLAGS_tier_hold_offloads);
  config.tier_offload_ahead_blocks =
      absl::GetFlag(FLAGS_tier_offload_ahead_blocks);
  config.tier_copy_thread_blocks = absl::GetFlag(FLAGS_tier_copy_thread_blocks);
  if (absl::GetFlag(FLAGS_cuda_graph)) {
    if (config.backend != Backend::kCuda) {
      return absl::InvalidArgumentError("--cuda_graph needs --backend=cuda");
    }
    config.graph_max_tokens =
        std::min(config.max_tokens_per_step, config.max_sequences_per_step);
  }
  if (absl::GetFlag(FLAGS_attention)) {
    config.num_q_heads =
        config.num_kv_heads * absl::GetFlag(FLAGS_attention_group);
  }
  return config;
}

// --model: the trace through the layer groups' allocator.
absl::Status RunModel(const std::vector<TraceRequest>& trace) {
  const std::string model = absl::GetFlag(FLAGS_model);
  absl::StatusOr<DType> dtype = ParseDType(absl::GetFlag(FLAGS_cache_dtype));
  if (!dtype.ok()) return dtype.status();
  absl::StatusOr<std::vector<LayerGroup>> groups = ModelPreset(model, *dtype);
  if (!groups.ok()) return groups.status();
  KVCacheConfig config;
  config.num_layers = 0;
  for (const LayerGroup& g : *groups) {
    config.num_layers += static_cast<int32_t>(g.layers.size());
  }
  config.layer_groups = *groups;
  config.block_size = absl::GetFlag(FLAGS_block_size);
  config.cache_dtype = *dtype;
  config.input_dtype =
      *dtype == DType::kFloat16 ? DType::kFloat16 : DType::kBFloat16;
  config.num_blocks = 1;
  if (absl::Status s = ValidateConfig(config); !s.ok()) return s;
  GroupReplayOptions options;
  options.token_budget = absl::GetFlag(FLAGS_token_budget);
  options.max_running = absl::GetFlag(FLAGS_max_running);
  options.kv_bytes =
      static_cast<int64_t>(absl::GetFlag(FLAGS_model_kv_gib) * (1 << 30));
  options.context_tokens = absl::GetFlag(FLAGS_context_tokens);
  if (options.token_budget < 1 || options.context_tokens < 1) {
    return absl::InvalidArgumentError(
        "--token_budget and --context_tokens must be >= 1");
  }
  absl::StatusOr<GroupReplayReport> report =
      RunGroupReplay(model, config, trace, options);
  if (!report.ok()) return report.status();
  std::fputs(FormatGroupReport(*report).c_str(), stdout);
  return absl::OkStatus();
}

absl::Status Run() {
  const std::string path = ResolveTrace(absl::GetFlag(FLAGS_trace));
  absl::StatusOr<std::vector<TraceRequest>> trace = LoadTrace(path);
  if (!trace.ok()) return trace.status();
  const int64_t max_requests = absl::GetFlag(FLAGS_max_requests);
  if (max_requests > 0 && static_cast<int64_t>(trace->size()) > max_requests) {
    trace->resize(max_requests);
  }
  std::stable_sort(trace->begin(), trace->end(),
                   [](const TraceRequest& a, const TraceRequest& b) {
                     return a.timestamp_ms < b.timestamp_ms;
                   });
  if (!absl::GetFlag(FLAGS_model).empty()) return RunModel(*trace);
  absl::StatusOr<KVCacheConfig> config = MakeConfig();
  if (!config.ok()) return config.status();
  std::unique_ptr<Device> device;
  if (config->backend == Backend::kCuda) {
    absl::StatusOr<std::unique_ptr<Device>> cuda =
        CreateCudaDevice(config->device);
    if (!cuda.ok()) return cuda.status();
    device = *std::move(cuda);
  } else {
    device = CreateCpuDevice();
  }
  absl::StatusOr<std::unique_ptr<KVCacheManager>> manager =
      KVCacheManager::Create(*config);
  if (!manager.ok()) return manager.status();
  const int steps_in_flight = absl::GetFlag(FLAGS_steps_in_flight);
  if (steps_in_flight < 2 || steps_in_flight > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--steps_in_flight ", steps_in_flight, " is not in [2, 8]"));
  }
  const bool pipeline = absl::GetFlag(FLAGS_pipeline);
  absl::StatusOr<std::unique_ptr<KvWriter>> writer = KvWriter::Create(
      manager->get(), device.get(), absl::GetFlag(FLAGS_token_budget),
      pipeline ? steps_in_flight : 1);
  if (!writer.ok()) return writer.status();

  SchedulerOptions options;
  options.token_budget = absl::GetFlag(FLAGS_token_budget);
  options.max_running = absl::GetFlag(FLAGS_max_running);
  options.back_to_back = absl::GetFlag(FLAGS_back_to_back);
  options.step_ms = absl::GetFlag(FLAGS_step_ms);
  options.error_samples = absl::GetFlag(FLAGS_error_samples);
  options.attention = absl::GetFlag(FLAGS_attention);
  options.spec_tokens = absl::GetFlag(FLAGS_spec_tokens);
  options.cuda_graph = absl::GetFlag(FLAGS_cuda_graph);
  options.pipeline = pipeline;
  options.steps_in_flight = steps_in_flight;
  options.async_onboard = absl::GetFlag(FLAGS_async_onboard);
  if (options.spec_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--spec_tokens ", options.spec_tokens, " must be >= 0"));
  }
  spdlog::get("replay")->info("replaying {} requests of {}", trace->size(),
                              path);
  Scheduler scheduler(manager->get(), writer->get(), *std::move(trace),
                      options);
  Progress progress(stderr, scheduler.stats().requests_total,
                    absl::GetFlag(FLAGS_progress_interval_s));
  const auto start = std::chrono::steady_clock::now();
  while (!scheduler.Done()) {
    if (absl::Status s = scheduler.Step(); !s.ok()) return s;
    const ReplayStats& stats = scheduler.stats();
    progress.Update(stats.requests_finished + stats.requests_rejected,
                    stats.tokens_appended());
  }
  const double wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  const ReplayStats& stats = scheduler.stats();
  progress.Finish(stats.requests_finished + stats.requests_rejected,
                  stats.tokens_appended());
  if (absl::Status s = (*manager)->Validate(); !s.ok()) return s;

  ReplayReport report = MakeReport(stats, (*manager)->Metrics(),
                                   (*writer)->BytesPerToken(), wall_s);
  report.backend = absl::GetFlag(FLAGS_backend);
  report.cache_dtype = std::string(DTypeName(config->cache_dtype));
  report.num_layers = config->num_layers;
  report.spec_tokens = options.spec_tokens;
  report.cuda_graph = options.cuda_graph;
  report.pipeline = options.pipeline;
  report.steps_in_flight = options.steps_in_flight;
  report.async_onboard = options.async_onboard;
  std::fputs(ReportText(report).c_str(), stdout);
  const std::string json_path = absl::GetFlag(FLAGS_json);
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << ReportJson(report);
    if (!out) {
      return absl::InternalError(absl::StrCat("cannot write ", json_path));
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvcache::replay

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  // The manager logs through "replay", on stderr, so stdout is the report.
  spdlog::stderr_color_mt("replay");
  const absl::Status status = kvcache::replay::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "replay: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
