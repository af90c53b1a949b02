// BlockManager::Impl: the state behind BlockManager, shared by block_manager.cc
// (sequences and the prefix cache), block_manager_step.cc (Reserve, Commit,
// Abort), block_manager_lookup.cc and block_manager_validate.cc (invariant
// checks). Internal to //allocator.

#ifndef KVCACHE_ALLOCATOR_BLOCK_MANAGER_IMPL_H_
#define KVCACHE_ALLOCATOR_BLOCK_MANAGER_IMPL_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/base/optimization.h"
#include "allocator/block_manager.h"
#include "allocator/block_pool.h"
#include "allocator/prefix_cache_index.h"
#include "allocator/sequence.h"
#include "allocator/sequence_index.h"

namespace kvcache {
namespace internal {

// Token position -> (block, offset) arithmetic. Shifts when the block size is a
// power of two: a 64-bit division costs tens of cycles on the per-token path.
class BlockMath {
 public:
  explicit BlockMath(int64_t block_size)
      : size_(block_size),
        shift_((block_size & (block_size - 1)) == 0
                   ? __builtin_ctzll(static_cast<uint64_t>(block_size))
                   : -1) {}
  int64_t size() const { return size_; }
  // REQUIRES: x >= 0.
  int64_t Div(int64_t x) const { return shift_ >= 0 ? x >> shift_ : x / size_; }
  int64_t Mod(int64_t x) const {
    return shift_ >= 0 ? x & (size_ - 1) : x % size_;
  }
  int64_t CeilDiv(int64_t x) const { return Div(x + size_ - 1); }
  bool pow2() const { return shift_ >= 0; }

 private:
  int64_t size_;
  int shift_;
};

// Grows `v`'s capacity to at least `n` geometrically, so that per-step
// reservations stay amortized O(1). May throw std::bad_alloc, changing nothing.
template <class T>
void ReserveGeometric(std::vector<T>& v, size_t n) {
  if (v.capacity() < n) v.reserve(std::max(n, 2 * v.capacity()));
}

}  // namespace internal

class BlockManager::Impl {
 public:
  explicit Impl(const BlockManagerOptions& options)
      : options_(options),
        math_(options.block_size),
        pool_(options.num_blocks),
        index_(options.enable_prefix_caching ? options.num_blocks : 0,
               options.block_size) {}

  absl::StatusOr<int64_t> AddSequence(SequenceId id,
                                      absl::Span<const TokenId> prompt,
                                      const ExtraKey& extra);
  absl::StatusOr<StepPlan> Reserve(absl::Span<const ReserveRequest> batch);
  absl::Status CanReserve(absl::Span<const ReserveRequest> batch) const;
  absl::Status Commit(uint64_t plan_id);
  absl::Status Abort(uint64_t plan_id);
  absl::Status Free(SequenceId id);
  absl::Status Fork(SequenceId parent, SequenceId child);
  absl::StatusOr<const internal::Sequence*> Find(SequenceId id) const;
  absl::StatusOr<HostBatchTable> BatchTable(
      absl::Span<const SequenceId> ids) const;
  absl::StatusOr<int64_t> TokensThatFit(SequenceId id) const;
  absl::Status Validate() const;

  const BlockManagerOptions& options() const { return options_; }
  const internal::BlockPool& pool() const { return pool_; }
  const PrefixCacheStats& stats() const { return stats_; }
  int64_t num_sequences() const {
    return static_cast<int64_t>(sequences_.size());
  }
  size_t num_prefix_roots() const { return index_.num_roots(); }

 private:
  using Sequence = internal::Sequence;
  // An uncommitted plan. Records are recycled (their vectors keep their
  // capacity), so a decode step allocates nothing for its bookkeeping.
  struct PlanRecord {
    std::vector<Sequence*> sequences;   // In batch order; nullptr once freed.
    std::vector<size_t> tokens_before;  // Per sequence: Abort's token count.
    // Batch positions whose commit fills a block (only with prefix caching).
    std::vector<int32_t> fillers;
  };
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

