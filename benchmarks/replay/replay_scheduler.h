// Scheduler replays a Mooncake trace through a KVCacheManager the way a
// serving engine's continuous-batching loop would. Each Step:
//   1. Requests whose arrival time has come join the waiting queue (by
//      timestamp on a simulated clock that advances step_ms per step and skips
//      idle gaps, or all at once with back_to_back).
//   2. Running requests, oldest first, take tokens from the step's budget: one
//      token each when decoding, a chunk of the rest of the prompt otherwise.
//   3. While budget and running slots remain, the oldest waiting request is
//      added (its prompt from TraceToken; the prefix cache skips what it
//      holds) and given a prefill chunk, if the pool can hold the batch.
//   4. Reserve the batch. On ResourceExhausted the newest running request is
//      preempted (freed, requeued at the front of the waiting queue to be
//      recomputed later: prompt plus the tokens it had decoded) and Reserve is
//      retried without it.
//   5. KvWriter appends every layer; Commit. A request that has decoded
//      output_length tokens is freed (after an optional quantization-error
//      sample of one committed block).
//   6. With pipeline (the default), the step returns while up to
//      steps_in_flight - 1 steps (itself included) have not finished on the
//      device: with 2, the host plans, enqueues and commits step N+1 while
//      the device runs step N, as an engine's asynchronous scheduling does
//      (nothing the host decides depends on a step's device results: the
//      tokens come from the trace). Without it, each step waits for its own
//      kernels before its Commit. The manager calls and their order are the
//      same either way.
// A request that cannot fit in the whole pool (prompt + output) is rejected
// and counted.
//
// Speculative decoding (spec_tokens = k > 0): a decode step reserves the
// sampled token plus up to k draft tokens (fewer near the end of the output
// or of the budget), appends all of them and commits with
// Commit(plan, accepted), where the deterministic acceptance pattern is
//
//   accepted = 1 + (trace index + step) % (k + 1)     (capped at 1 + drafts)
//
// so the sampled token is always kept and 0..k drafts are accepted, each
// count as often over a run. Accepted drafts carry the request's true next
// output ids (DecodeToken); rejected ones a different id, and are rolled back
// (never hashed or shared). Decode steps pass a deterministic token id per (request, output
// index) as new_token_ids.
//
// cuda_graph: a step of decode tokens only (no prefill chunk, no drafts) is
// a graph step: ReserveGraphStep padded to the next power of two (at most
// max_running) on KvWriter's stream, then the graph of that size (captured
// the first time) is launched, then Commit. Not thread-safe.

#ifndef KVCACHE_BENCHMARKS_REPLAY_REPLAY_SCHEDULER_H_
#define KVCACHE_BENCHMARKS_REPLAY_REPLAY_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/kv_cache_manager.h"
#include "benchmarks/replay/kv_writer.h"
#include "testing/trace.h"

namespace kvcache::replay {

struct SchedulerOptions {
  int64_t token_budget = 2048;  // Tokens per step, prefill and decode.
  int max_running = 64;         // Requests running at once.
  bool back_to_back = false;    // Ignore timestamps: all arrive at time 0.
  double step_ms = 50.0;        // Simulated time per step.
  int error_samples = 64;       // Blocks gathered for the error figure.
  bool attention = false;       // Attention over every layer after each Commit.
  int spec_tokens = 0;          // Draft tokens per decode step (0: none).
  // Steps of decode tokens only run as graph steps (ReserveGraphStep padded
  // to the next power of two, at most max_running; KvWriter::GraphStep).
  bool cuda_graph = false;
  // Plan step N+1 while the device runs step N (step 6 above), with at most
  // steps_in_flight steps enqueued (capped by the writer's
  // max_steps_in_flight).
  bool pipeline = true;
  int steps_in_flight = 2;
  // A request whose prefix hit is still being onboarded from the host tier
  // (KVCacheManager::PrefixLoaded false) sits out the steps until it lands,
  // as an engine's asynchronous KV loading does, unless every running
  // request is loading; false: it joins at once and its step waits on the
  // copy.
  bool async_onboard = true;
};

struct ReplayStats {
  int64_t requests_total = 0;
  int64_t requests_finished = 0;
  int64_t requests_rejected = 0;  // Larger than the whole pool.
  int64_t steps = 0;
  int64_t prompt_tokens = 0;           // At first admission.
  int64_t prefix_hit_tokens = 0;       // Of those, found in the prefix cache.
  int64_t prefix_hit_tokens_host = 0;  // Of those, from the host tier.
  int64_t prefill_tokens = 0;    // Prompt tokens computed (all admissions).
  int64_t recompute_tokens = 0;  // Of those, recomputed after preemption.
  int64_t decode_tokens = 0;     // Output tokens appended.
  int64_t preemptions = 0;
  int64_t draft_tokens_accepted = 0;  // Speculative drafts kept.
  int64_t draft_tokens_rejected = 0;  // Appended, then rolled back.
  int64_t peak_blocks_in_use = 0;
  double simulated_ms = 0.0;
  double kernel_ms = 0.0;  // Summed over steps.
  // The steps' wall time by part, summed over steps: admission and Reserve,
  // the writer's enqueue (uploads, fills, Append calls), waiting for
  // kernels (the step's own, or with pipeline the step before's), Commit,
  // and finishing requests (Free).
  double plan_ms = 0.0;
  // Of plan_ms, the manager calls: AddSequence, CanReserve, Reserve (or
  // ReserveGraphStep, with preemptions' retries) and PrefixLoaded.
  double plan_add_ms = 0.0;
  double plan_can_reserve_ms = 0.0;
  double plan_reserve_ms = 0.0;
  double plan_loaded_ms = 0.0;
  double enqueue_ms = 0.0;
  double append_calls_ms = 0.0;  // Of enqueue_ms: the Append calls.
  double wait_ms = 0.0;
  double commit_ms = 0.0;
  double finish_ms = 0.0;
  // Device time of the steps (AppendTiming::device_ms), and the device time
  // beyond the Appends' kernels in steps whose Reserve or admission had an
  // evicted block's offload waited for (tier_offloads_waited grew) and in
  // the other steps.
  double device_ms = 0.0;
  double device_extra_waited_ms = 0.0;
  double device_extra_other_ms = 0.0;
  // Device time from each step's plan to its first work
  // (AppendTiming::before_ms; CUDA only).
  double device_before_ms = 0.0;
  int64_t steps_waited = 0;
  std::vector<double> step_host_ms;  // Manager calls per step (host wall time).
  // Of those, the steps of decode tokens only (graph steps with --cuda_graph).
  std::vector<double> decode_step_host_ms;
  int64_t graph_steps = 0;
  // async_onboard: steps a running request sat out waiting for its prefix,
  // and the requests that did so at their admission.
  int64_t onboard_deferrals = 0;
  int64_t requests_deferred = 0;
  std::vector<double> attention_ms;  // --attention: all layers, per step.
  ErrorTotals error;

  int64_t tokens_appended() const {
    return prefill_tokens + decode_tokens + draft_tokens_rejected;
  }
};

// The id decode step `index` of request `request` appends.
TokenId DecodeToken(int64_t request, int64_t index);

class Scheduler {
 public:
  // Borrows manager and writer. `requests` sorted by timestamp.
  Scheduler(KVCacheManager* manager, KvWriter* writer,
            std::vector<TraceRequest> requests, SchedulerOptions options);
  ~Scheduler();

  // Every request finished or rejected and every step waited for.
  bool Done() const;
  absl::Status Step();
  const ReplayStats& stats() const { return stats_; }

 private:
  struct Request;
  struct Entry {
    Request* request;
    int64_t num_tokens;
    bool decode;
    int64_t drafts = 0;    // Of num_tokens (decode with speculation).
    int64_t accepted = 0;  // Tokens Commit keeps.
  };

  // Waits for steps in flight until at most `keep` remain, adding their
  // timing to the stats.
  absl::Status WaitSteps(size_t keep);
  void Arrive();
  // The running requests' entries, oldest first, within *budget; those
  // still loading their prefix sit out unless include_loading.
  absl::Status BuildRunningEntries(std::vector<Entry>* entries, int64_t* budget,
                                   bool include_loading);
  // Whether `r`'s prefix is still being onboarded (updates r->loading).
  absl::StatusOr<bool> StillLoading(Request* r);
  absl::Status AdmitWaiting(std::vector<Entry>* entries, int64_t* budget);
  absl::Status Preempt(std::vector<Entry>* entries);
  absl::Status Finish(Request* request);
  std::vector<ReserveRequest> ToReserve(
      const std::vector<Entry>& entries) const;
  // The i-th token a decode entry reserves: the sampled one, then drafts.
  static TokenId StepToken(const Entry& e, int64_t i);

  KVCacheManager* manager_;
  KvWriter* writer_;
  std::vector<TraceRequest> trace_;
  SchedulerOptions options_;
  size_t next_arrival_ = 0;
  double now_ms_ = 0.0;
  int64_t next_sequence_id_ = 1;
  int64_t sample_every_ = 1;
  std::deque<std::unique_ptr<Request>> waiting_;
  std::vector<std::unique_ptr<Request>> running_;  // Admission order.
  // Per step in flight (oldest first): whether its plan waited for an
  // offload (tier_offloads_waited grew).
  std::deque<bool> in_flight_waited_;
  ReplayStats stats_;
};

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_REPLAY_SCHEDULER_H_
