// KvWriter is the replay's stand-in for a model's forward pass: for a step's
// plan it generates every layer's synthetic K/V (SyntheticKv) in the backend's
// memory and appends it, timing the Append calls (device timing events on
// CUDA, the host clock on the CPU). It also gathers committed tokens back and
// accumulates their quantization error against the exact input.
//
// Steps in flight: AppendStep and GraphStep enqueue a step and return; its
// timing comes from WaitStep, which waits for the oldest step enqueued. Up to
// max_steps_in_flight() steps may be enqueued and not yet waited for (each
// has its own timing events and token staging), so the caller can plan and
// commit step N+1 while the device runs step N. On the CPU every step has
// finished when AppendStep returns.
//
// Not thread-safe: one scheduler drives it. Borrows the manager and device,
// which must outlive it.

#ifndef KVCACHE_BENCHMARKS_REPLAY_KV_WRITER_H_
#define KVCACHE_BENCHMARKS_REPLAY_KV_WRITER_H_

#include <cstdint>
#include <deque>
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
  // `max_tokens`: most tokens one step appends; `max_steps_in_flight`: steps
  // enqueued and not yet waited for, in [1, 8].
  static absl::StatusOr<std::unique_ptr<KvWriter>> Create(
      KVCacheManager* manager, Device* device, int64_t max_tokens,
      int max_steps_in_flight = 2);

  // Records the start of the next step's plan on the stream the step will
  // run on (the graph stream when `graph`), for AppendTiming::before_ms. CUDA
  // only (a no-op on the CPU). FailedPrecondition when max_steps_in_flight()
  // steps are in flight.
  absl::Status MarkPlanStart(bool graph);

  // Enqueues all layers of `tokens` (the plan's tokens, in batch order) and
  // returns the host time of the Append calls in ms. FailedPrecondition when
  // max_steps_in_flight() steps are in flight.
  absl::StatusOr<double> AppendStep(uint64_t plan_id,
                                    absl::Span<const TokenAt> tokens);

  // --cuda_graph (CUDA): the step of a plan from ReserveGraphStep(...,
  // padded, stream()): uploads the tokens (padding rows get token 0 at
  // position 0), then launches the graph of `padded` tokens, capturing it the
  // first time (every layer's synthetic fill and Append, on stream()).
  // Returns the launch's host time in ms; its timing's kernel_ms is the
  // graph's device time.
  absl::StatusOr<double> GraphStep(uint64_t plan_id,
                                   absl::Span<const TokenAt> tokens,
                                   int64_t padded);

  // Waits for the oldest step in flight and returns its timing.
  // FailedPrecondition when none is in flight.
  absl::StatusOr<AppendTiming> WaitStep();
  int steps_in_flight() const { return static_cast<int>(in_flight_.size()); }
  int max_steps_in_flight() const { return static_cast<int>(sets_.size()); }

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
  // returns the summed kernel time in ms. FailedPrecondition while a step
  // is in flight.
  absl::StatusOr<double> AttentionStep(absl::Span<const SequenceId> ids);

  const ErrorTotals& error() const { return error_; }
  // Bytes one token moves over all layers: K/V read plus cache and scales
  // written.
  int64_t BytesPerToken() const;

 private:
  KvWriter(KVCacheManager* manager, Device* device, int64_t max_tokens,
           int max_steps_in_flight);
  // The events and token staging of one step in flight; the sets are used in
  // turn.
  struct StepSet {
    Event step_start;  // Before the step's upload.
    Event plan_start;  // Before the step's plan (MarkPlanStart).
    bool plan_marked = false;
    // Around each layer's Append; a graph step uses [0] around its launch.
    std::vector<Event> starts, ends;
    bool graph = false;
    double host_ms = 0.0;   // The Append calls or the graph launch.
    Event tokens_uploaded;  // After the last upload from this set's staging.
  };

  absl::Status InitHost(size_t bytes);
  absl::Status InitDevice(size_t bytes);
  // The set the next step uses; FailedPrecondition while it is in flight.
  absl::StatusOr<StepSet*> NextSet();
  // Marks the next set's step, just enqueued, in flight.
  void Enqueued(bool graph, double host_ms);
  absl::Status UploadTokens(int set, absl::Span<const TokenAt> tokens,
                            int64_t padded = 0, void* stream = nullptr);
  absl::Status FillOnDevice(int layer, int64_t num_tokens,
                            void* stream = nullptr);
  // Token ids (int32) come first in the token buffers, then positions (int64)
  // from this int32 index on (8-byte aligned).
  int64_t PositionsOffset() const { return (max_tokens_ + 1) / 2 * 2; }
  // Bytes of one set's part of token_staging_ (64-byte aligned).
  size_t TokenBytes() const {
    const size_t bytes =
        PositionsOffset() * sizeof(int32_t) + max_tokens_ * sizeof(int64_t);
    return (bytes + 63) / 64 * 64;
  }

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
  // Pinned, one part per set: int32 tokens then int64 positions.
  Buffer token_staging_;
  // One step's tokens on the device, in the same layout: each step's upload
  // is ordered after the previous step's fills by its stream (the graph
  // stream blocks with the legacy default stream).
  Buffer device_tokens_;
  Buffer input_;
  std::vector<StepSet> sets_;
  int next_set_ = 0;
  std::deque<int> in_flight_;  // Sets of the steps in flight, oldest first.
  Buffer gather_out_;
  Buffer attention_q_, attention_out_;  // Made by the first AttentionStep.
  ErrorTotals error_;
  void* stream_ = nullptr;                                // --cuda_graph.
  std::map<int64_t, std::unique_ptr<StepGraph>> graphs_;  // By padded size.
};

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_KV_WRITER_H_
