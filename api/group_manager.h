// GroupManager: what a KVCacheManager runs when its config has layer groups
// (DESIGN.md "Layer groups"; README "Layer groups"). It owns the cache
// backend (one allocation per page slot; groups of one cache shape), a
// GroupBlockManager (per-sequence, per-table block tables, sliding-window
// release, hybrid prefix hits, all-or-nothing Reserve), the plans in flight
// (each plan's slot mappings, one per table, uploaded together) and the
// lookup buffers. Append and Gather of layer l use the slot mapping and the
// block table of l's table.
//
// Offered: AddSequence, PeekPrefix, Reserve (with copy-on-write of shared
// partial blocks), ReserveGraphStep and GraphStep (one fixed-address slot
// mapping and block table per table, api/graph_step_buffers.h), CanReserve,
// Append, Commit (also with accepted counts),
// RemoveFromPlan, Abort, Fork, Truncate, Free, block tables per table,
// SequenceLength, KnownLength, Gather (and GatherAsync / GatherBatch),
// LayerView, capacity, metrics, Validate, KV events (TakeEvents; the
// allocator is the sink's observer) and ResetPrefixCache. The rest
// (Attention, host tier) is refused with Unimplemented naming layer_groups.
//
// Thread safety: every method locks mu_. Ownership: owns all cache memory;
// views stay valid while it lives. Internal to api/.

#ifndef KVCACHE_API_GROUP_MANAGER_H_
#define KVCACHE_API_GROUP_MANAGER_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/group_block_manager.h"
#include "api/cache_backend.h"
#include "api/graph_step_buffers.h"
#include "api/kv_cache_manager.h"
#include "api/lookup_buffers.h"
#include "api/plan_table.h"
#include "api/tensor_checks.h"
#include "core/kv_event.h"
#include "events/kv_event_sink.h"
#include "storage/device.h"

namespace kvcache::internal {

class GroupManager {
 public:
  // REQUIRES: ValidateConfig(config) is OK, config.layer_groups is not
  // empty. Unimplemented for a host tier (naming the field).
  static absl::StatusOr<std::unique_ptr<GroupManager>> Create(
      const KVCacheConfig& config, std::unique_ptr<Device> device);

  const KVCacheConfig& config() const { return config_; }
  const GroupPaging& paging() const { return paging_; }

  // KVCacheManager's operations, with its contracts (kv_cache_manager.h).
  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra, PrefixHits* hits);
  absl::StatusOr<int64_t> PeekPrefix(absl::Span<const TokenId> prompt,
                                     const ExtraKey& extra) const;
  absl::StatusOr<StepPlanInfo> Reserve(absl::Span<const ReserveRequest> batch,
                                       void* stream);
  // The graph step (KVCacheManager::ReserveGraphStep): every table's slot
  // mapping and block table, and the shared positions and lengths, are
  // rewritten on `stream`; an Append of layer l reads table(l)'s mapping.
  absl::StatusOr<StepPlanInfo> ReserveGraphStep(
      absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
      void* stream);
  // Table `table`'s graph-step inputs. FailedPrecondition without graph
  // buffers, InvalidArgument for a table out of range.
  absl::StatusOr<GraphStepInputs> GraphStep(int32_t table) const;
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const;
  absl::Status Append(uint64_t plan_id, int layer, const TensorView& key,
                      const TensorView& value, void* stream);
  absl::Status Commit(uint64_t plan_id);
  absl::Status Commit(uint64_t plan_id, absl::Span<const int64_t> accepted);
  absl::Status RemoveFromPlan(uint64_t plan_id, SequenceId sequence,
                              void* stream);
  absl::Status Abort(uint64_t plan_id);
  // Truncate: also FailedPrecondition when a sliding-window table would need
  // a block it released (GroupBlockManager::Truncate).
  absl::Status Truncate(SequenceId id, int64_t new_length);
  absl::Status Fork(SequenceId parent, SequenceId child);
  absl::StatusOr<std::vector<PlanSequence>> PlanLayout(uint64_t plan_id) const;
  absl::Status Free(SequenceId id);

