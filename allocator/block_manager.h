// BlockManager owns the block pool, the sequences and the prefix cache of one
// KV cache (DESIGN.md section 4). It is pure host bookkeeping: it hands out
// block ids and slots and reports which blocks must be copied, but never
// touches K/V memory.
//
// Life of a step:
//
//   AddSequence -> Reserve (a StepPlan: slots + copy-on-write pairs)
//               -> the caller writes every layer
//               -> Commit(plan)   (or Commit(plan, accepted), Abort(plan),
//                                  RemoveFromPlan(plan, sequence))
//
// Speculative decoding (DESIGN.md section 4): a reservation may hold draft
// tokens; Commit(plan, accepted) keeps each sequence's first accepted[i]
// tokens and rolls the rest back (slots freed, blocks only they needed
// released, never hashed), and Truncate rewinds committed tokens. A sequence
// whose partial last block is shared, or registered in the prefix cache,
// copies it before writing it (copy-on-write), so no write ever reaches
// bytes another sequence or the prefix cache can see.
//
// It coordinates its parts, each a concept of its own:
//
//   BlockPool       block_pool.h       block states, free and LRU lists
//   SequenceTable   sequence_table.h   sequences by id, the batch lookups
//   PlanRecords     plan_records.h     uncommitted plans, plan ids
//   PrefixCache     prefix_cache.h     hashing, matching, registration,
//                                      eviction, roots of extra keys
//   BatchReserver   batch_reserver.h   Reserve's all-or-nothing pass
//
// Every change of a block's registration in the prefix cache is published to
// the optional BlockObserver (block_observer.h).
//
// Not thread-safe: the caller (KVCacheManager) serializes calls. Every call
// that returns a non-OK status leaves the manager exactly as it was.

#ifndef KVCACHE_ALLOCATOR_BLOCK_MANAGER_H_
#define KVCACHE_ALLOCATOR_BLOCK_MANAGER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/batch_reserver.h"
#include "allocator/block_hash.h"
#include "allocator/block_math.h"
#include "allocator/block_observer.h"
#include "allocator/block_pool.h"
#include "allocator/plan_records.h"
#include "allocator/prefix_cache.h"
#include "allocator/sequence_table.h"
#include "allocator/step_plan.h"
#include "core/extra_key.h"
#include "core/ids.h"
#include "core/reserve_request.h"

namespace kvcache {

struct BlockManagerOptions {
  int32_t num_blocks = 0;   // >= 1
  int32_t block_size = 16;  // tokens per block, >= 1
  bool enable_prefix_caching = true;
  // Test seam: replaces the block hash (e.g. to force collisions). nullptr =
  // XXH3-128 (HashBlock).
  BlockHashFunction hash_function_for_testing = nullptr;
  // Told of every block stored in, removed from or cleared from the prefix
  // cache (block_observer.h). Not owned; must outlive the manager. nullptr =
  // none.
  BlockObserver* observer = nullptr;
  // The most blocks one sequence may hold (the engine's block-table width);
  // Reserve refuses more with InvalidArgument. 0 = no limit but the pool.
  int32_t max_blocks_per_sequence = 0;
  // Blocks of the host tier behind the pool (DESIGN.md section 11): evicted
  // registrations move there, and hits come back (allocator/host_tier.h).
  // 0 = no tier. Needs prefix caching.
  int32_t host_tier_blocks = 0;
  // The tier's offload selection (PrefixCache::Options::offload_min_hits):
  // an evicted block is offloaded only after this many prefix hits; 0 =
  // every evicted block. 0..255.
  int32_t tier_offload_min_hits = 0;
  // Whether an offloaded block is held (in use, by nobody) until the copy
  // that reads it is done (TierOffloadsQueued, ReleaseTierOffloads) instead
  // of being reused at once; evictions then take the next oldest block, and
  // drop a selected block when the call has no block to spare.
  bool tier_hold_offloaded = false;
  // Offload ahead (PrefixCache::Options::offload_ahead_blocks): the most
  // cached blocks with a tier copy made before their eviction; 0 = off.
  int64_t tier_offload_ahead_blocks = 0;
};

// Where AddSequence's computed tokens came from.
struct PrefixHitSplit {
  int64_t device_tokens = 0;  // Shared device blocks.
  int64_t host_tokens = 0;    // Onboarded from the host tier.
};

// The host tier's occupancy.
struct TierUsage {
  int32_t total_blocks = 0;   // 0 without a tier.
  int32_t stored_blocks = 0;  // Holding a registration.
};

// A sequence's block table and what its contents are known by between two
// looks: while `serial` and `version` stay the same, the table only grew at
// its end (a shrink or a replaced entry, as by Truncate, a rejected draft, an
// abort or a copy-on-write, changes `version`; a sequence made anew, even
// under an old id, has a new `serial`). An engine-side copy of the table can
// then be brought up to date by its new entries alone.
struct BlockTableRef {
  absl::Span<const BlockId> blocks;  // Valid until the sequence next changes.
  uint64_t serial = 0;
  uint64_t version = 0;
  // Leading entries that are kNullBlock (blocks released from a sliding
  // window, allocator/group_block_manager.h; always 0 here). While serial
  // and version stay the same it only grows, and the entries past it are
  // blocks.
  int64_t released = 0;
};

struct PoolUsage {
  int32_t total_blocks = 0;
  int32_t free_blocks = 0;    // On the free list (no content worth keeping).
  int32_t cached_blocks = 0;  // Hashed, unreferenced, evictable (LRU).
  int32_t used_blocks = 0;    // Referenced by at least one sequence.
};

// A batch's block tables as a padded row-major int32 [num_sequences,
// max_blocks] array (unused entries 0) plus each sequence's length in tokens.
struct HostBatchTable {
  int32_t num_sequences = 0;
  int32_t max_blocks = 0;
  // num_sequences * max_blocks entries; unused entries are 0.
  std::vector<int32_t> table;
  std::vector<int32_t> num_blocks;  // Per sequence.
  // Per sequence: tokens written so far (computed length).
  std::vector<int32_t> seq_lens;
};

class BlockManager {
 public:
  // InvalidArgument when num_blocks < 1 or block_size < 1.
  static absl::StatusOr<std::unique_ptr<BlockManager>> Create(
      const BlockManagerOptions& options);

  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;
  ~BlockManager();

