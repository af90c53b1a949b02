// KVCacheManager::Impl: the parts behind a KVCacheManager and the operations
// that span more than one of them. Each part owns one concern:
//
//   backend_   CacheBackend   device, cache storage, pool size, kernels
//   blocks_    BlockManager   sequences, blocks, plans' slots, prefix cache
//   plans_     PlanTable      plans in flight: step buffers, appended counts
//   lookups_   LookupBuffers  block tables handed to kernels
//   attention_ AttentionBuffers  Attention's tables and split-KV scratch
//   events_    KVEventSink    KV events (null when off), the blocks' observer
//   tier_      TierMover      the host tier's memory and copies (null without)
//   counters_                 the metrics the parts do not keep themselves
//
// Thread safety: KVCacheManager locks mu_ around every call; every method
// here REQUIRES it. Internal to api/.

#ifndef KVCACHE_API_MANAGER_IMPL_H_
#define KVCACHE_API_MANAGER_IMPL_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/block_manager.h"
#include "api/attention_buffers.h"
#include "api/cache_backend.h"
#include "api/graph_step_buffers.h"
#include "api/kv_cache_manager.h"
#include "api/lookup_buffers.h"
#include "api/plan_table.h"
#include "api/tensor_checks.h"
#include "api/tier_mover.h"
#include "events/kv_event_sink.h"
#include "storage/device.h"

namespace kvcache {

class KVCacheManager::Impl {
 public:
  // REQUIRES: ValidateConfig(config) is OK and `device` matches
  // config.backend's memory kind.
  static absl::StatusOr<std::unique_ptr<Impl>> Create(
      const KVCacheConfig& config, std::unique_ptr<Device> device);

  const KVCacheConfig& config() const { return config_; }
  const internal::CacheBackend& backend() const { return *backend_; }
  internal::CacheBackend& mutable_backend() { return *backend_; }
  std::mutex& mu() const ABSL_LOCK_RETURNED(mu_) { return mu_; }

