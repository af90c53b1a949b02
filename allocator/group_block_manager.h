// GroupBlockManager: the block bookkeeping of a model whose layers come in
// groups (core/layer_group.h; DESIGN.md "Layer groups"): sliding-window and
// full-attention tables drawing pages from one BlockPool. Like BlockManager
// it is pure host bookkeeping: it hands out block ids and slots, never
// touches K/V memory.
//
// Each sequence has one block table per table of the paging (GroupTable).
// Entry i of a table is the page holding tokens [i * block_size, (i + 1) *
// block_size) for that table's layers. In a sliding-window table of window W,
// once a step's Commit leaves `computed` tokens, the next token (position
// computed) reads positions >= computed - W + 1, so every block whose last
// position is below that is released (to the prefix cache when hashed, else
// to the free list) and its entry becomes kNullBlock.
//
// Reserve is all or nothing across tables and sequences: it counts the new
// pages of every table of every sequence against free + evictable pages.
//
// A prefix hit of L full blocks must be servable by every table: a full
// table needs all L blocks cached, a sliding table of window W only blocks
// floor(max(0, L * block_size - W + 1) / block_size) .. L - 1. The hit is
// the largest such L below the prompt's length (at least one token is left
// to compute). Released blocks join the LRU list in the order they fall out
// of the window, so eviction takes out-of-window blocks, which only a
// shorter prefix could use, before the full tables' later blocks.
//
// Fork shares every table's blocks (a reference each; released entries stay
// kNullBlock in the child). A table whose last block is partial and shared
// (a fork, or a block registered in the prefix cache after Truncate) gets a
// fresh page at the next Reserve, which names the (source, copy) pair in
// GroupStepPlan::copies: the caller copies the page before any write of the
// step (copy-on-write). The source keeps the sequence's reference until
// Commit (released) or Abort (restored).
//
// Taking tokens back (Commit with accepted counts, RemoveFromPlan, Truncate)
// works per table as BlockManager's. A sliding table cannot bring back the
// blocks it released: Truncate to a length whose window would read a
// released block is FailedPrecondition (naming the length and the window),
// with nothing changed. Such a Truncate succeeds exactly when, for every
// sliding table of window W, floor(max(0, new_length - W + 1) / block_size)
// is at least the table's count of released entries.
//
// Not thread-safe: the caller serializes calls. A call that fails leaves the
// manager as it was.

#ifndef KVCACHE_ALLOCATOR_GROUP_BLOCK_MANAGER_H_
#define KVCACHE_ALLOCATOR_GROUP_BLOCK_MANAGER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/block_hash.h"
#include "allocator/block_manager.h"
#include "allocator/block_observer.h"
#include "allocator/block_pool.h"
#include "allocator/group_prefix_index.h"
#include "allocator/step_plan.h"
#include "core/extra_key.h"
#include "core/ids.h"
#include "core/reserve_request.h"

namespace kvcache {

// The block-table entry of a block released from a sliding window (and of
// the blocks before a sliding table's part of a prefix hit). Kernels never
// read it: it lies outside every window.
inline constexpr BlockId kNullBlock = -1;

struct GroupBlockManagerOptions {
  int32_t num_blocks = 0;   // Pages, >= 1.
  int32_t block_size = 16;  // Tokens per block, >= 1.
  bool enable_prefix_caching = true;
  // Per table: 0 = full attention, else the sliding window in tokens. At
  // least one table.
  std::vector<int32_t> windows;
  // KV events (may be null; must outlive the manager): one store per block
  // hash when the first table registers it (Commit), one removal when the
  // last table's block for it is evicted (Reserve), AllBlocksCleared on
  // ResetPrefixCache. Replaying them rebuilds the set of hashes registered
  // in any table (RegisteredHashesForTesting).
  BlockObserver* observer = nullptr;
};

// What Reserve hands out: one slot mapping per table.
struct GroupStepPlan {
  uint64_t id = 0;
  std::vector<SequenceId> sequences;
  std::vector<int64_t> num_tokens;
  std::vector<int64_t> first_positions;
  // slot_mappings[t]: one slot per reserved token (request order) in table t.
  std::vector<std::vector<int64_t>> slot_mappings;
  // Copy-on-write: whole pages to copy (every slot) before any write.
  std::vector<BlockCopy> copies;
};

struct GroupPrefixStats {
  int64_t queries = 0;
  int64_t query_tokens = 0;
  int64_t hit_tokens = 0;
  int64_t evictions = 0;
};

class GroupBlockManager {
 public:
  // InvalidArgument for num_blocks < 1, block_size < 1, no table or a
  // negative window.
  static absl::StatusOr<std::unique_ptr<GroupBlockManager>> Create(
      const GroupBlockManagerOptions& options);

