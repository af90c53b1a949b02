// PrefixCacheIndex: chained block hash -> block, for the full committed blocks
// worth sharing.
//
// A hash only proposes a candidate; Matches() confirms it exactly. Each
// registered block stores its token ids and the content id of its parent (every
// registration gets a fresh 64-bit content id, never reused; a chain's root is
// the id of its extra key). A candidate matches when its tokens equal the
// query's and its parent is the very block content the query matched one
// position earlier, so by induction the whole prefix and extra key are equal:
// neither an accidental nor a forged hash collision can share data. Not
// thread-safe.

#ifndef KVCACHE_ALLOCATOR_PREFIX_CACHE_INDEX_H_
#define KVCACHE_ALLOCATOR_PREFIX_CACHE_INDEX_H_

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/types/span.h"
#include "allocator/block_hash.h"

namespace kvcache {
namespace internal {

using BlockId = int32_t;

class PrefixCacheIndex {
 public:
  PrefixCacheIndex(int32_t num_blocks, int32_t block_size);

  PrefixCacheIndex(const PrefixCacheIndex&) = delete;
  PrefixCacheIndex& operator=(const PrefixCacheIndex&) = delete;

  // The block registered under `hash`, or -1.
  BlockId Find(const BlockHash& hash) const {
    auto it = map_.find(hash);
    return it == map_.end() ? -1 : it->second;
  }
  // Exact confirmation of a candidate. REQUIRES: block registered.
  bool Matches(BlockId block, uint64_t parent_id,
               absl::Span<const TokenId> tokens) const;
  // Registers `block` under `hash` and returns its new content id.
  // REQUIRES: hash not registered, block not registered, tokens.size() ==
  // block_size.
  uint64_t Insert(const BlockHash& hash, BlockId block, uint64_t parent_id,
                  absl::Span<const TokenId> tokens);
  // Allocates what `n` more Inserts need (map nodes and buckets), so that
  // they cannot throw. May throw std::bad_alloc (nothing observable changes).
  // std::unordered_map, not absl::flat_hash_map: its inserts are strongly
  // exception-safe and its nodes can be made ahead of time.
  void Reserve(size_t n);
  // Drops a registered block (it was evicted).
  void Erase(BlockId block);

  bool registered(BlockId block) const { return content_id_[block] != 0; }
  uint64_t content_id(BlockId block) const { return content_id_[block]; }
  const BlockHash& hash(BlockId block) const { return hash_[block]; }
  size_t size() const { return map_.size(); }
  using Map = std::unordered_map<BlockHash, BlockId, absl::Hash<BlockHash>>;
  const Map& map() const { return map_; }

  // A content id no block holds yet (for chains that must never match
  // anything).
  uint64_t NewId() { return next_id_++; }
  // The root id of an extra key: equal keys get equal ids, different keys
  // different ids.
  uint64_t RootId(int64_t adapter_id, const std::string& salt);

 private:
  int32_t block_size_;
  uint64_t next_id_ = 1;  // 0 means "not registered".
  Map map_;
  Map spare_;  // Nodes made by Reserve for later Inserts.
  std::unordered_map<std::pair<int64_t, std::string>, uint64_t,
                     absl::Hash<std::pair<int64_t, std::string>>>
      roots_;
  std::vector<BlockHash> hash_;       // Per block.
  std::vector<uint64_t> content_id_;  // Per block; 0 when not registered.
  std::vector<uint64_t> parent_id_;   // Per block.
  std::vector<TokenId> tokens_;       // num_blocks * block_size.
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_PREFIX_CACHE_INDEX_H_
