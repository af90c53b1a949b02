// KvWriter is the replay's stand-in for a model's forward pass: for a step's
// plan it generates every layer's synthetic K/V (SyntheticKv) in the backend's
// memory and appends it, timing the Append calls (device timing events on
// CUDA, the host clock on the CPU). It also gathers committed tokens back and
// accumulates their quantization error against the exact input.
//
// Not thread-safe: one scheduler drives it. Borrows the manager and device,
// which must outlive it.

#ifndef KVCACHE_BENCHMARKS_REPLAY_KV_WRITER_H_
#define KVCACHE_BENCHMARKS_REPLAY_KV_WRITER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "api/kv_cache_manager.h"
#include "benchmarks/replay/step_graph.h"
#include "benchmarks/replay/synthetic_kv.h"
#include "benchmarks/replay/synthetic_kv_cuda.h"
#include "storage/device.h"

namespace kvcache::replay {

struct AppendTiming {
  double host_ms = 0.0;    // Wall time inside the Append calls.
  double kernel_ms = 0.0;  // Timed by events around each Append.
  double wait_ms = 0.0;    // Host wall time waiting for the step's kernels.
  // The step's device time from its token upload to its last Append's end
  // (uploads, synthetic fills, Appends and any wait between them).
  double device_ms = 0.0;
  // CUDA, after MarkPlanStart: device time from the plan's start to the
  // step's first work: the host's plan (the device idles) and whatever the
  // plan ordered the step's stream after (host-tier copies).
  double before_ms = 0.0;
};

struct ErrorTotals {
  double error_sq = 0.0;      // Sum of (gathered - exact)^2.
  double reference_sq = 0.0;  // Sum of exact^2.
  int64_t tokens = 0;         // Tokens gathered (each over all heads, K and V).
  int64_t samples = 0;        // Gather calls.
  double RelativeL2() const;
};

class KvWriter {
 public:
  // `max_tokens`: most tokens one step appends.
  static absl::StatusOr<std::unique_ptr<KvWriter>> Create(
      KVCacheManager* manager, Device* device, int64_t max_tokens);

  // Appends all layers of `tokens` (the plan's tokens, in batch order).
  absl::StatusOr<AppendTiming> AppendStep(uint64_t plan_id,
                                          absl::Span<const TokenAt> tokens);

  // --cuda_graph (CUDA): the step of a plan from ReserveGraphStep(...,
  // padded, stream()): uploads the tokens (padding rows get token 0 at
  // position 0), then launches the graph of `padded` tokens, capturing it the
  // first time (every layer's synthetic fill and Append, on stream()).
  // host_ms is the launch's host time; kernel_ms the graph's device time.
  // Records the start of a step's plan on the stream the step will run on
  // (the graph stream when `graph`), for AppendTiming::before_ms. CUDA only
  // (a no-op on the CPU).
  absl::Status MarkPlanStart(bool graph);

  absl::StatusOr<AppendTiming> GraphStep(uint64_t plan_id,
                                         absl::Span<const TokenAt> tokens,
                                         int64_t padded);
  // The stream graph steps run on (made by the first call; blocking, so
  // ordered with the legacy default stream the other steps use).
  absl::StatusOr<void*> stream();
  ~KvWriter();

  // Gathers committed tokens [begin, begin + tokens.size()) of `id` in
  // `layer` (tokens[i] is the token at begin + i) and adds their error.
  absl::Status SampleError(SequenceId id, int layer, int64_t begin,
                           absl::Span<const TokenAt> tokens);

  // --attention: KVCacheManager::Attention over every layer for `ids`, one
  // query token each (its last committed token), timed like the appends;
  // returns the summed kernel time in ms.
  absl::StatusOr<double> AttentionStep(absl::Span<const SequenceId> ids);

  const ErrorTotals& error() const { return error_; }
  // Bytes one token moves over all layers: K/V read plus cache and scales
  // written.
  int64_t BytesPerToken() const;

 private:
  KvWriter(KVCacheManager* manager, Device* device, int64_t max_tokens);
  absl::Status InitHost(size_t bytes);
  absl::Status InitDevice(size_t bytes);
  absl::Status UploadTokens(absl::Span<const TokenAt> tokens,
                            int64_t padded = 0, void* stream = nullptr);
  absl::Status FillOnDevice(int layer, int64_t num_tokens,
                            void* stream = nullptr);
  // Token ids (int32) come first in the token buffers, then positions (int64)
  // from this int32 index on (8-byte aligned).
  int64_t PositionsOffset() const { return (max_tokens_ + 1) / 2 * 2; }

  KVCacheManager* manager_;
  Device* device_;
  KVCacheConfig config_;
  SyntheticKv synthetic_;
  int64_t max_tokens_;
  int64_t k_row_ = 0;  // Elements of K per token (heads * head_size).
  int64_t v_row_ = 0;
  // CPU: one host buffer of a step's K/V, filled on the host for each layer.
  Buffer staging_;
  // CUDA: the table and one step's token ids and positions on the device; the
  // K/V of each layer is generated on the device into `input_`.
  Buffer device_table_;
  Buffer token_staging_;  // Pinned: int32 tokens then int64 positions.
  Buffer device_tokens_;  // The same layout on the device.
  Event tokens_uploaded_;
  Buffer input_;
  Event step_start_;  // Before a step's upload.
  Event plan_start_;  // Before a step's plan (MarkPlanStart).
  absl::StatusOr<double> TakeBeforeMs(const Event& first);
  bool plan_marked_ = false;
  std::vector<Event> starts_;
  std::vector<Event> ends_;
  Buffer gather_out_;
  Buffer attention_q_, attention_out_;  // Made by the first AttentionStep.
  ErrorTotals error_;
  void* stream_ = nullptr;                                // --cuda_graph.
  std::map<int64_t, std::unique_ptr<StepGraph>> graphs_;  // By padded size.
};

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_KV_WRITER_H_