  // The operations of KVCacheManager, with the same contracts.
  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra,
                                      PrefixHits* hits = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<StepPlanInfo> Reserve(absl::Span<const ReserveRequest> batch,
                                       void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<StepPlanInfo> ReserveGraphStep(
      absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
      void* stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<GraphStepInputs> GraphStep() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Append(uint64_t plan_id, int layer, const TensorView& key,
                      const TensorView& value, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Commit(uint64_t plan_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Commit(uint64_t plan_id, absl::Span<const int64_t> accepted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RemoveFromPlan(uint64_t plan_id, SequenceId sequence,
                              void* stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<PlanSequence>> PlanLayout(uint64_t plan_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Abort(uint64_t plan_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Fork(SequenceId parent, SequenceId child)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Truncate(SequenceId id, int64_t new_length)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<bool> PrefixLoaded(SequenceId id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Free(SequenceId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  BlockManager& blocks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return *blocks_; }
  const BlockManager& blocks() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return *blocks_;
  }
  absl::StatusOr<BlockTableView> BatchBlockTable(
      absl::Span<const SequenceId> ids, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Gather(SequenceId id, int layer, int64_t token_begin,
                      int64_t num_tokens, const TensorView& key_out,
                      const TensorView& value_out, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status GatherBatch(absl::Span<const GatherRequest> requests, int layer,
                           const TensorView& key_out,
                           const TensorView& value_out,
                           const GatherOptions& options, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Decode attention (api/attention.cc).
  absl::Status Attention(absl::Span<const SequenceId> sequences, int layer,
                         const TensorView& q, const TensorView& out,
                         const AttentionOptions& options, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  MetricsSnapshot Metrics() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // KV events (api/manager_events.cc).
  std::vector<KVEventBatch> TakeEvents() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The observer that makes them, for every medium (null when events are
  // off): a host tier reports its own stores and removals here.
  BlockObserver* event_observer() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return events_.get();
  }
  // The allocator's invariants, then the plans' against the step buffers.
  absl::Status Validate() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Status CheckLayer(int layer) const;

  // KVCacheManagerTestPeer::CoalesceGraphStepUploads.
  void CoalesceGraphStepUploadsForTesting() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (graph_ != nullptr) graph_->set_coalesce_for_testing(true);
  }

  // The host tier (null without one); for tests.
  internal::TierMover* tier() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return tier_.get();
  }

 private:
  explicit Impl(const KVCacheConfig& config) : config_(config) {}

  // Reserve and ReserveGraphStep after their checks (graph_tokens 0: not a
  // graph step).
  absl::StatusOr<StepPlanInfo> ReservePlan(
      absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
      void* stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes and uploads the graph step's inputs for a just-reserved plan.
  absl::Status WriteGraphStep(const StepPlan& plan, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes a plan out of the table (Commit, Abort), freeing the graph step's
  // buffers when it held them.
  void RemovePlan(uint64_t plan_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Every layer holds all of the plan's tokens (Commit's precondition).
  absl::Status CheckAppended(uint64_t plan_id,
                             const internal::PlanTable::Plan& plan) const;
  // The one check that `id` is not part of a plan in flight (Reserve, Fork
  // and Free refuse it): FailedPrecondition naming `what`.
  absl::Status CheckNotPending(SequenceId id, const char* what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckAttentionOptions(const AttentionOptions& options) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The allocator's tables of `ids`, refused when a sequence holds more blocks
  // than a block-table row has columns (max_blocks_per_sequence).
  absl::StatusOr<HostBatchTable> BatchTable(absl::Span<const SequenceId> ids)
      const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Tokens of `id` a gather of `layer` may read: committed, plus with
  // include_in_flight those of its plan in flight this layer holds.
  absl::StatusOr<int64_t> GatherableLength(SequenceId id, int layer,
                                           bool include_in_flight) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Batch size and token limits of the step buffers, and no sequence pending.
  absl::Status CheckBatch(absl::Span<const ReserveRequest> batch) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Host tier (api/manager_tier.cc). Runs the tier copies the allocator's
  // last call asked for, after `stream`'s earlier work; when they cannot
  // run, the blocks they would have filled are dropped (and `sequence`, if
  // it was onboarding, is freed: the error is returned). An onboard makes
  // `sequence` wait for it (pending_onboards_).
  absl::Status RunTierCopies(void* stream, SequenceId sequence, bool onboarding)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Later work on `stream` that reads or writes blocks comes after the tier
  // copies it depends on: onboard batch `onboard` (with every onboard before
  // it; kAllOnboards: the last one), the onboards of sequences freed before
  // their prefix landed, and offloads whose blocks were not held. No-op
  // without a tier or when those are done or already waited for.
  static constexpr int64_t kAllOnboards = -1;
  absl::Status OrderAfterTierCopies(void* stream,
                                    int64_t onboard = kAllOnboards)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The onboard batch work on `ids` waits for: the last of their prefixes
  // still in flight, 0 = none (and no search while no prefix is in flight).
  int64_t OnboardWaitFor(absl::Span<const SequenceId> ids)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t OnboardWaitFor(absl::Span<const ReserveRequest> batch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `id`'s prefix is filled by onboard batch `batch` (0: none): work on it
  // waits for that batch until it is done.
  void NotePendingOnboard(SequenceId id, int64_t batch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `id` leaves (Free, Truncate): its blocks may be reused by anyone, so
  // while its prefix is in flight every later call waits for it.
  void ForgetOnboard(SequenceId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether onboard batch `batch` is done (updates the known-done mark).
  bool OnboardDone(int64_t batch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the held blocks whose offload is done, and gives the allocator's
  // next evictions the offload budget left (tier_offload_max_in_flight_bytes
  // less the copies still running; none while the CUDA queue is more than
  // two batches behind).
  void AllowOffloadIfQueueIsFree() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whole blocks of copies that tier_offload_max_in_flight_bytes leaves room
  // for beside the copies still running (INT64_MAX without a bound).
  int64_t BlocksWithinInFlightBudget() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Offload ahead: queues background copies of the cached blocks next in
  // line for eviction (BlockManager::TierOffloadAhead), after `stream`'s
  // earlier work, when the offload lane is idle and the in-flight budget
  // allows. Best effort, like every offload.
  void OffloadAhead(void* stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // When blocks are held for their offload copies: waits for them (the
  // offload lane; the host blocks) and frees them; true when that freed any. For a
  // Reserve or CanReserve that found no room (the held blocks are the
  // pool's, just not yet reusable). Logically const: only when held blocks
  // become free, which no caller can tell from before but by the pool's
  // counts.
  // `no_room` is the ResourceExhausted that asked: when its Shortfall says
  // the batch would not fit even with every held block free, nothing is
  // waited for (returns false at once).
  bool ReclaimHeldOffloads(const absl::Status& no_room) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The event sink (and its publisher) config asks for, or null when events
  // are off (internal::CreateEventSink, api/manager_events.cc).
  static absl::StatusOr<std::unique_ptr<internal::KVEventSink>> CreateEvents(
      const KVCacheConfig& config);

  const KVCacheConfig config_;
  std::unique_ptr<internal::CacheBackend> backend_;
  internal::ExpectedKV expected_kv_;  // Append's K/V, set by Create.

  mutable std::mutex mu_;
  // Before blocks_, which holds a pointer to it: destroyed after it.
  std::unique_ptr<internal::KVEventSink> events_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<BlockManager> blocks_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<internal::PlanTable> plans_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<internal::LookupBuffers> lookups_ ABSL_GUARDED_BY(mu_);
  // Made at Create when config.graph_max_tokens > 0.
  std::unique_ptr<internal::GraphStepBuffers> graph_ ABSL_GUARDED_BY(mu_);
  uint64_t graph_plan_ ABSL_GUARDED_BY(mu_) = 0;  // Holding graph_, if not 0.
  // WriteGraphStep's tables, sized at Create.
  std::vector<BlockTableRef> graph_tables_ ABSL_GUARDED_BY(mu_);
  // Made at Create when config.num_q_heads > 0.
  std::unique_ptr<internal::AttentionBuffers> attention_ ABSL_GUARDED_BY(mu_);
  MetricsSnapshot counters_ ABSL_GUARDED_BY(mu_);
  // Host tier: its data path, and the stream of the last call that took
  // one (AddSequence's copies, which has none, come after its work).
  std::unique_ptr<internal::TierMover> tier_ ABSL_GUARDED_BY(mu_);
  void* last_stream_ ABSL_GUARDED_BY(mu_) = nullptr;
  // What later reads and writes wait for (0 = nothing): the last batch of
  // offloads of blocks reused at once (kOffloadReused), the last onboard
  // batch, and the
  // onboard batch every call waits for (ForgetOnboard). Per sequence whose
  // prefix is still in flight, its onboard batch (AddSequence's own, or the
  // batch that fills a block it hit on the device); pruned as batches are
  // found done.
  int64_t tier_offload_wait_ ABSL_GUARDED_BY(mu_) = 0;
  // The last offload batch (kOffload) a reused block's copy ahead may still
  // be running in (BlockManager::TakeTierAheadWait).
  int64_t tier_ahead_wait_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tier_onboard_last_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tier_onboard_floor_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<SequenceId, int64_t> pending_onboards_
      ABSL_GUARDED_BY(mu_);
  // Per lane: the batch known done, and through which batch the last stream
  // made to wait (tier_waited_stream_) waits.
  int64_t tier_known_done_[kNumTierLanes] ABSL_GUARDED_BY(mu_) = {};
  void* tier_waited_stream_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t tier_waited_[kNumTierLanes] ABSL_GUARDED_BY(mu_) = {};
};

}  // namespace kvcache

#endif  // KVCACHE_API_MANAGER_IMPL_H_
