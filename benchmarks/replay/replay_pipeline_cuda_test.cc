// The pipelined replay on the CUDA backend: the host plans and commits step
// N+1 while the device runs step N, with blocks freed, evicted, reused,
// offloaded to the host tier and onboarded from it while earlier steps'
// kernels may still run. Every finished request's committed blocks are
// gathered back and compared with the exact input: a block rewritten before
// its readers ran, or read before its writers did, shows as an error far
// above int8 rounding.

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "benchmarks/replay/kv_writer.h"
#include "benchmarks/replay/replay_scheduler.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/cuda_test_util.h"
#include "testing/trace.h"

namespace kvcache::replay {
namespace {

constexpr int kLayers = 4;

// `n` requests in conversations of a few turns (a hash id per 512 prompt
// tokens, later turns extending earlier prompts), drawn from `seed`.
std::vector<TraceRequest> RandomTrace(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  std::vector<TraceRequest> trace;
  for (int i = 0; i < n; ++i) {
    TraceRequest r;
    const int conversation = static_cast<int>(rng() % (n / 4 + 1));
    r.input_length = 40 + static_cast<int64_t>(rng() % 1400);
    r.output_length = 1 + static_cast<int64_t>(rng() % 24);
    for (int64_t b = 0; b * kTraceBlockTokens < r.input_length; ++b) {
      r.hash_ids.push_back(10000 * (conversation + 1) + b);
    }
    trace.push_back(r);
  }
  return trace;
}

struct ReplayRun {
  std::unique_ptr<KVCacheManager> manager;
  std::unique_ptr<KvWriter> writer;
  ReplayStats stats;
};

// `depth`: steps in flight (1: each step waited for before its Commit).
ReplayRun Replay(const std::vector<TraceRequest>& trace, int depth,
                 bool cuda_graph, int64_t tier_blocks, Device* device) {
  KVCacheConfig config;
  config.backend = Backend::kCuda;
  config.num_layers = kLayers;
  config.num_kv_heads = 2;
  config.head_size = 64;
  config.block_size = 16;
  config.cache_dtype = DType::kInt8;
  config.num_blocks = 160;  // Evicts and preempts.
  config.max_tokens_per_step = 256;
  config.max_sequences_per_step = 16;
  if (cuda_graph) config.graph_max_tokens = 16;
  if (tier_blocks > 0) {
    config.host_tier_bytes = tier_blocks * BlockBytesAllLayers(config).value();
    config.tier_offload_min_hits = 0;
  }
  ReplayRun run;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> manager =
      KVCacheManager::Create(config);
  EXPECT_TRUE(manager.ok()) << manager.status();
  if (!manager.ok()) return run;
  run.manager = *std::move(manager);
  run.writer = KvWriter::Create(run.manager.get(), device, 256, depth).value();
  SchedulerOptions options;
  options.token_budget = 256;
  options.max_running = 16;
  options.back_to_back = true;
  options.error_samples = static_cast<int>(trace.size());  // Every request.
  options.pipeline = depth > 1;
  options.steps_in_flight = std::max(depth, 2);
  options.cuda_graph = cuda_graph;
  Scheduler scheduler(run.manager.get(), run.writer.get(), trace, options);
  for (int i = 0; i < 1000000 && !scheduler.Done(); ++i) {
    const absl::Status s = scheduler.Step();
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) break;
  }
  EXPECT_TRUE(scheduler.Done());
  EXPECT_TRUE(run.manager->Validate().ok());
  EXPECT_EQ(run.writer->steps_in_flight(), 0);
  run.stats = scheduler.stats();
  return run;
}

TEST(ReplayPipelineCudaTest, PipelinedStepsGatherWhatWaitedStepsGather) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const std::vector<TraceRequest> trace = RandomTrace(seed, 120);
  std::unique_ptr<Device> device = CreateCudaDevice(0).value();
  for (bool graph : {false, true}) {
    SCOPED_TRACE(graph ? "cuda_graph" : "plain steps");
    const ReplayRun waited = Replay(trace, 1, graph, 0, device.get());
    for (int depth : {2, 3}) {
      SCOPED_TRACE(absl::StrCat(depth, " steps in flight"));
      const ReplayRun piped = Replay(trace, depth, graph, 0, device.get());
      const ReplayStats& x = waited.stats;
      const ReplayStats& y = piped.stats;
      EXPECT_EQ(y.requests_finished + y.requests_rejected, 120);
      EXPECT_GT(y.preemptions + y.prefix_hit_tokens, 0);
      EXPECT_GT(piped.manager->Metrics().evictions, 0);
      if (graph) {
        EXPECT_GT(y.graph_steps, 0);
      }
      // The same manager calls in the same order: the same decisions.
      EXPECT_EQ(y.steps, x.steps);
      EXPECT_EQ(y.prefix_hit_tokens, x.prefix_hit_tokens);
      EXPECT_EQ(y.preemptions, x.preemptions);
      EXPECT_EQ(y.tokens_appended(), x.tokens_appended());
      // And the same bytes gathered back: the same error, to the bit.
      EXPECT_GT(y.error.samples, 60);
      EXPECT_EQ(y.error.tokens, x.error.tokens);
      EXPECT_EQ(y.error.error_sq, x.error.error_sq);
      EXPECT_LT(y.error.RelativeL2(), 1e-2);
      EXPECT_GT(y.error.RelativeL2(), 3e-3);
    }
  }
}

// With the host tier, whether a request's prefix has landed depends on the
// copies' timing, so the runs may differ; each must still read back only
// its own bytes.
TEST(ReplayPipelineCudaTest, PipelinedStepsWithTheHostTierReadBackTheInput) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const std::vector<TraceRequest> trace = RandomTrace(seed, 120);
  std::unique_ptr<Device> device = CreateCudaDevice(0).value();
  for (bool graph : {false, true}) {
    SCOPED_TRACE(graph ? "cuda_graph" : "plain steps");
    const ReplayRun piped = Replay(trace, 2, graph, 256, device.get());
    const ReplayStats& y = piped.stats;
    const MetricsSnapshot m = piped.manager->Metrics();
    EXPECT_EQ(y.requests_finished + y.requests_rejected, 120);
    EXPECT_GT(m.tier_offloads, 0);
    EXPECT_GT(y.prefix_hit_tokens_host, 0);
    if (!graph) {  // A graph replay's appends are not counted (README).
      EXPECT_EQ(m.tokens_appended, kLayers * y.tokens_appended());
    }
    EXPECT_GT(y.error.samples, 60);
    EXPECT_LT(y.error.RelativeL2(), 1e-2);
    EXPECT_GT(y.error.RelativeL2(), 3e-3);
  }
}

}  // namespace
}  // namespace kvcache::replay