  // Registers a sequence with its prompt. With prefix caching on, shares the
  // longest run of cached full blocks (leaving at least one prompt token to
  // compute) and returns how many tokens are already computed. AlreadyExists
  // for a duplicate id, InvalidArgument for an empty prompt, ResourceExhausted
  // if the pool cannot hold even the shared prefix (it never can fail for that
  // reason since shared blocks are already resident; kept for symmetry), and
  // OutOfRange with a never-fits Shortfall (core/shortfall.h) for a prompt
  // needing more blocks than the whole pool.
  //
  // With a host tier the shared run goes on through tier blocks (longest
  // chain across tiers), as many as the pool has room to onboard into: each
  // gets a fresh device block, registered as before, and a TierCopy (onboard)
  // that the caller must run before the sequence's blocks are read or
  // written. `split` (optional) says how many computed tokens came from each
  // tier.
  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra = {},
                                      PrefixHitSplit* split = nullptr);

  // Reserves room for a batch, all or nothing. ResourceExhausted (and no
  // change) when the pool cannot hold the whole batch now, with a Shortfall
  // (core/shortfall.h: blocks needed, free, evictable); NotFound for an unknown
  // sequence; InvalidArgument for num_tokens < 1, tokens beyond the known ones,
  // or a sequence named twice; FailedPrecondition for a sequence that already
  // has an uncommitted reservation. Checked per request, in batch order, after
  // those: OutOfRange (never fits, with a Shortfall whose never_fits is set)
  // when the sequence would hold more blocks than the whole pool, then
  // InvalidArgument when more than max_blocks_per_sequence.
  absl::StatusOr<StepPlan> Reserve(absl::Span<const ReserveRequest> batch);

  // Would Reserve(batch) succeed now? Same validation, no change.
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const;

  // The reserved tokens of every sequence in the plan are written in every
  // layer: they count as computed; newly full blocks get their chained hash and
  // become reusable. NotFound for an unknown or already committed/aborted plan.
  // Sequences freed since Reserve are skipped.
  absl::Status Commit(uint64_t plan_id);

  // Commit for speculative decoding: accepted[i] (batch order, 0 <=
  // accepted[i] <= the tokens reserved for sequence i) of sequence i's
  // reserved tokens are kept, as by Commit; the rest are rolled back: their
  // slots freed, the blocks only they needed released (copy-on-write copies
  // stay: they are the sequence's own), and the sequence's known tokens end at
  // its new computed length (any known token past it, a rejected draft or a
  // prompt token not reserved yet, is dropped). Only blocks full of accepted
  // tokens are hashed. Entries of sequences freed or removed from the plan are
  // ignored. NotFound for an unknown plan; InvalidArgument (no change) for a
  // wrong size or an entry out of range.
  absl::Status Commit(uint64_t plan_id, absl::Span<const int64_t> accepted);

