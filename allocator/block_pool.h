// BlockPool: the block metadata of one KV cache and the life cycle of every
// block (see the comment at the top of block_pool.cc). Blocks have ids 0..N-1;
// every transition is O(1) and allocates nothing. The pool knows nothing of
// hashes or sequences: the owner decides which blocks are worth caching
// (MarkHashed) and drops evicted blocks from its index. Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_BLOCK_POOL_H_
#define KVCACHE_ALLOCATOR_BLOCK_POOL_H_

#include <cstdint>
#include <vector>

#include "absl/base/macros.h"
#include "absl/status/status.h"

namespace kvcache {
namespace internal {

using BlockId = int32_t;

enum class BlockState : uint8_t { kFree, kCached, kInUse };

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // Free -> in use (ref 1). REQUIRES: num_free() > 0.
  BlockId AllocateFree();
  // Oldest cached -> in use (ref 1), unhashed. The caller drops it from its
  // index. REQUIRES: num_cached() > 0.
  BlockId EvictOldest();
  // Cached -> in use (ref 1), or in use -> ref + 1. REQUIRES: block is cached
  // or in use.
  void Acquire(BlockId block);
  // Acquire of each of n blocks, in order.
  void AcquireAll(const BlockId* blocks, size_t n);
  // In use -> ref - 1; at ref 0 a hashed block becomes cached (newest in the
  // LRU list), an unhashed one free. REQUIRES: block in use.
  void Release(BlockId block);
  // Marks an in-use block as carrying a hash (it will be cached, not freed, at
  // ref 0).
  void MarkHashed(BlockId block);
  // In use: hashed -> unhashed (an onboarded block whose copy failed; it is
  // freed, not cached, at ref 0). REQUIRES: block in use and hashed.
  void Unhash(BlockId block) {
    ABSL_ASSERT(meta_[block].state == BlockState::kInUse &&
                meta_[block].hashed);
    meta_[block].hashed = false;
  }
  // Drops every hash: cached blocks become free (oldest first, at the back of
  // the free list), hashed blocks in use stay in use, unhashed. O(blocks).
  void ClearHashes();

  // Prefetches a block's entry (for a transition soon).
  void Prefetch(BlockId block) const {
    __builtin_prefetch(&meta_[block], /*rw=*/1);
  }

  int32_t num_blocks() const { return num_blocks_; }
  int32_t num_free() const { return num_free_; }
  int32_t num_cached() const { return num_cached_; }
  int32_t num_used() const { return num_blocks_ - num_free_ - num_cached_; }
  BlockState state(BlockId block) const { return meta_[block].state; }
  int32_t ref_count(BlockId block) const { return meta_[block].ref_count; }
  bool hashed(BlockId block) const { return meta_[block].hashed; }

  // A walk of the LRU list, oldest first (the host tier's offload ahead):
  // the oldest cached block, the next newer one after cached `block`, -1 past
  // the newest.
  BlockId OldestCached() const {
    const int32_t n = meta_[LruHead()].next;
    return n == LruHead() ? -1 : n;
  }
  BlockId NewerCached(BlockId block) const {
    ABSL_ASSERT(meta_[block].state == BlockState::kCached);
    const int32_t n = meta_[block].next;
    return n == LruHead() ? -1 : n;
  }
  // How many times `block` has become cached (wrapping): a walk's bookmark
  // still stands where it was iff its block is cached with the same epoch.
  uint16_t cached_epoch(BlockId block) const {
    return meta_[block].cached_epoch;
  }

  // Walks both lists and every block: each block in exactly one state, list
  // links consistent, counts right. Internal with the first violation.
  absl::Status Validate() const;

 private:
  struct Meta {
    int32_t prev = -1;  // List links, used only while free or cached.
    int32_t next = -1;
    int32_t ref_count = 0;
    BlockState state = BlockState::kFree;
    bool hashed = false;
    uint16_t cached_epoch = 0;  // Fills the entry's padding (16 bytes).
  };
  // List ids: sentinels live after the blocks, at num_blocks_ (free) and
  // num_blocks_ + 1 (LRU).
  int32_t FreeHead() const { return num_blocks_; }
  int32_t LruHead() const { return num_blocks_ + 1; }
  static void AcquireIn(Meta* meta, int32_t& num_cached, BlockId b);
  void PushBack(int32_t head, int32_t node);
  void Unlink(int32_t node);
  int32_t PopFront(int32_t head);
  absl::Status ValidateList(int32_t head, BlockState state,
                            int32_t expected) const;

