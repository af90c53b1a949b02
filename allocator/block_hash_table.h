// BlockHashTable: a fixed-capacity open-addressing map from BlockHash to
// BlockId for the prefix-cache index. Sized once for every block of the pool,
// it never rehashes or allocates after construction, keeps no tombstones
// (linear probing with backward-shift deletion), and lets a caller prefetch a
// key's slot before looking it up. Slots are chosen from the hash mixed with a
// per-table random key, so crafted prompts cannot aim at one probe chain.
// Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_BLOCK_HASH_TABLE_H_
#define KVCACHE_ALLOCATOR_BLOCK_HASH_TABLE_H_

#include <cstdint>
#include <vector>

#include "absl/base/macros.h"
#include "allocator/block_hash.h"

namespace kvcache {
namespace internal {

class BlockHashTable {
 public:
  // Holds up to max_entries keys at a load factor of at most 3/4.
  BlockHashTable(int32_t max_entries, uint64_t seed) : key_(seed | 1) {
    size_t capacity = 16;
    while (capacity * 3 < static_cast<size_t>(max_entries) * 4) capacity *= 2;
    slots_.resize(capacity);
    mask_ = capacity - 1;
    shift_ = 64 - __builtin_ctzll(capacity);
  }

  // The block under `hash`, or -1.
  int32_t Find(const BlockHash& hash) const { return reader().Find(hash); }
  void Prefetch(const BlockHash& hash) const { reader().Prefetch(hash); }
  // Loads the home slot of `hash` (and returns its block, or -1), so that a
  // lookup soon after finds it in cache. Unlike Prefetch a load is never
  // dropped, and a run of them for independent keys overlaps: for a batch
  // touched just before it is looked up (a commit's filled blocks).
  int32_t Touch(const BlockHash& hash) const {
    return *static_cast<const volatile int32_t*>(&slots_[Home(hash)].block);
  }

 private:
  struct Slot {
    BlockHash hash;
    int32_t block = -1;
  };

 public:
  // Find and Prefetch over a copy of the table's geometry, for loops of
  // lookups: held in locals, it is not reloaded after every store the
  // compiler cannot tell apart from the table's members. Valid while the
  // table is not changed.
  class Reader {
   public:
    int32_t Find(const BlockHash& hash) const {
      for (size_t i = Home(hash);; i = (i + 1) & mask_) {
        const Slot& s = slots_[i];
        if (s.block < 0) return -1;
        if (s.hash == hash) return s.block;
      }
    }
    void Prefetch(const BlockHash& hash) const {
      __builtin_prefetch(&slots_[Home(hash)]);
    }

   private:
    friend class BlockHashTable;
    Reader(const Slot* slots, size_t mask, int shift, uint64_t key)
        : slots_(slots), mask_(mask), shift_(shift), key_(key) {}
    size_t Home(const BlockHash& h) const {
      return static_cast<size_t>(((h.low ^ h.high) * key_) >> shift_) & mask_;
    }
    const Slot* slots_;
    size_t mask_;
    int shift_;
    uint64_t key_;
  };
  Reader reader() const { return Reader(slots_.data(), mask_, shift_, key_); }
  // The block under `hash` if there is one; else inserts `block` under it
  // and returns -1 (one probe for both). REQUIRES: size() < max_entries.
  int32_t FindOrInsert(const BlockHash& hash, int32_t block) {
    size_t i = Home(hash);
    for (; slots_[i].block >= 0; i = (i + 1) & mask_) {
      if (slots_[i].hash == hash) return slots_[i].block;
    }
    slots_[i] = Slot{hash, block};
    ++size_;
    return -1;
  }
  // Returns whether the hash was present.
  bool Erase(const BlockHash& hash) {
    size_t i = Home(hash);
    for (;; i = (i + 1) & mask_) {
      if (slots_[i].block < 0) return false;
      if (slots_[i].hash == hash) break;
    }
    // Backward shift: pull later members of the probe run into the hole.
    for (size_t j = (i + 1) & mask_; slots_[j].block >= 0;
         j = (j + 1) & mask_) {
      const size_t home = Home(slots_[j].hash);
      // Slot j may move to hole i only if its home is not cyclically in (i, j].
      const bool stays =
          i < j ? (home > i && home <= j) : (home > i || home <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i].block = -1;
    --size_;
    return true;
  }
  size_t size() const { return size_; }

  template <typename F>
  void ForEach(F f) const {
    for (const Slot& s : slots_) {
      if (s.block >= 0) f(s.hash, s.block);
    }
  }

 private:
  size_t Home(const BlockHash& h) const { return reader().Home(h); }

  uint64_t key_;
  size_t mask_ = 0;
  int shift_ = 0;
  size_t size_ = 0;
  std::vector<Slot> slots_;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_HASH_TABLE_H_