  // Takes one sequence out of a plan in flight, as if that plan had never
  // named it (as Abort does for all: its known tokens, blocks and shared tail
  // are as before Reserve); the plan's other sequences are untouched.
  // NotFound for an unknown plan or sequence; InvalidArgument when the
  // sequence is not in that plan.
  absl::Status RemoveFromPlan(uint64_t plan_id, SequenceId id);

  // Rewinds a sequence to its first new_length committed tokens (0 <=
  // new_length <= computed, else InvalidArgument; FailedPrecondition while it
  // is in a plan). Its known tokens end at new_length; blocks wholly past it
  // are released (a block shared with a fork or a prefix hit just loses this
  // holder; a registered one stays cached). The block holding token
  // new_length - 1, if now partial, stays in the table, but when it is shared
  // or registered in the prefix cache the next Reserve writes into a copy of
  // it (copy-on-write), so others keep its full content. The prefix-cache
  // chain goes on from the last kept full block when that block is registered
  // as itself; otherwise the sequence registers no later block.
  absl::Status Truncate(SequenceId id, int64_t new_length);

  // Tokens of `prompt` that AddSequence(prompt, extra) would find computed
  // now, with no reference, no metric and no LRU change. InvalidArgument for
  // an empty prompt.
  absl::StatusOr<int64_t> PeekPrefix(absl::Span<const TokenId> prompt,
                                     const ExtraKey& extra = {}) const;

  // Releases a plan's reservations without committing (blocks allocated for it
  // are returned and copy-on-write replacements undone). NotFound as for
  // Commit.
  absl::Status Abort(uint64_t plan_id);

  // Releases a sequence's blocks (cancelling its part of an outstanding plan).
  // NotFound if unknown.
  absl::Status Free(SequenceId id);

  // Drops every registration of the prefix cache: cached blocks return to the
  // free list, and no later AddSequence hits a block committed before. Hashed
  // blocks in use by live sequences stay theirs but are unregistered too, and
  // a sequence alive now registers none of its later blocks (their chain's
  // parents are gone, so no query could reach them). The observer gets one
  // OnAllBlocksCleared, which subsumes the removals. FailedPrecondition while
  // any plan is in flight (commit or abort it first).
  absl::Status ResetPrefixCache();

  // Creates `child` sharing all of `parent`'s blocks and tokens (a shared
  // partial last block is copied on the first write of either). NotFound /
  // AlreadyExists; FailedPrecondition while the parent has an uncommitted
  // reservation.
  absl::Status Fork(SequenceId parent, SequenceId child);

  // ---- Host tier ----
  //
  // The byte copies the last AddSequence or Reserve asked for (offloads of
  // evicted blocks into tier slots, onboards of hits), in the order they
  // must run. Each call that asks for copies first drops the previous list.
  absl::Span<const TierCopy> tier_copies() const { return prefix_.copies(); }
  void ClearTierCopies() { prefix_.ClearCopies(); }
  // The offloads in `copies` failed (with reused_only, only those of blocks
  // reused at once, TierCopy::wait: the held ones were queued): the tier
  // blocks they filled are dropped (OnBlocksRemoved(kHost)), so nothing
  // reads a half-copied block.
  void DropFailedOffloads(absl::Span<const TierCopy> copies,
                          bool reused_only = false);
  // AddSequence's onboard copies failed: the onboarded blocks are dropped
  // (OnBlocksRemoved(kDevice)) and the sequence is freed, as Free.
  absl::Status DropFailedOnboards(SequenceId id,
                                  absl::Span<const TierCopy> copies);
  TierUsage HostTierUsage() const;
  // Whether evictions offload to the tier (default on). The manager turns it
  // off while its copy queue is busy, so that offloading never stalls a
  // step: evicted blocks are then dropped as without a tier.
  void SetTierOffload(bool on) { prefix_.set_offload(on); }
  // The held offloads of the copies just queued are in the copy queue's
  // batch `batch`; those of batches <= `completed` become free.
  void TierOffloadsQueued(int64_t batch) { prefix_.OffloadsQueued(batch); }
  void ReleaseTierOffloads(int64_t completed) {
    prefix_.ReleaseOffloaded(completed, pool_);
  }
  int64_t held_tier_offloads() const { return prefix_.num_held(); }
  // Offload ahead (PrefixCache::OffloadAhead): asks for copies (tier_copies,
  // after dropping the previous list) of up to `max_new` cached blocks next
  // in line for eviction, and returns how many. The manager queues them and
  // tells the batch by TierOffloadsQueued.
  int64_t TierOffloadAhead(int64_t max_new) {
    prefix_.ClearCopies();
    const int64_t n = prefix_.OffloadAhead(pool_, max_new);
    prefix_.Flush();
    return n;
  }
  // The newest offload batch that a block reused since the last call of this
  // may still be read by (its copy ahead): its next write waits for it.
  int64_t TakeTierAheadWait() { return prefix_.TakeAheadWait(); }
  // The most blocks the next call may offload (the manager's in-flight
  // budget); evicted blocks past it are dropped (tier_offloads_skipped).
  void SetTierOffloadBudget(int64_t blocks) {
    prefix_.set_offload_budget(blocks);
  }

