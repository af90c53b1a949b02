// SequenceIndex: an open-addressing map from sequence id to Sequence* for
// BlockManager's per-step lookups (std::unordered_map's find costs a modulo by
// a prime and a hop to a node). Linear probing with backward-shift deletion at
// a load factor of at most 1/2. Growth builds the new table before touching
// the old one, so Reserve() is the only call that may throw (std::bad_alloc),
// and then it changes nothing. Does not own the sequences. Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_SEQUENCE_INDEX_H_
#define KVCACHE_ALLOCATOR_SEQUENCE_INDEX_H_

#include <cstdint>
#include <vector>

#include "absl/base/macros.h"
#include "allocator/sequence.h"

namespace kvcache {
namespace internal {

class SequenceIndex {
 public:
  SequenceIndex() : slots_(16), mask_(15) {}

  // The sequence under `id`, or nullptr.
  Sequence* Find(int64_t id) const {
    for (size_t i = Home(id, mask_);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.seq == nullptr) return nullptr;
      if (s.id == id) return s.seq;
    }
  }
  // Makes room for `n` entries. May throw std::bad_alloc, changing nothing.
  void Reserve(size_t n) {
    if (n * 2 <= slots_.size()) return;
    size_t capacity = slots_.size();
    while (capacity < n * 2) capacity *= 2;
    std::vector<Slot> fresh(capacity);
    const size_t mask = capacity - 1;
    for (const Slot& s : slots_) {
      if (s.seq == nullptr) continue;
      size_t i = Home(s.id, mask);
      while (fresh[i].seq != nullptr) i = (i + 1) & mask;
      fresh[i] = s;
    }
    slots_.swap(fresh);
    mask_ = mask;
  }
  // REQUIRES: id absent, seq != nullptr, Reserve(size() + 1) done.
  void Insert(int64_t id, Sequence* seq) {
    ABSL_ASSERT((size_ + 1) * 2 <= slots_.size());
    size_t i = Home(id, mask_);
    while (slots_[i].seq != nullptr) i = (i + 1) & mask_;
    slots_[i] = Slot{id, seq};
    ++size_;
  }
  // REQUIRES: id present.
  void Erase(int64_t id) {
    size_t i = Home(id, mask_);
    while (slots_[i].id != id || slots_[i].seq == nullptr) i = (i + 1) & mask_;
    // Backward shift: pull later members of the probe run into the hole.
    for (size_t j = (i + 1) & mask_; slots_[j].seq != nullptr;
         j = (j + 1) & mask_) {
      const size_t home = Home(slots_[j].id, mask_);
      // Slot j may move to hole i only if its home is not cyclically in (i, j].
      const bool stays =
          i < j ? (home > i && home <= j) : (home > i || home <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = Slot{};
    --size_;
  }
  size_t size() const { return size_; }

 private:
  struct Slot {
    int64_t id = 0;
    Sequence* seq = nullptr;  // nullptr: empty.
  };
  static size_t Home(int64_t id, size_t mask) {
    uint64_t h = static_cast<uint64_t>(id) * 0x9e3779b97f4a7c15ULL;
    return static_cast<size_t>(h ^ (h >> 32)) & mask;
  }

  std::vector<Slot> slots_;
  size_t mask_;
  size_t size_ = 0;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_SEQUENCE_INDEX_H_