  GroupBlockManager(const GroupBlockManager&) = delete;
  GroupBlockManager& operator=(const GroupBlockManager&) = delete;
  ~GroupBlockManager();

  // As BlockManager::AddSequence, with the hybrid hit above.
  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra = {});
  // Tokens AddSequence would find computed now; no change.
  absl::StatusOr<int64_t> PeekPrefix(absl::Span<const TokenId> prompt,
                                     const ExtraKey& extra = {}) const;
  // All or nothing: ResourceExhausted (no change) when every table's new
  // pages do not fit in free + evictable pages; NotFound, InvalidArgument and
  // FailedPrecondition as BlockManager::Reserve.
  absl::StatusOr<GroupStepPlan> Reserve(absl::Span<const ReserveRequest> batch);
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const;
  // The plan's tokens are written in every layer: they count as computed,
  // newly full blocks are registered, and sliding tables release the blocks
  // that left their window. NotFound for an unknown plan.
  absl::Status Commit(uint64_t plan_id);
  // Speculative Commit: accepted[i] (plan order; 0 <= accepted[i] <= the
  // tokens reserved for sequence i) of sequence i's tokens become computed;
  // the rest are rolled back in every table (the pages only they needed go
  // back to the free list, never hashed) and the known tokens end at the new
  // length. Entries of sequences no longer in the plan are ignored.
  // InvalidArgument for a wrong size or an entry out of range, NotFound for
  // an unknown plan; both change nothing.
  absl::Status Commit(uint64_t plan_id, absl::Span<const int64_t> accepted);
  // Takes one sequence out of a plan in flight, as Abort does for all.
  // NotFound for an unknown plan or sequence, InvalidArgument when the
  // sequence is not in that plan.
  absl::Status RemoveFromPlan(uint64_t plan_id, SequenceId id);
  // Rewinds a sequence to its first new_length computed tokens: entries past
  // ceil(new_length / block_size) are released in every table, known tokens
  // past new_length are dropped, and a now-partial shared or registered last
  // block is copied at the next Reserve. InvalidArgument for new_length
  // outside [0, computed], FailedPrecondition while in a plan or when a
  // sliding table would need a block it released (see above).
  absl::Status Truncate(SequenceId id, int64_t new_length);
  // The child shares the parent's blocks in every table. NotFound for an
  // unknown parent, AlreadyExists for an existing child, FailedPrecondition
  // while the parent is in a plan.
  absl::Status Fork(SequenceId parent, SequenceId child);
  // Drops every registration of every table (cached blocks become free;
  // blocks in use stay with their sequences, unhashed; a live sequence
  // registers nothing more) and tells the observer. FailedPrecondition while
  // a plan is in flight, changing nothing.
  absl::Status ResetPrefixCache();
  // Returns the plan's new pages; the sequences are as before Reserve.
  absl::Status Abort(uint64_t plan_id);
  // Releases every block of the sequence (and its part of a plan).
  absl::Status Free(SequenceId id);

  int32_t num_tables() const {
    return static_cast<int32_t>(options_.windows.size());
  }
  // A sequence's table (kNullBlock for released entries). NotFound for an
  // unknown sequence, InvalidArgument for a table out of range.
  absl::StatusOr<absl::Span<const BlockId>> BlockTable(SequenceId id,
                                                       int32_t table) const;
  // Every table of a batch of sequences with what its contents are known by
  // (BlockTableRef: serial new for every sequence made, also by Fork;
  // version changed whenever an entry is replaced or a table shrinks;
  // released = the table's leading kNullBlock entries): out[i * num_tables()
  // + t] is sequence ids[i]'s table t, valid until that sequence next
  // changes. NotFound naming an unknown sequence. REQUIRES: out.size() ==
  // ids.size() * num_tables().
  absl::Status TablesWithVersion(absl::Span<const SequenceId> ids,
                                 absl::Span<BlockTableRef> out) const;
  // A batch's tables of one table (HostBatchTable: padded, unused entries 0;
  // released entries kNullBlock).
  absl::StatusOr<HostBatchTable> BatchTable(absl::Span<const SequenceId> ids,
                                            int32_t table) const;
  absl::StatusOr<int64_t> ComputedLength(SequenceId id) const;
  // Computed + reserved + given, not yet reserved.
  absl::StatusOr<int64_t> KnownLength(SequenceId id) const;
  // Pages held by live sequences in `table` (each sequence's entries that
  // are not kNullBlock; a page two sequences share counts twice). O(1).
  int64_t HeldBlocks(int32_t table) const { return held_[table]; }
  int64_t num_sequences() const {
    return static_cast<int64_t>(sequences_.size());
  }
  PoolUsage Usage() const;
  const GroupPrefixStats& PrefixStats() const { return stats_; }
  const GroupBlockManagerOptions& options() const { return options_; }