  // Lookups. NotFound for an unknown sequence.
  absl::StatusOr<absl::Span<const BlockId>> BlockTable(SequenceId id) const;
  absl::StatusOr<BlockTableRef> BlockTableWithVersion(SequenceId id) const;
  // The first request of `batch` whose sequence has a plan in flight: sets
  // *index and returns the plan; 0 when none has (unknown sequences are
  // Reserve's to refuse). Through the batch lookups Reserve uses, so a decode
  // step naming the last step's sequences in order costs no search. May throw
  // std::bad_alloc for a batch longer than any before.
  uint64_t FirstPendingPlan(absl::Span<const ReserveRequest> batch,
                            size_t* index) const;
  // BlockTableWithVersion of every id, into out[i] (out.size() == ids.size()),
  // found through Reserve's batch lookups: the batch Reserve just took costs
  // no search. NotFound (out partly written) for an unknown id. May throw
  // std::bad_alloc for a batch longer than any before.
  absl::Status BatchTablesWithVersion(absl::Span<const SequenceId> ids,
                                      absl::Span<BlockTableRef> out) const;
  // Tokens written and committed.
  absl::StatusOr<int64_t> ComputedLength(SequenceId id) const;
  // Token ids known (prompt + new).
  absl::StatusOr<int64_t> KnownLength(SequenceId id) const;
  absl::StatusOr<HostBatchTable> BatchTable(
      absl::Span<const SequenceId> ids) const;
  // Largest n such that Reserve({id, n}) would fit now (ignoring known-token
  // limits).
  absl::StatusOr<int64_t> TokensThatFit(SequenceId id) const;
  bool Contains(SequenceId id) const;
  // The plan holding an uncommitted reservation of `id`, or 0 (none, or an
  // unknown sequence).
  uint64_t PendingPlan(SequenceId id) const;
  int64_t num_sequences() const;
  // Extra keys (adapter id, salt) the prefix cache holds a root for: at most
  // one per live sequence or cached block, never one per key ever seen.
  size_t num_prefix_roots() const;

  PoolUsage Usage() const;
  PrefixCacheStats PrefixStats() const;
  const BlockManagerOptions& options() const;

  // Checks every invariant of DESIGN.md section 4 (each block in exactly one
  // state; free + cached + used = total; ref counts = holders; the hash index =
  // hashed cached and used blocks; a partial tail marked unshared has one
  // holder; the index's stored tokens and parents are the sequences' own;
  // prefix roots are referenced exactly by their holders). Internal with a
  // description of the first violation.
  absl::Status Validate() const;

  // Every hash registered in the prefix cache, in no particular order (tests
  // compare it with what a BlockObserver was told).
  std::vector<BlockHash> RegisteredHashesForTesting(
      BlockMedium medium = BlockMedium::kDevice) const;
  // Whether a block carries a hash (registered, cached or in use).
  bool BlockHashedForTesting(BlockId block) const;

 private:
  explicit BlockManager(const BlockManagerOptions& options);

  const internal::Sequence* Find(SequenceId id) const {
    return sequences_.Find(id);
  }
  // Releases the sequence's blocks, the tail first so that, once cached, a
  // chain's last blocks are evicted before its first.
  void ReleaseAll(internal::Sequence& s);
  // Commit's allocations (room for the hashes of the blocks the plan's
  // reservations fill), then its changes.
  void PrepareCommit(const internal::PlanRecord& record);
  void FinishCommit(internal::PlanRecords::InFlight plan);
  // Rolls a sequence's reservation back to its first `accepted` tokens.
  void RollBack(internal::Sequence& s, int64_t accepted);
  // Abort of one sequence of a plan (REQUIRES: `tokens_before` its known
  // tokens before Reserve).
  void Unreserve(internal::Sequence& s, size_t tokens_before);
  absl::Status ValidateSequence(const internal::Sequence& s,
                                std::vector<int32_t>& refs) const;
  absl::Status ValidatePlans() const;

  BlockManagerOptions options_;
  internal::BlockMath math_;
  internal::BlockPool pool_;
  internal::PrefixCache prefix_;
  internal::SequenceTable sequences_;
  internal::PlanRecords plans_;
  internal::BatchReserver reserver_;
};

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_MANAGER_H_
