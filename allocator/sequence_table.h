// SequenceTable: the live sequences of one BlockManager, by id. It owns them
// (a map whose nodes never move, so a Sequence* stays valid until Erase),
// finds them fast (SequenceIndex), and remembers the lookups of the last
// batch, position by position, so that a decode step naming the same
// sequences in the same order as the last one finds each with one compare.
// That lookup cache is valid only while no sequence is added or removed (a
// generation counter). Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_SEQUENCE_TABLE_H_
#define KVCACHE_ALLOCATOR_SEQUENCE_TABLE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/base/optimization.h"
#include "absl/status/status.h"
#include "allocator/sequence.h"
#include "allocator/sequence_index.h"
#include "core/ids.h"

namespace kvcache {
namespace internal {

class SequenceTable {
 public:
  SequenceTable() = default;
  SequenceTable(const SequenceTable&) = delete;
  SequenceTable& operator=(const SequenceTable&) = delete;

  // The sequence under `id`, or nullptr.
  Sequence* Find(SequenceId id) const { return by_id_.Find(id); }
  // Takes `seq` (its id not present), gives it a new serial (Sequence::serial)
  // and returns it. May throw
  // std::bad_alloc, changing nothing (`seq` is then destroyed).
  Sequence& Insert(std::unique_ptr<Sequence> seq);
  // Destroys the sequence under `id`. REQUIRES: present.
  void Erase(SequenceId id);
  size_t size() const { return sequences_.size(); }
  // Calls f(Sequence&) for every sequence, in no particular order.
  template <typename F>
  void ForEach(F f) const {
    for (const auto& [id, seq] : sequences_) f(*seq);
  }

  // ---- The batch lookup cache (Reserve, CanReserve) ----
  //
  // Sizes the cache for a batch of n (forgetting it if a sequence came or
  // went since). May throw std::bad_alloc.
  void PrepareLookups(size_t n) const;
  // The sequence of batch position i (nullptr if unknown), remembered for
  // the next batch. REQUIRES: PrepareLookups(n > i).
  Sequence* Lookup(size_t i, SequenceId id) const {
    if (ABSL_PREDICT_TRUE(i < cache_valid_ && cache_ids_[i] == id))
      return batch_[i];
    return LookupMiss(i, id);
  }
  // Lookup with the count of valid entries in the caller's `valid` (a local
  // in a hot loop), updated on a miss.
  Sequence* LookupAt(size_t i, SequenceId id, size_t& valid) const {
    if (ABSL_PREDICT_TRUE(i < valid && cache_ids_[i] == id)) return batch_[i];
    Sequence* s = LookupMiss(i, id);
    valid = cache_valid_;
    return s;
  }
  // Leading positions whose lookup is remembered.
  size_t cache_valid() const { return cache_valid_; }
  // The sequences the last batch's lookups found, by position.
  Sequence* const* batch() const { return batch_.data(); }
  // Resets the marks (`reserved`) of the batch's first n sequences.
  void UnmarkBatch(size_t n) const {
    for (size_t i = 0; i < n; ++i) batch_[i]->reserved = 0;
  }

  // The map and the id index hold the same sequences under their own ids,
  // and each sequence is well formed on its own: computed + reserved within
  // its known tokens, a block for each started block of them, the tail block
  // its last one, a plan exactly while it has reserved tokens (and a
  // copy-on-write source only then). Internal with the first violation.
  absl::Status Validate(int64_t block_size) const;

 private:
  Sequence* LookupMiss(size_t i, SequenceId id) const;

  // std::unordered_map: a throwing insert (std::bad_alloc) changes nothing,
  // which absl::flat_hash_map does not promise.
  std::unordered_map<SequenceId, std::unique_ptr<Sequence>> sequences_;
  // The same sequences, for fast lookups by id (kept in step with sequences_).
  SequenceIndex by_id_;
  // Bumped whenever a sequence is added or removed: the lookup cache below is
  // valid only while it is unchanged.
  uint64_t generation_ = 1;
  // The ids and sequences of the last batch (position by position), valid for
  // generation cache_gen_.
  mutable std::vector<SequenceId> cache_ids_;
  mutable std::vector<Sequence*> batch_;
  mutable uint64_t cache_gen_ = 0;
  mutable size_t cache_valid_ = 0;  // Leading entries valid for cache_gen_.
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_SEQUENCE_TABLE_H_
