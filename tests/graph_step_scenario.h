// Test-only scenario of decode steps for the graph-capturable step (issue
// #14): sequences from a few prompt families (so later ones hit the prefix
// cache), forks (copy-on-write at their next step), frees, prefills, and
// decode steps of 1..capture_tokens sequences padded to capture_tokens. The
// scenario makes every decision and every K/V value from its seed; a
// StepRunner carries the steps out (plain Reserve/Append/Commit, the graph
// step eagerly, or a captured CUDA graph), so runs of the same seed must leave
// byte-identical caches and scales.

#ifndef KVCACHE_TESTS_GRAPH_STEP_SCENARIO_H_
#define KVCACHE_TESTS_GRAPH_STEP_SCENARIO_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "api/kv_cache_manager.h"

namespace kvcache::testing {

struct ScenarioOptions {
  uint64_t seed = 1;
  int steps = 200;             // Decode steps.
  int64_t capture_tokens = 8;  // Every decode step is padded to this.
  int num_layers = 4;
  int num_kv_heads = 2;
  int head_size = 64;
  int head_size_v = 32;
  int block_size = 4;
  DType cache_dtype = DType::kInt8;
  // > 0: layer groups of this shape, every layer but the last a sliding
  // window of this many tokens, the last full attention (one block table
  // per layer); 0: the uniform config.
  int32_t sliding_window = 0;
};

// One step's K/V on the host, bf16 bits per layer: k[layer] [rows, heads,
// head_size], v[layer] [rows, heads, head_size_v]. Rows past the step's
// tokens (padding) hold values too, which must never reach the cache.
struct StepKV {
  int64_t rows = 0;
  std::vector<std::vector<uint16_t>> k, v;
};

class StepRunner {
 public:
  virtual ~StepRunner() = default;
  // Reserve(batch), an Append of every layer, Commit.
  virtual absl::Status Prefill(KVCacheManager& m,
                               absl::Span<const ReserveRequest> batch,
                               const StepKV& kv) = 0;
  // A decode step of `batch` (one token each), kv.rows == padded tokens.
  virtual absl::Status Decode(KVCacheManager& m,
                              absl::Span<const ReserveRequest> batch,
                              int64_t padded, const StepKV& kv) = 0;
};

struct ScenarioCounts {
  int64_t decode_steps = 0, padded_steps = 0, prefills = 0, forks = 0,
          frees = 0, prefix_hit_tokens = 0, block_copies = 0;
};

// The manager config of the scenario: CPU or CUDA, with or without graph
// buffers (graph_max_tokens = capture_tokens).
KVCacheConfig ScenarioConfig(const ScenarioOptions& o, Backend backend,
                             bool graph);

// Runs the scenario on `m` through `runner`. The first unexpected status is
// returned, naming the step.
absl::Status RunScenario(const ScenarioOptions& o, KVCacheManager& m,
                         StepRunner& runner, ScenarioCounts* counts);

// Every layer's K cache, V cache and scales as bytes, read through
// `copy_to_host` (dst, src, bytes).
using CopyToHostFn = std::function<absl::Status(void*, const void*, size_t)>;
absl::StatusOr<std::vector<char>> CacheBytes(const KVCacheManager& m,
                                             const CopyToHostFn& copy_to_host);

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_GRAPH_STEP_SCENARIO_H_
