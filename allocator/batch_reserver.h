// BatchReserver: Reserve and CanReserve of BlockManager - room for the next
// tokens of a batch of sequences, all or nothing (DESIGN.md section 4).
//
// Reserve makes one pass over the batch (StartBatch). It first allocates what
// the plan needs (StepPlan vectors, a spare plan record), then checks each
// request and, before changing its sequence, grows that sequence's vectors,
// and then changes only what Rollback can undo: the known tokens, the marks
// `reserved` and `plan_id`, and for a sequence whose tokens fit in its tail
// block (a decode step) its slots, computed from `tail_block`, so that the
// block list is not touched. A sequence that needs new blocks or a copy is
// left for FinishBatch, which changes the pool only once the whole batch is
// known to fit. An error or an exception (std::bad_alloc) rolls the pass back,
// so a failed Reserve changes nothing.
//
// It works on the BlockManager's parts (given at construction, which must
// outlive it) and owns only its scratch. Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_BATCH_RESERVER_H_
#define KVCACHE_ALLOCATOR_BATCH_RESERVER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/block_math.h"
#include "allocator/block_pool.h"
#include "allocator/plan_records.h"
#include "allocator/prefix_cache.h"
#include "allocator/sequence.h"
#include "allocator/sequence_table.h"
#include "allocator/step_plan.h"
#include "core/reserve_request.h"

namespace kvcache {
namespace internal {

class BatchReserver {
 public:
  // max_blocks: the most blocks one sequence may hold (0: no limit).
  BatchReserver(int32_t block_size, int32_t max_blocks,
                SequenceTable& sequences, BlockPool& pool, PrefixCache& prefix,
                PlanRecords& plans)
      : math_(block_size),
        max_blocks_(max_blocks),
        sequences_(sequences),
        pool_(pool),
        prefix_(prefix),
        plans_(plans) {}

  BatchReserver(const BatchReserver&) = delete;
  BatchReserver& operator=(const BatchReserver&) = delete;

  // See BlockManager::Reserve and CanReserve.
  absl::StatusOr<StepPlan> Reserve(absl::Span<const ReserveRequest> batch);
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const;

  // A partial last block shared with another holder, or registered in the
  // prefix cache (a full block that Truncate made partial again), must be
  // copied before this sequence writes it. Inline: Reserve asks it of every
  // sequence.
  bool NeedsCopy(const Sequence& s) const {
    return s.tail_maybe_shared && math_.Mod(s.computed) != 0 &&
           (pool_.ref_count(s.tail_block) > 1 || pool_.hashed(s.tail_block));
  }

  // OutOfRange with a never-fits Shortfall (core/shortfall.h) when `blocks`
  // exceed the whole pool; `what` names the request.
  absl::Status CheckNeverFits(int64_t blocks, const std::string& what) const;

 private:
  // A sequence of the batch being reserved that needs new blocks or a copy of
  // its shared tail: the pool changes only once the whole batch is known to
  // fit, after the pass over the batch.
  struct SlowPath {
    size_t index;  // Batch position.
    size_t slot;   // Its first slot in the plan's slot mapping.
    bool copy;     // Copy the shared partial tail block first.
  };
  // What the pass over the batch has done so far.
  struct BatchProgress {
    size_t done = 0;     // Sequences changed (Rollback undoes them).
    int64_t slots = 0;   // Slots used.
    int64_t needed = 0;  // New blocks.
    int64_t copies = 0;  // Shared blocks to copy.
  };

  int64_t BlocksNeeded(const Sequence& s, int64_t num_tokens, bool copy) const {
    return math_.CeilDiv(s.computed + num_tokens) - math_.CeilDiv(s.computed) +
           (copy ? 1 : 0);
  }
  BlockId AllocateBlock() {
    return pool_.num_free() > 0 ? pool_.AllocateFree() : prefix_.Evict(pool_);
  }
  absl::Status StartBatch(absl::Span<const ReserveRequest> batch,
                          StepPlan& plan, PlanRecord& record,
                          BatchProgress& progress);
  template <bool kPow2>
  absl::Status StartBatchAs(absl::Span<const ReserveRequest> batch,
                            StepPlan& plan, PlanRecord& record,
                            BatchProgress& progress);
  void PrepareSlow(Sequence& s, const ReserveRequest& r, bool copy,
                   bool fits_tail, StepPlan& plan, BatchProgress& progress);
  absl::Status FinishBatch(absl::Span<const ReserveRequest> batch,
                           const BatchProgress& progress, StepPlan& plan,
                           PlanRecord& record);
  void Rollback(const PlanRecord& record, size_t n);
  // A request that makes its sequence hold more blocks than the pool
  // (OutOfRange) or than max_blocks_ (InvalidArgument). Cold.
  absl::Status CheckSize(const Sequence& s, const ReserveRequest& r) const;
  // ResourceExhausted with a Shortfall.
  absl::Status NoRoom(size_t batch_size, int64_t needed) const;
  void ApplySlow(const SlowPath& path, absl::Span<const ReserveRequest> batch,
                 StepPlan& plan);

  BlockMath math_;
  int32_t max_blocks_;
  SequenceTable& sequences_;
  BlockPool& pool_;
  PrefixCache& prefix_;
  PlanRecords& plans_;
  std::vector<SlowPath> slow_;  // Reserve's scratch.
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BATCH_RESERVER_H_
