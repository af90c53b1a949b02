// Block life cycle. Every block is in exactly one of three states:
//
//   free    on the free list, ref 0, no hash: holds nothing worth keeping.
//   cached  on the LRU list (oldest first), ref 0, hashed: holds a committed
//           full block that a later sequence may share through the prefix cache.
//   in use  on no list, ref >= 1: held by that many sequences (and pending
//           copy-on-write sources); hashed or not.
//
// Transitions, each in exactly one function:
//
//   free   -> in use    AllocateFree   allocate
//   cached -> in use    EvictOldest    allocate when the free list is empty;
//                                      the block loses its hash
//   cached -> in use    Acquire        a prefix-cache hit on an unreferenced block
//   in use -> in use    Acquire /      sharing: ref changes and stays >= 1
//                       Release
//   in use -> cached    Release        ref reaches 0, hashed
//   in use -> free      Release        ref reaches 0, unhashed
//   in use: unhashed -> hashed
//                       MarkHashed     its step was committed and it is full
//   in use: hashed -> unhashed
//                       Unhash         an onboarded block whose copy failed
//   cached -> free      ClearHashes    the prefix cache is reset; at the same
//   in use: hashed -> unhashed         time every hashed block in use loses
//                                      its hash
//
// A hash is gained or lost only through the prefix cache (prefix_cache.h),
// whose functions for it (RegisterFilled -> MarkHashed, Evict -> EvictOldest,
// Clear -> ClearHashes) also update its index and tell the BlockObserver
// (block_observer.h): "stored", "removed", "all cleared".

// The transitions are inline in block_pool.h: they run once per block of every
// prefix hit, allocation and release. ClearHashes, which is rare, is here.

#include "allocator/block_pool.h"

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {

BlockPool::BlockPool(int32_t num_blocks)
    : num_blocks_(num_blocks), num_free_(0), meta_(num_blocks + 2) {
  for (int32_t head : {FreeHead(), LruHead()}) {
    meta_[head].prev = head;
    meta_[head].next = head;
  }
  for (BlockId b = 0; b < num_blocks_; ++b) PushBack(FreeHead(), b);
  num_free_ = num_blocks_;
}

void BlockPool::ClearHashes() {
  while (num_cached_ > 0) {
    const BlockId b = PopFront(LruHead());
    Meta& m = meta_[b];
    ABSL_ASSERT(m.state == BlockState::kCached && m.ref_count == 0 && m.hashed);
    m.state = BlockState::kFree;
    m.hashed = false;
    PushBack(FreeHead(), b);
    --num_cached_;
    ++num_free_;
  }
  for (BlockId b = 0; b < num_blocks_; ++b) meta_[b].hashed = false;
}

absl::Status BlockPool::ValidateList(int32_t head, BlockState state,
                                     int32_t expected) const {
  const char* name = head == FreeHead() ? "free list" : "LRU list";
  int32_t count = 0;
  int32_t prev = head;
  for (int32_t node = meta_[head].next; node != head; node = meta_[node].next) {
    if (node < 0 || node >= num_blocks_) {
      return absl::InternalError(absl::StrCat(name, " links to ", node));
    }
    if (meta_[node].prev != prev) {
      return absl::InternalError(absl::StrCat(name, ": block ", node,
                                              " has prev ", meta_[node].prev,
                                              ", expected ", prev));
    }
    if (meta_[node].state != state) {
      return absl::InternalError(
          absl::StrCat("block ", node, " is on the ", name, " in state ",
                       static_cast<int>(meta_[node].state)));
    }
    if (++count > expected) {
      return absl::InternalError(
          absl::StrCat(name, " holds more than ", expected, " blocks"));
    }
    prev = node;
  }
  if (meta_[head].prev != prev)
    return absl::InternalError(absl::StrCat(name, ": bad tail"));
  if (count != expected) {
    return absl::InternalError(absl::StrCat(
        name, " holds ", count, " blocks, counter says ", expected));
  }
  return absl::OkStatus();
}

absl::Status BlockPool::Validate() const {
  if (num_free_ < 0 || num_cached_ < 0 ||
      num_free_ + num_cached_ > num_blocks_) {
    return absl::InternalError(absl::StrCat("bad counts: free ", num_free_,
                                            ", cached ", num_cached_,
                                            ", total ", num_blocks_));
  }
  int32_t in_use = 0;
  for (BlockId b = 0; b < num_blocks_; ++b) {
    const Meta& m = meta_[b];
    const bool ok =
        (m.state == BlockState::kFree && m.ref_count == 0 && !m.hashed) ||
        (m.state == BlockState::kCached && m.ref_count == 0 && m.hashed) ||
        (m.state == BlockState::kInUse && m.ref_count > 0 && m.prev == -1);
    if (!ok) {
      return absl::InternalError(
          absl::StrCat("block ", b, ": state ", static_cast<int>(m.state),
                       ", ref ", m.ref_count, ", hashed ", m.hashed));
    }
    if (m.state == BlockState::kInUse) ++in_use;
  }
  if (absl::Status s = ValidateList(FreeHead(), BlockState::kFree, num_free_);
      !s.ok())
    return s;
  if (absl::Status s =
          ValidateList(LruHead(), BlockState::kCached, num_cached_);
      !s.ok()) {
    return s;
  }
  if (in_use != num_used()) {
    return absl::InternalError(absl::StrCat(in_use, " blocks in use, expected ",
                                            num_used(),
                                            " = total - free - cached"));
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvcache
