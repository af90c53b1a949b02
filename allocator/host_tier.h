// HostTier: the bookkeeping of the host-memory tier behind the device cache
// (DESIGN.md section 11): which block registrations live in which host slot,
// and the tier's own LRU. It holds no K/V: the manager copies a block's bytes
// into slot s of its host pool when it offloads, and back when it onboards.
//
// A registration lives in exactly one tier. When the prefix cache evicts a
// device block, its registration (hash, parent and content ids, token ids,
// adapter) moves here with the same content id, so chains that continue on the
// device (or the host) still confirm exactly (prefix_cache_index.h); a hit
// takes it back out (Take) to be onboarded into a fresh device block. A hash
// may be here and on the device at once only as a stale entry: stored under
// a parent no chain reaches any more, while the device registered the same
// content anew under a new one (the prefix cache looks a commit's blocks up
// here only where they could match); an offload of that hash replaces it.
//
// Slot states:
//
//   free     on the free stack: holds nothing.
//   stored   on the LRU list (oldest first) and in the hash table.
//   pinned   taken by Take this call: in neither, and not reusable until
//            ReleasePinned (the onboard copy reads it; a later offload into
//            the same slot is ordered after that read by the copy queue).
//   reserved taken by ReserveSlot for an offload ahead (a copy of a cached
//            device block made before its eviction): in neither until
//            InsertReserved registers the block there (its eviction) or
//            Unreserve frees it (the copy went unused).
//
// Find first reads a small filter over the stored hashes: most lookups are
// misses (every block that becomes full on the device is looked up), and the
// filter answers them without touching the table, a cache miss per lookup in
// a large tier. A bucket has a counter (a byte: how many stored hashes map
// there, so that drops can clear it) and a bit (counter nonzero), and Find
// reads only the bit. With 16 buckets a slot, a 64 GiB tier at the README's
// GPU shape (63,550 slots) has 1 MiB of counters and 128 KiB of bits, which
// stay in a core's cache between steps, and about 6 % of misses (1 - e^-1/16)
// reach the table.
//
// Fixed capacity: nothing allocates after construction (but Validate, which
// recounts the filter's buckets in a scratch vector). Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_HOST_TIER_H_
#define KVCACHE_ALLOCATOR_HOST_TIER_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "allocator/block_hash.h"
#include "allocator/block_hash_table.h"

namespace kvcache {
namespace internal {

// A block registration outside the device index.
struct TierEntry {
  BlockHash hash;
  BlockHash parent_hash;  // Zero when first_in_chain.
  uint64_t parent_id = 0;
  uint64_t content_id = 0;  // Kept across tiers.
  int64_t adapter_id = 0;
  bool first_in_chain = false;
};

class HostTier {
 public:
  // May throw std::bad_alloc. REQUIRES: num_slots >= 1, block_size >= 1.
  // filter_buckets: the filter's counters (rounded up to a power of two, at
  // least 2); 0 = 16 a slot. Tests pass 2 to saturate it.
  HostTier(int32_t num_slots, int32_t block_size, int64_t filter_buckets = 0);

  HostTier(const HostTier&) = delete;
  HostTier& operator=(const HostTier&) = delete;