  // Pool states, reference counts = holders, the prefix index's nodes and
  // registrations, plans. Internal with the first violation.
  absl::Status Validate() const;

  // The block registered in `table` for the chain of full blocks `prefix`
  // (a whole number of blocks) under `extra`, or -1: tests compute hybrid
  // hits independently from it.
  BlockId RegisteredForTesting(int32_t table, absl::Span<const TokenId> prefix,
                               const ExtraKey& extra = {}) const;
  // Every hash registered in at least one table.
  std::vector<BlockHash> RegisteredHashesForTesting() const {
    return index_.RegisteredHashes();
  }

 private:
  struct Sequence {
    std::vector<TokenId> tokens;    // Known tokens.
    std::vector<BlockHash> hashes;  // Chain of full known blocks.
    std::vector<std::vector<BlockId>> tables;
    std::vector<int64_t> released;  // Per table: leading null entries.
    // Per table: the page a copy-on-write of this plan replaced (still
    // referenced until Commit or Abort), or kNullBlock.
    std::vector<BlockId> cow_src;
    BlockHash root;
    int64_t adapter_id = 0;  // The extra key's, for KV events.
    int64_t computed = 0;
    int64_t reserved = 0;
    uint64_t plan_id = 0;
    int64_t registered = 0;  // Full blocks whose chain node exists.
    bool has_tip = false;    // Holds a reference on node hashes[registered-1].
    bool chain_broken = false;  // A colliding node: register nothing more.
    bool reset_cut = false;     // Alive across ResetPrefixCache: likewise.
    // TablesWithVersion: unique per sequence made (AddSequence, Fork), and
    // bumped whenever an entry of any table is replaced (copy-on-write,
    // Abort) or a table shrinks (rejected drafts, RemoveFromPlan, Truncate).
    uint64_t serial = 0;
    uint64_t version = 0;
  };
  struct Plan {
    std::vector<SequenceId> sequences;
    std::vector<size_t> tokens_before;
    // Per sequence, per table: entries before Reserve.
    std::vector<std::vector<size_t>> sizes_before;
  };

  explicit GroupBlockManager(const GroupBlockManagerOptions& options);

  // Validation and page count of a batch; fills `need`.
  absl::Status CheckBatch(absl::Span<const ReserveRequest> batch,
                          int64_t& need) const;
  int64_t NewPages(const Sequence& s, int64_t tokens) const;
  // Table t's last block is partial and shared or registered: the next
  // write must go to a copy.
  bool NeedsCopy(const Sequence& s, int32_t t) const;
  // Commit's work for one sequence of the plan.
  void CommitSequence(Sequence& s);
  // Drops a reservation's tokens past the first `accepted`.
  void RollBack(Sequence& s, int64_t accepted);
  BlockId TakePage();
  // The largest servable hit (in blocks) of a prompt; `hashes` its full
  // blocks' chain.
  int64_t HitBlocks(const BlockHash& root, absl::Span<const BlockHash> hashes,
                    absl::Span<const TokenId> prompt) const;
  // First block a table needs for a prefix of `blocks` full blocks.
  int64_t FirstNeeded(int32_t table, int64_t blocks) const;
  void HashKnown(Sequence& s) const;
  void RegisterFull(Sequence& s);
  void ReleaseOutOfWindow(Sequence& s);
  // Hands the call's stores / removals to the observer.
  void FlushEvents();
  void ReleaseAll(Sequence& s);
  void Unreserve(Sequence& s, size_t tokens_before,
                 const std::vector<size_t>& sizes_before);

  GroupBlockManagerOptions options_;
  internal::BlockPool pool_;
  internal::GroupPrefixIndex index_;
  absl::flat_hash_map<SequenceId, Sequence> sequences_;
  absl::flat_hash_map<uint64_t, Plan> plans_;
  uint64_t next_plan_id_ = 1;
  uint64_t next_serial_ = 1;  // 0 is no sequence (an empty row).

  GroupPrefixStats stats_;
  std::vector<int64_t> held_;  // Per table: non-null entries of all tables.
  // With an observer: per hash, the tables that register it, and the
  // stores / removals of the call in progress.
  absl::flat_hash_map<BlockHash, int32_t> tables_per_hash_;
  std::vector<StoredBlock> stored_;
  std::vector<BlockHash> removed_;
};

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_GROUP_BLOCK_MANAGER_H_