  int32_t num_blocks_;
  int32_t num_free_;
  int32_t num_cached_ = 0;
  std::vector<Meta> meta_;  // num_blocks_ blocks + 2 sentinels.
};

// ---- Transitions (the life cycle is written out in block_pool.cc) ---------

inline void BlockPool::PushBack(int32_t head, int32_t node) {
  const int32_t last = meta_[head].prev;
  meta_[node].prev = last;
  meta_[node].next = head;
  meta_[last].next = node;
  meta_[head].prev = node;
}

inline void BlockPool::Unlink(int32_t node) {
  Meta& m = meta_[node];
  meta_[m.prev].next = m.next;
  meta_[m.next].prev = m.prev;
  m.prev = -1;
  m.next = -1;
}

inline int32_t BlockPool::PopFront(int32_t head) {
  const int32_t node = meta_[head].next;
  ABSL_ASSERT(node != head);
  Unlink(node);
  return node;
}

inline BlockId BlockPool::AllocateFree() {
  ABSL_ASSERT(num_free_ > 0);
  const BlockId b = PopFront(FreeHead());
  Meta& m = meta_[b];
  ABSL_ASSERT(m.state == BlockState::kFree && m.ref_count == 0 && !m.hashed);
  m.state = BlockState::kInUse;
  m.ref_count = 1;
  --num_free_;
  return b;
}

inline BlockId BlockPool::EvictOldest() {
  ABSL_ASSERT(num_cached_ > 0);
  const BlockId b = PopFront(LruHead());
  Meta& m = meta_[b];
  ABSL_ASSERT(m.state == BlockState::kCached && m.ref_count == 0 && m.hashed);
  m.state = BlockState::kInUse;
  m.ref_count = 1;
  m.hashed = false;
  --num_cached_;
  return b;
}

// The transition itself, over entries and a counter the caller may hold in
// locals (AcquireAll: a loop's stores to them would otherwise make the
// compiler reload both each time).
inline void BlockPool::AcquireIn(Meta* meta, int32_t& num_cached, BlockId b) {
  Meta& m = meta[b];
  if (m.state == BlockState::kCached) {
    ABSL_ASSERT(m.ref_count == 0);
    meta[m.prev].next = m.next;  // Unlink from the LRU list.
    meta[m.next].prev = m.prev;
    m.prev = -1;
    m.next = -1;
    m.state = BlockState::kInUse;
    --num_cached;
  }
  ABSL_ASSERT(m.state == BlockState::kInUse);
  ++m.ref_count;
}

inline void BlockPool::Acquire(BlockId b) {
  AcquireIn(meta_.data(), num_cached_, b);
}

inline void BlockPool::AcquireAll(const BlockId* blocks, size_t n) {
  Meta* meta = meta_.data();
  int32_t num_cached = num_cached_;
  for (size_t i = 0; i < n; ++i) AcquireIn(meta, num_cached, blocks[i]);
  num_cached_ = num_cached;
}

inline void BlockPool::Release(BlockId b) {
  Meta& m = meta_[b];
  ABSL_ASSERT(m.state == BlockState::kInUse && m.ref_count > 0);
  if (--m.ref_count > 0) return;
  if (m.hashed) {
    m.state = BlockState::kCached;
    ++m.cached_epoch;
    PushBack(LruHead(), b);
    ++num_cached_;
  } else {
    m.state = BlockState::kFree;
    // Most recently freed first: its memory is likeliest to be warm.
    const int32_t head = FreeHead();
    const int32_t first = meta_[head].next;
    m.prev = head;
    m.next = first;
    meta_[first].prev = b;
    meta_[head].next = b;
    ++num_free_;
  }
}

inline void BlockPool::MarkHashed(BlockId b) {
  ABSL_ASSERT(meta_[b].state == BlockState::kInUse && !meta_[b].hashed);
  meta_[b].hashed = true;
}

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_POOL_H_