  int32_t num_slots() const { return num_slots_; }
  int32_t num_stored() const { return num_stored_; }
  int32_t num_pinned() const { return static_cast<int32_t>(pinned_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_reserved() const { return num_reserved_; }

  // The slot registered under `hash`, or -1.
  int32_t Find(const BlockHash& hash) const {
    if (!FilterBit(FilterIndex(hash))) return -1;
    return table_.Find(hash);
  }
  // Starts loading what the next inserts read (the prefix cache's evictions,
  // which come in runs): the filter counter and table slot of `next_hash`,
  // the slot it will take (the next free one, or when none is free the
  // second oldest, which the insert after this call's drops), and for the
  // oldest slot after that, its entry (read by the drop after next) and,
  // the entry being cached by now in a run, its hash's table slot and
  // counter.
  void PrefetchInserts(const BlockHash& next_hash) const {
    __builtin_prefetch(&filter_[FilterIndex(next_hash)], 1);
    table_.Prefetch(next_hash);
    if (!free_.empty()) {
      const int32_t s = free_.back();
      __builtin_prefetch(&entries_[s], 1);
      __builtin_prefetch(&tokens_[static_cast<size_t>(s) * block_size_], 1);
      return;
    }
    const int32_t oldest = next_[Head()];
    if (oldest == Head()) return;
    const int32_t second = next_[oldest];
    if (second == Head()) return;
    __builtin_prefetch(&tokens_[static_cast<size_t>(second) * block_size_], 1);
    const BlockHash& h = entries_[second].hash;
    __builtin_prefetch(&filter_[FilterIndex(h)], 1);
    table_.Prefetch(h);
    if (const int32_t third = next_[second]; third != Head()) {
      __builtin_prefetch(&entries_[third], 1);
    }
  }
  // Exact confirmation, as PrefixCacheIndex::Matches. REQUIRES: slot stored.
  bool Matches(int32_t slot, uint64_t parent_id, const TokenId* tokens) const;
  const TierEntry& entry(int32_t slot) const { return entries_[slot]; }
  const TokenId* tokens(int32_t slot) const {
    return &tokens_[static_cast<size_t>(slot) * block_size_];
  }
  bool stored(int32_t slot) const { return state_[slot] == kStored; }
  bool reserved(int32_t slot) const { return state_[slot] == kReserved; }

  // A free slot for a new entry, or -1 when every slot is stored or pinned
  // (the caller drops the oldest first: DropOldest).
  bool HasFreeSlot() const { return !free_.empty(); }
  // Stores `entry` (newest in the LRU) in a free slot and returns the slot.
  // REQUIRES: HasFreeSlot(); the hash not stored.
  int32_t Insert(const TierEntry& entry, const TokenId* tokens);
  // Free -> reserved: a slot for an offload ahead. REQUIRES: HasFreeSlot().
  int32_t ReserveSlot();
  // Reserved -> free.
  void Unreserve(int32_t slot);
  // Reserved -> stored: Insert into the slot the offload ahead filled.
  // REQUIRES: slot reserved; the hash not stored.
  void InsertReserved(int32_t slot, const TierEntry& entry,
                      const TokenId* tokens);
  // The oldest stored slot, or -1.
  int32_t Oldest() const;
  // Stored -> free. Returns the dropped entry.
  TierEntry Drop(int32_t slot);
  // Stored -> pinned (a hit being onboarded). Returns the entry.
  TierEntry Take(int32_t slot);
  // Pinned -> reserved: an onboarded slot kept as its block's copy ahead
  // (its bytes are the block's). ReleasePinned passes it by.
  void KeepPinned(int32_t slot);
  // Stored -> reserved: as KeepPinned, for a registration that moves to the
  // device without a copy (a promotion). Returns the entry.
  TierEntry Keep(int32_t slot);
  // Every pinned slot -> free.
  void ReleasePinned();
  // Every stored slot -> free (ResetPrefixCache). Calls f(entry) for each.
  template <typename F>
  void Clear(F f) {
    while (num_stored_ > 0) f(Drop(Oldest()));
  }
  // Calls f(slot, entry) for every stored slot.
  template <typename F>
  void ForEach(F f) const {
    for (int32_t s = next_[Head()]; s != Head(); s = next_[s])
      f(s, entries_[s]);
  }

  // Each slot in exactly one state, the LRU list, free stack and table
  // consistent, counts right. Internal with the first violation.
  absl::Status Validate() const;

 private:
  enum State : uint8_t { kFree, kStored, kPinned, kReserved };
  int32_t Head() const { return num_slots_; }
  void Unlink(int32_t slot);
  // Fills slot s (no longer free) as Insert.
  void Store(int32_t s, const TierEntry& entry, const TokenId* tokens);
  size_t FilterIndex(const BlockHash& h) const {
    return static_cast<size_t>(((h.low ^ h.high) * filter_key_) >>
                               filter_shift_);
  }
  bool FilterBit(size_t b) const {
    return (filter_bits_[b >> 6] >> (b & 63)) & 1;
  }
  // Counts a stored hash in bucket b (Store) or uncounts it (Unlink), and
  // keeps b's bit equal to "counter nonzero".
  void FilterAdd(size_t b);
  void FilterRemove(size_t b);
  // A counter at kFilterStuck stays there (never decremented): it may
  // overstate, never understate, how many stored hashes map to it.
  static constexpr uint8_t kFilterStuck = 255;

  int32_t num_slots_;
  int32_t block_size_;
  int32_t num_stored_ = 0;
  int32_t num_reserved_ = 0;
  BlockHashTable table_;
  std::vector<uint8_t> filter_;        // Stored hashes per bucket (saturating).
  std::vector<uint64_t> filter_bits_;  // Bit b: filter_[b] != 0.
  uint64_t filter_key_;  // Odd, random: buckets cannot be aimed at.
  int filter_shift_;     // 64 - log2(filter_.size()).
  std::vector<TierEntry> entries_;
  std::vector<TokenId> tokens_;
  std::vector<State> state_;
  std::vector<int32_t> prev_, next_;  // LRU links; sentinel at num_slots_.
  std::vector<int32_t> free_;         // Free slots (a stack).
  std::vector<int32_t> pinned_;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_HOST_TIER_H_
