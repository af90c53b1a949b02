// BlockManager::Impl: the state behind BlockManager, shared by block_manager.cc
// (operations) and block_manager_validate.cc (invariant checks). Internal to
// //allocator.

#ifndef KVCACHE_ALLOCATOR_BLOCK_MANAGER_IMPL_H_
#define KVCACHE_ALLOCATOR_BLOCK_MANAGER_IMPL_H_

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

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

 private:
  int64_t size_;
  int shift_;
};

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
  absl::Status CheckBatch(absl::Span<const ReserveRequest> batch) const;
  absl::Status Commit(uint64_t plan_id);
  absl::Status Abort(uint64_t plan_id);
  absl::Status Free(SequenceId id);
  absl::Status Fork(SequenceId parent, SequenceId child);
  absl::StatusOr<const internal::Sequence*> Find(SequenceId id) const;
  absl::StatusOr<BatchBlockTable> BatchTable(
      absl::Span<const SequenceId> ids) const;
  absl::StatusOr<int64_t> TokensThatFit(SequenceId id) const;
  absl::Status Validate() const;

  const BlockManagerOptions& options() const { return options_; }
  const internal::BlockPool& pool() const { return pool_; }
  const PrefixCacheStats& stats() const { return stats_; }
  int64_t num_sequences() const {
    return static_cast<int64_t>(sequences_.size());
  }

 private:
  using Sequence = internal::Sequence;
  struct PlanRecord {
    std::vector<Sequence*> sequences;  // nullptr once freed.
  };

  BlockHash Hash(const BlockHash& parent,
                 absl::Span<const TokenId> tokens) const {
    return options_.hash_function_for_testing != nullptr
               ? options_.hash_function_for_testing(parent, tokens)
               : HashBlock(parent, tokens);
  }
  BlockId AllocateBlock();
  int64_t BlocksNeeded(const Sequence& s, int64_t num_tokens) const;
  // A partial last block shared with another holder must be copied before
  // this sequence writes it. Inline: Reserve asks it of every sequence.
  bool NeedsCopy(const Sequence& s) const {
    return s.tail_maybe_shared && math_.Mod(s.computed) != 0 &&
           pool_.ref_count(s.blocks.back()) > 1;
  }
  void ReleaseAll(Sequence& s);
  void HashNewFullBlocks(Sequence& s);
  int64_t MatchPrefix(Sequence& s, absl::Span<const TokenId> prompt);
  absl::Status ValidateSequence(const Sequence& s,
                                std::vector<int32_t>& refs) const;
  absl::Status ValidateIndex() const;

  BlockManagerOptions options_;
  internal::BlockMath math_;
  internal::BlockPool pool_;
  internal::PrefixCacheIndex index_;
  // std::unordered_map: a throwing insert (std::bad_alloc) changes nothing,
  // which absl::flat_hash_map does not promise.
  std::unordered_map<SequenceId, std::unique_ptr<Sequence>> sequences_;
  // The same sequences, for fast lookups by id (kept in step with sequences_).
  internal::SequenceIndex by_id_;
  std::unordered_map<uint64_t, PlanRecord> plans_;
  uint64_t next_plan_id_ = 1;
  PrefixCacheStats stats_;
  // Reserve/CheckBatch scratch: the batch's sequences, and the duplicate-check
  // epoch.
  mutable std::vector<Sequence*> batch_;
  mutable uint64_t batch_epoch_ = 0;
  mutable int64_t batch_tokens_ = 0;  // Tokens the checked batch reserves.
};

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_MANAGER_IMPL_H_
