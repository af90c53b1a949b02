// BlockPool: the block metadata of one KV cache and the life cycle of every
// block (see the comment at the top of block_pool.cc). Blocks have ids 0..N-1;
// every transition is O(1) and allocates nothing. The pool knows nothing of
// hashes or sequences: the owner decides which blocks are worth caching
// (MarkHashed) and drops evicted blocks from its index. Not thread-safe.

#ifndef KVCACHE_ALLOCATOR_BLOCK_POOL_H_
#define KVCACHE_ALLOCATOR_BLOCK_POOL_H_

#include <cstdint>
#include <vector>

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
  // In use -> ref - 1; at ref 0 a hashed block becomes cached (newest in the
  // LRU list), an unhashed one free. REQUIRES: block in use.
  void Release(BlockId block);
  // Marks an in-use block as carrying a hash (it will be cached, not freed, at
  // ref 0).
  void MarkHashed(BlockId block);

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
  };
  // List ids: sentinels live after the blocks, at num_blocks_ (free) and
  // num_blocks_ + 1 (LRU).
  int32_t FreeHead() const { return num_blocks_; }
  int32_t LruHead() const { return num_blocks_ + 1; }
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

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_POOL_H_