  absl::StatusOr<int32_t> LayerTable(int layer) const;
  absl::StatusOr<std::vector<BlockId>> BlockTable(SequenceId id,
                                                  int32_t table) const;
  absl::StatusOr<int64_t> SequenceLength(SequenceId id) const;
  absl::StatusOr<int64_t> KnownLength(SequenceId id) const;
  absl::StatusOr<BlockTableView> BatchBlockTable(
      absl::Span<const SequenceId> ids, int32_t table, void* stream);
  absl::StatusOr<LayerView> GetLayerView(int layer) const;
  absl::Status GatherBatch(absl::Span<const GatherRequest> requests, int layer,
                           const TensorView& key_out,
                           const TensorView& value_out,
                           const GatherOptions& options, void* stream,
                           bool wait);

  std::vector<KVEventBatch> TakeEvents();
  absl::Status ResetPrefixCache();
  // KVCacheManagerTestPeer::CoalesceGraphStepUploads.
  void CoalesceGraphStepUploadsForTesting() {
    std::lock_guard<std::mutex> lock(mu_);
    if (graph_ != nullptr) graph_->set_coalesce_for_testing(true);
  }
  // Hashes registered in any table (KVCacheManagerTestPeer).
  std::vector<BlockHash> RegisteredHashesForTesting() const;

  int64_t FreeBlocks() const;
  int64_t EvictableBlocks() const;
  int64_t TotalBlocks() const { return backend_->layout().num_blocks; }
  // Pages held by live sequences in `table` (0 for a table out of range).
  int64_t HeldBlocks(int32_t table) const;
  MetricsSnapshot Metrics() const;
  absl::Status Validate() const;

 private:
  explicit GroupManager(const KVCacheConfig& config) : config_(config) {}

  absl::Status CheckLayer(int layer) const;
  absl::Status CheckTable(int32_t table) const;
  absl::Status CheckBatch(absl::Span<const ReserveRequest> batch) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<int64_t> GatherableLength(SequenceId id, int layer,
                                           bool include_in_flight) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemovePlan(uint64_t plan_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reserve and ReserveGraphStep after their checks (graph_tokens 0: not a
  // graph step).
  absl::StatusOr<StepPlanInfo> ReservePlan(
      absl::Span<const ReserveRequest> batch, int64_t graph_tokens,
      void* stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes and uploads a just-reserved graph step's inputs; `slots` are its
  // tables' slot mappings one after another.
  absl::Status WriteGraphStep(const GroupStepPlan& plan,
                              absl::Span<const int64_t> slots, void* stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // FailedPrecondition naming the first layer short of the plan's tokens.
  absl::Status CheckAppended(uint64_t plan_id,
                             const PlanTable::Plan& plan) const;

  const KVCacheConfig config_;
  GroupPaging paging_;
  std::unique_ptr<CacheBackend> backend_;
  ExpectedKV expected_kv_;  // Append's K, set by Create.
  int64_t cols_ = 0;        // Block-table columns.

  mutable std::mutex mu_;
  // Declared before blocks_, which calls it: null when events are off.
  std::unique_ptr<KVEventSink> events_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<GroupBlockManager> blocks_ ABSL_GUARDED_BY(mu_);
  // Each plan's step slot holds its tables' slot mappings one after another
  // (table t's at t * num_tokens).
  std::unique_ptr<PlanTable> plans_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<LookupBuffers> lookups_ ABSL_GUARDED_BY(mu_);
  // Made at Create when config.graph_max_tokens > 0: one slot mapping and
  // block table per table.
  std::unique_ptr<GraphStepBuffers> graph_ ABSL_GUARDED_BY(mu_);
  uint64_t graph_plan_ ABSL_GUARDED_BY(mu_) = 0;  // Holding graph_, if not 0.
  // WriteGraphStep's tables (sequence i's table t at i * tables + t), sized
  // at Create.
  std::vector<BlockTableRef> graph_tables_ ABSL_GUARDED_BY(mu_);
  // Sequences of plans in flight -> their plan.
  absl::flat_hash_map<SequenceId, uint64_t> pending_ ABSL_GUARDED_BY(mu_);
  MetricsSnapshot counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_GROUP_MANAGER_H_