  BlockHash Hash(const BlockHash& parent,
                 absl::Span<const TokenId> tokens) const {
    return options_.hash_function_for_testing != nullptr
               ? options_.hash_function_for_testing(parent, tokens)
               : HashBlock(parent, tokens);
  }
  // HashBlocks, or the test seam's hash.
  void HashChain(const BlockHash& parent, const TokenId* tokens, size_t count,
                 std::vector<BlockHash>& out) const {
    const size_t bs = static_cast<size_t>(options_.block_size);
    if (options_.hash_function_for_testing == nullptr)
      return HashBlocks(parent, tokens, bs, count, out);
    BlockHash h = parent;
    for (size_t i = 0; i < count; ++i) {
      h = options_.hash_function_for_testing(
          h, absl::Span<const TokenId>(tokens + i * bs, bs));
      out.push_back(h);
    }
  }
  BlockId AllocateBlock();
  // A partial last block shared with another holder must be copied before
  // this sequence writes it. Inline: Reserve asks it of every sequence.
  bool NeedsCopy(const Sequence& s) const {
    return s.tail_maybe_shared && math_.Mod(s.computed) != 0 &&
           pool_.ref_count(s.tail_block) > 1;
  }
  int64_t BlocksNeeded(const Sequence& s, int64_t num_tokens, bool copy) const {
    return math_.CeilDiv(s.computed + num_tokens) - math_.CeilDiv(s.computed) +
           (copy ? 1 : 0);
  }
  // The sequence of batch position i (nullptr if unknown), through the cache
  // of the last batches' lookups while no sequence was added or removed.
  Sequence* Lookup(size_t i, SequenceId id) const {
    if (ABSL_PREDICT_TRUE(i < cache_valid_ && cache_ids_[i] == id))
      return batch_[i];
    return LookupMiss(i, id);
  }
  // Lookup with the count of valid cache entries in the caller's `valid`.
  Sequence* LookupAt(size_t i, SequenceId id, size_t& valid) const {
    if (ABSL_PREDICT_TRUE(i < valid && cache_ids_[i] == id)) return batch_[i];
    Sequence* s = LookupMiss(i, id);
    valid = cache_valid_;
    return s;
  }
  Sequence* LookupMiss(size_t i, SequenceId id) const;
  // Sizes the lookup cache for a batch of n. May throw std::bad_alloc.
  void PrepareLookups(size_t n) const;
  // Resets the marks (`reserved`) of the batch's first n sequences.
  void UnmarkBatch(size_t n) const;
  PlanRecord& SpareRecord(size_t batch_size);
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
  void ApplySlow(const SlowPath& path, absl::Span<const ReserveRequest> batch,
                 StepPlan& plan);
  void RecyclePlan(std::unordered_map<uint64_t, PlanRecord*>::iterator it);
  void ReleaseAll(Sequence& s);
  void PrepareRegistration(Sequence& s) const;
  void HashNewFullBlocks(Sequence& s);
  int64_t MatchPrefix(Sequence& s, absl::Span<const TokenId> prompt) const;
  absl::Status ValidateSequence(const Sequence& s,
                                std::vector<int32_t>& refs) const;
  absl::Status ValidateChain(const Sequence& s, const std::string& name) const;
  absl::Status ValidateTail(const Sequence& s, const std::string& name) const;
  absl::Status ValidatePlans() const;
  absl::Status ValidateIndex() const;
  absl::Status ValidateRoots() const;

  BlockManagerOptions options_;
  internal::BlockMath math_;
  internal::BlockPool pool_;
  internal::PrefixCacheIndex index_;
  // std::unordered_map: a throwing insert (std::bad_alloc) changes nothing,
  // which absl::flat_hash_map does not promise.
  std::unordered_map<SequenceId, std::unique_ptr<Sequence>> sequences_;
  // The same sequences, for fast lookups by id (kept in step with sequences_).
  internal::SequenceIndex by_id_;
  // Bumped whenever a sequence is added or removed: the lookup cache below is
  // valid only while it is unchanged.
  uint64_t generation_ = 1;
  std::unordered_map<uint64_t, PlanRecord*> plans_;
  // Every plan record, and those not in use (capacity for all, so that
  // recycling a record never allocates).
  std::vector<std::unique_ptr<PlanRecord>> records_;
  std::vector<PlanRecord*> spare_records_;
  uint64_t next_plan_id_ = 1;
  PrefixCacheStats stats_;
  // Lookup cache and Reserve scratch: the ids and sequences of the last
  // checked batch (position by position), valid for generation cache_gen_.
  mutable std::vector<SequenceId> cache_ids_;
  mutable std::vector<Sequence*> batch_;
  mutable uint64_t cache_gen_ = 0;
  mutable size_t cache_valid_ = 0;  // Leading entries valid for cache_gen_.
  std::vector<SlowPath> slow_;      // Reserve's scratch.
};

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_MANAGER_IMPL_H_
