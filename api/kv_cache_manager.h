// KVCacheManager is the one object a serving engine talks to: it owns a paged
// KV cache (every layer's K/V caches and float32 scale caches, on the host or
// one CUDA GPU), the block allocator with its prefix cache, and the kernels
// that quantize K/V into the cache and read it back.
//
// A step, for a batch of sequences:
//
//   plan = Reserve({{seq, new tokens}, ...}, stream)   room for the tokens, all or nothing
//   for layer in layers:
//     Append(plan.id, layer, k, v, stream)             quantize and write one layer
//   Commit(plan.id)                                    the tokens count as computed
//
// Reserve fails with ResourceExhausted (changing nothing) when the batch does
// not fit now: preempt (Free) a sequence and retry. A request that can never
// fit (its sequence would need more blocks than the whole pool) fails with
// OutOfRange instead; both carry a Shortfall (GetShortfall, core/shortfall.h).
// Abort(plan.id) gives a plan's room back without committing.
//
// Speculative decoding: reserve the sampled token plus k draft tokens, append
// all of them, then Commit(plan.id, accepted) keeps each sequence's first
// accepted[i] tokens and rolls the rest back (never hashed, shared or visible
// to another sequence). Truncate rewinds committed tokens; RemoveFromPlan
// takes one sequence out of a plan in flight (preemption).
//
// Thread safety: every method may be called from any thread; one mutex
// serializes them. On the CUDA backend kernels and copies are enqueued on the
// caller's stream (a cudaStream_t passed as void*; nullptr = the legacy default
// stream) while the mutex is held, and return without waiting for them, except
// Gather, which waits for its own work (GatherAsync and GatherBatch do not). On the CPU backend everything runs
// before the call returns.
//
// Ownership: the manager owns all cache memory; the views it returns stay valid
// while it lives (BatchBlockTable's contents until the next BatchBlockTable
// call, the graph step's until the next ReserveGraphStep). Callers own their
// tensors.
//
// Errors: every call that fails returns a status whose message names the bad
// value and leaves the manager exactly as it was.

#ifndef KVCACHE_API_KV_CACHE_MANAGER_H_
#define KVCACHE_API_KV_CACHE_MANAGER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "api/attention_options.h"
#include "api/block_table_view.h"
#include "api/graph_step_inputs.h"
#include "api/kv_cache_config.h"
#include "api/layer_view.h"
#include "api/metrics.h"
#include "api/tensor_view.h"
#include "core/dtype.h"
#include "core/extra_key.h"
#include "core/ids.h"
#include "core/kv_event.h"
#include "core/plan_sequence.h"
#include "core/reserve_request.h"
#include "core/shortfall.h"

namespace kvcache {

class Device;
namespace internal {
class GroupManager;
}  // namespace internal

// Where the tokens AddSequence found computed came from (README "Host
// tier"): device_tokens + host_tokens is what AddSequence returns.
struct PrefixHits {
  int64_t device_tokens = 0;  // Shared blocks of the cache itself.
  int64_t host_tokens = 0;    // Blocks onboarded from the host tier.
};

// What Reserve hands back. The slot mapping lives in the backend's memory
// (device memory on CUDA, copied asynchronously on the Reserve stream) and
// stays valid until Commit or Abort.
struct StepPlanInfo {
  uint64_t id = 0;
  int64_t num_tokens = 0;  // Tokens reserved over the whole batch.
  const int64_t* slot_mapping = nullptr;   // [num_tokens], batch order.
  std::vector<int64_t> host_slot_mapping;  // The same slots, on the host.
  // ReserveGraphStep: the padded token count every Append of the step writes
  // (slot_mapping is then GraphStepInputs::slot_mapping); 0 for Reserve.
  int64_t graph_tokens = 0;
  // Copy-on-write copies (shared partial blocks after Fork), which Reserve
  // ran in every layer, data and scales, on its stream before it returned.
  int64_t num_block_copies = 0;
  // Per sequence, in batch order: where its tokens sit and their positions.
  std::vector<PlanSequence> sequences;
};

// One sequence's part of a batched Gather: tokens [token_begin, token_begin +
// num_tokens) of its cache (num_tokens 0: nothing).
struct GatherRequest {
  SequenceId sequence = 0;
  int64_t token_begin = 0;
  int64_t num_tokens = 0;
};

struct GatherOptions {
  // Also allow the tokens of the sequence's plan in flight that this layer
  // already holds (Appended, not yet committed): a layer-by-layer engine
  // attends over them before Commit. Not for a graph step whose Appends ran
  // only in a replayed graph (FailedPrecondition: the host never saw them).
  bool include_in_flight = false;
};

class KVCacheManager {
 public:
  // Validates the config, creates the backend, sizes the pool, allocates and
  // zeroes every layer's caches and scales once, and logs the layout and
  // capacity. InvalidArgument for a bad config, FailedPrecondition for a CUDA
  // backend without CUDA (build or device), ResourceExhausted when the memory
  // cannot be allocated.
  static absl::StatusOr<std::unique_ptr<KVCacheManager>> Create(
      const KVCacheConfig& config);

  KVCacheManager(const KVCacheManager&) = delete;
  KVCacheManager& operator=(const KVCacheManager&) = delete;
  ~KVCacheManager();

  // Sequence life cycle. AddSequence returns the prompt tokens already computed
  // (prefix cache).
  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra = {});
  // AddSequence that also says, in `*hits` (if not null), how many computed
  // tokens came from each tier. With a host tier, hits found there are
  // copied into fresh blocks of the cache (onboarded) on the manager's copy
  // stream; the sequence's next Reserve, Append, Gather or Attention is
  // ordered after that copy on its stream (a step waits only for the
  // onboards of its own sequences, and of prefix blocks they share). If the
  // copy cannot be made, the call fails, the sequence is not added and those
  // tier blocks are dropped.
  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra, PrefixHits* hits);
  // Whether `id`'s prefix has landed: false while a host-tier onboard that
  // fills one of its blocks is still copying (its own, or another sequence's
  // whose prefix blocks it hit), true otherwise (always without a tier). A
  // step that includes a sequence not yet loaded waits for its copy on the
  // step's stream; an engine that keeps such a sequence out of its steps
  // until it is loaded hides the copy behind the other sequences' work.
  // NotFound for an unknown id.
  absl::StatusOr<bool> PrefixLoaded(SequenceId id);
  absl::StatusOr<StepPlanInfo> Reserve(absl::Span<const ReserveRequest> batch,
                                       void* stream = nullptr);

  // The graph-capturable step (config.graph_max_tokens > 0; README "Decode
  // in a CUDA graph"). Reserve, then rewrite the fixed-address step inputs
  // (GraphStep()) on `stream` for this batch, padded to graph_tokens tokens
  // (the count a graph was, or will be, captured for). Copy-on-write copies
  // run here, on `stream`, before any replay, as in Reserve. Each Append of
  // the step must be given K/V of exactly graph_tokens tokens (padding rows
  // are skipped) and writes from GraphStep().slot_mapping; it records no
  // event and keeps no per-call state, so it can be captured in a CUDA graph
  // on `stream` and replayed with no host work. One graph step is in flight
  // at a time. Commit knows the step is complete because either every layer's
  // Append ran on the host for it (a capture, a warm-up, or no graph: checked
  // like any plan, naming a missing layer), or none did and a graph of
  // graph_tokens was captured and committed complete before (a replay).
  // Capturing records the kernels without running them: launch the graph
  // once before committing the capture's step. InvalidArgument for
  // graph_tokens outside [batch tokens, graph_max_tokens] or more sequences
  // than GraphStep().max_sequences; FailedPrecondition without graph buffers
  // or while another graph step is in flight; then Reserve's errors.
  absl::StatusOr<StepPlanInfo> ReserveGraphStep(
      absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
      void* stream = nullptr);
  // The graph step's buffers and limits (api/graph_step_inputs.h), fixed for
  // the manager's life: ask before capture which padded sizes may be used.
  // FailedPrecondition when config.graph_max_tokens is 0. With more than one
  // block table (layer groups) InvalidArgument: use GroupGraphStep.
  absl::StatusOr<GraphStepInputs> GraphStep() const;
  // With layer groups: table `table`'s graph-step inputs, its own slot
  // mapping and block table (released sliding-window entries kNullBlock)
  // beside the positions and lengths every table shares. The Append of a
  // graph step to layer l reads GroupGraphStep(LayerBlockTable(l))'s
  // slot_mapping; the tables' rows interleave in one buffer, so row_stride is
  // NumBlockTables() x the columns of a row (max_blocks_per_sequence).
  // Without groups, table 0 is GraphStep(). InvalidArgument for a table out
  // of [0, NumBlockTables()), then GraphStep's errors.
  absl::StatusOr<GraphStepInputs> GroupGraphStep(int32_t table) const;
  // Writes the plan's next key.shape[0] tokens of `layer` (key [T, H, D], value
  // [T, H, Dv], any token/head strides, unit last stride, input_dtype, in the
  // backend's memory). A plan's tokens may be appended in several calls per
  // layer, in batch order.
  absl::Status Append(uint64_t plan_id, int layer, const TensorView& key,
                      const TensorView& value, void* stream = nullptr);
  absl::Status Append(uint64_t plan_id, int layer, const DLTensor& key,
                      const DLTensor& value, void* stream = nullptr);
  // Every layer must hold all the plan's tokens. FailedPrecondition naming the
  // first short layer.
  absl::Status Commit(uint64_t plan_id);
  // Commit for speculative decoding: accepted[i] (batch order; 0 <=
  // accepted[i] <= sequence i's reserved tokens) of each sequence's tokens
  // become computed, the rest are rolled back: their slots freed, blocks only
  // they needed released, and the sequence's known tokens end at its new
  // length (pass the next step's tokens as new_token_ids again). Only blocks
  // full of accepted tokens are hashed or shared. Entries of sequences removed
  // from the plan are ignored. Every layer must hold all the plan's tokens
  // (as for Commit). InvalidArgument for a wrong size or an entry out of
  // range, changing nothing.
  absl::Status Commit(uint64_t plan_id, absl::Span<const int64_t> accepted);
  absl::Status Abort(uint64_t plan_id);
  // Takes `sequence` out of a plan in flight (preemption), as if the plan had
  // never named it; the plan's other sequences are untouched. Its rows of the
  // device slot mapping become -1 (padding) on `stream`, so Appends of the
  // full batch's K/V still work and skip them; the plan's token count is
  // unchanged. The host_slot_mapping a caller kept is not updated. NotFound
  // for an unknown plan or sequence, InvalidArgument when the sequence is not
  // in the plan (or was removed already).
  absl::Status RemoveFromPlan(uint64_t plan_id, SequenceId sequence,
                              void* stream = nullptr);
  // Rewinds a sequence to its first new_length committed tokens (rejected
  // path, beam pruning): 0 <= new_length <= SequenceLength (InvalidArgument
  // otherwise), FailedPrecondition while it is in a plan in flight. Blocks
  // past new_length are released (a block shared with a fork or a prefix hit
  // only loses this holder). A now-partial last block that is shared or
  // registered in the prefix cache keeps its content for the others: the next
  // Reserve writes into a copy of it (copy-on-write).
  absl::Status Truncate(SequenceId sequence, int64_t new_length);
  // Tokens of `prompt` that AddSequence(prompt, extra) would find already
  // computed now (full blocks, at least one token left), with no pin, no
  // metric and no LRU change: for admission control.
  absl::StatusOr<int64_t> PeekPrefix(absl::Span<const TokenId> prompt,
                                     const ExtraKey& extra = {}) const;
  // The layout of a plan in flight (StepPlanInfo::sequences, as updated by
  // RemoveFromPlan). NotFound for a plan not in flight.
  absl::StatusOr<std::vector<PlanSequence>> PlanLayout(uint64_t plan_id) const;
  absl::Status Fork(SequenceId parent, SequenceId child);
  // FailedPrecondition while the sequence is part of an uncommitted plan.
  absl::Status Free(SequenceId id);

  // Lookups.
  absl::StatusOr<std::vector<BlockId>> BlockTable(SequenceId id) const;
  // Computed tokens (written in every layer and committed).
  absl::StatusOr<int64_t> SequenceLength(SequenceId id) const;
  // Known tokens: committed + reserved (in flight) + token ids given but not
  // yet reserved. Always SequenceLength + reserved <= KnownLength.
  absl::StatusOr<int64_t> KnownLength(SequenceId id) const;
  absl::StatusOr<BlockTableView> BatchBlockTable(
      absl::Span<const SequenceId> ids, void* stream = nullptr);
  absl::StatusOr<LayerView> GetLayerView(int layer) const;

  // Layer groups (config.layer_groups; README "Layer groups"). A sequence
  // has one block table per table of the paging (core/layer_group.h: each
  // group's layers cut into tables of layers_per_page layers); without
  // groups it has one. Entries of blocks released from a sliding window are
  // kNullBlock (-1, allocator/group_block_manager.h), in BlockTable and in
  // the batch table; kernels must not read them (they lie outside every
  // window). With more than one table, BlockTable and BatchBlockTable
  // without a table are InvalidArgument.
  int32_t NumBlockTables() const;
  // The table `layer` reads and writes (0 without groups). InvalidArgument
  // for a layer out of range.
  absl::StatusOr<int32_t> LayerBlockTable(int layer) const;
  // BlockTable and BatchBlockTable of one table; InvalidArgument for a table
  // out of [0, NumBlockTables()).
  absl::StatusOr<std::vector<BlockId>> GroupBlockTable(SequenceId id,
                                                       int32_t table) const;
  absl::StatusOr<BlockTableView> GroupBatchBlockTable(
      absl::Span<const SequenceId> ids, int32_t table, void* stream = nullptr);
  // Pages held by live sequences in `table` (a page two sequences share
  // counts twice; without groups, table 0: blocks in use). 0 for a table
  // out of range.
  int64_t HeldBlocks(int32_t table) const;
  // Dequantizes tokens [token_begin, token_begin + num_tokens) of a sequence's
  // committed tokens in `layer` into key_out [T, H, D] / value_out [T, H, Dv]
  // (float32, float16 or bfloat16, in the backend's memory). Waits for its own
  // work on CUDA.
  // num_tokens 0 is an empty success.
  absl::Status Gather(SequenceId id, int layer, int64_t token_begin,
                      int64_t num_tokens, const TensorView& key_out,
                      const TensorView& value_out, void* stream = nullptr);
  // Gather without waiting: the work is enqueued on `stream` (the outputs are
  // ready when it has run; on the CPU, at return). With
  // options.include_in_flight, the range may reach into the tokens this
  // layer already holds of the sequence's plan in flight.
  absl::Status GatherAsync(SequenceId id, int layer, int64_t token_begin,
                           int64_t num_tokens, const TensorView& key_out,
                           const TensorView& value_out,
                           const GatherOptions& options = {},
                           void* stream = nullptr);
  // Batched GatherAsync: request i's tokens go to rows [o_i, o_i + n_i) of
  // key_out / value_out, o_i the sum of the earlier requests' num_tokens;
  // the outputs hold exactly that many rows. At most max_sequences_per_step
  // requests, and their ranges together at most 8 x max_blocks_per_sequence
  // blocks (InvalidArgument naming both otherwise). All zero: empty success.
  absl::Status GatherBatch(absl::Span<const GatherRequest> requests, int layer,
                           const TensorView& key_out,
                           const TensorView& value_out,
                           const GatherOptions& options = {},
                           void* stream = nullptr);

  // Paged decode attention over `layer`'s cache (int8/fp8 with per-(token,
  // head) scales, or bf16/fp16), so the engine never handles scales. For each
  // sequence i, its queries are its last n = options.num_query_tokens_per_
  // sequence committed tokens (their K/V appended and committed: call after
  // Commit): q rows [i * n, (i + 1) * n) of q [num_sequences * n,
  // num_q_heads, head_size] (bfloat16 or float16, any token/head strides,
  // unit last stride) attend the sequence's committed keys, causally among
  // themselves, with GQA (config.num_q_heads, which must be set), optional
  // soft-cap and sliding window; out [num_sequences * n, num_q_heads,
  // head_size_v] in q's dtype. A sequence shorter than n gets zeros for the
  // rows before its first token. Memory of the backend; on CUDA the call
  // enqueues the block-table upload and the kernels on `stream` and returns
  // (split-KV scratch was allocated by Create); on the CPU it runs on the
  // manager's threads.
  absl::Status Attention(absl::Span<const SequenceId> sequences, int layer,
                         const TensorView& q, const TensorView& out,
                         const AttentionOptions& options,
                         void* stream = nullptr);

  // Capacity, for the engine's scheduler.
  int64_t FreeBlocks() const;       // Free-list blocks.
  int64_t EvictableBlocks() const;  // Cached, unreferenced blocks.
  int64_t TotalBlocks() const;
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const;
  absl::StatusOr<int64_t> TokensThatFit(SequenceId id) const;

  MetricsSnapshot Metrics() const;
  std::string MetricsText() const;  // Prometheus exposition format.

  // KV events (config.enable_kv_events; README "KV events"): the batches made
  // since the last call, oldest first, and the queue is then empty. Sequence
  // numbers run on without a gap unless batches were dropped (the queue held
  // config.kv_events_queue_capacity batches; Metrics counts the drops). Empty
  // when events are off. ResourceExhausted (the queue kept) when the result
  // cannot be allocated.
  absl::StatusOr<std::vector<KVEventBatch>> TakeEvents();
  // Drops every registration of the prefix cache (every medium): cached
  // blocks return to the free list, no later AddSequence hits a block
  // committed before, and sequences alive now register none of their later
  // blocks. Emits one AllBlocksCleared. FailedPrecondition (changing nothing)
  // while any plan is in flight: commit or abort it first. Does nothing when
  // prefix caching is off.
  absl::Status ResetPrefixCache();

  const KVCacheConfig& config() const;
  // Checks the allocator's invariants (DESIGN.md section 4: accounting,
  // reference counts, the tail-sharing flag, the prefix index's tokens,
  // parents and roots) and the plans in flight (step slots, tokens appended
  // per layer, their sequences). For tests and debug builds.
  absl::Status Validate() const;

 private:
  class Impl;
  explicit KVCacheManager(std::unique_ptr<Impl> impl);
  explicit KVCacheManager(std::unique_ptr<internal::GroupManager> groups);
  // OK when sequences have one block table, else InvalidArgument naming
  // `what`.
  absl::Status OneTable(const char* what) const;
  // Create, on `device` (the backend's, or a test's). REQUIRES:
  // ValidateConfig(config) is OK.
  static absl::StatusOr<std::unique_ptr<KVCacheManager>> CreateOn(
      const KVCacheConfig& config, std::unique_ptr<Device> device);
  // Exactly one is set: impl_ for a uniform config, groups_ with layer
  // groups (api/group_manager.h).
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<internal::GroupManager> groups_;

  friend class KVCacheManagerTestPeer;
};

}  // namespace kvcache

#endif  // KVCACHE_API_KV_CACHE_MANAGER_H_
