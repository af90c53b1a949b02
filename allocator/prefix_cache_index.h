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
#include <cstring>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "absl/base/macros.h"
#include "absl/hash/hash.h"
#include "absl/types/span.h"
#include "allocator/block_hash.h"
#include "allocator/block_hash_table.h"

namespace kvcache {
namespace internal {

using BlockId = int32_t;

class PrefixCacheIndex {
 public:
  PrefixCacheIndex(int32_t num_blocks, int32_t block_size);

  PrefixCacheIndex(const PrefixCacheIndex&) = delete;
  PrefixCacheIndex& operator=(const PrefixCacheIndex&) = delete;

  // The block registered under `hash`, or -1.
  BlockId Find(const BlockHash& hash) const { return table_.Find(hash); }
  void Prefetch(const BlockHash& hash) const { table_.Prefetch(hash); }
  // Loads the table slot FindOrInsert(hash) probes first
  // (BlockHashTable::Touch).
  void Touch(const BlockHash& hash) const { table_.Touch(hash); }
  // Prefetches what Matches(), content_id() and FindOrInsert() touch of
  // `block`.
  void PrefetchBlock(BlockId block) const {
    __builtin_prefetch(&tokens_[static_cast<size_t>(block) * block_size_], 1);
    __builtin_prefetch(&ids_[block], 1);
  }
  // Prefetches the ids Erase() reads of `block`.
  void PrefetchIds(BlockId block) const { __builtin_prefetch(&ids_[block]); }
  // Exact confirmation of a candidate: its parent is `parent_id` and its
  // block_size tokens equal `tokens`. REQUIRES: block registered.
  bool Matches(BlockId block, uint64_t parent_id, const TokenId* tokens) const {
    ABSL_ASSERT(registered(block));
    return ids_[block].parent == parent_id &&
           TokensEqual(&tokens_[static_cast<size_t>(block) * block_size_],
                       tokens);
  }
  // The length of the longest run of registered blocks that continue a chain
  // from `root_id` (at most `count`): block i has hash hashes[i], its tokens
  // equal tokens[i * block_size ...] and its parent is block i - 1 (the root
  // for i = 0). Writes the blocks to blocks[i] (room for `count`) and the last
  // one's content id (root_id if none) to `last_id`.
  int64_t LongestMatch(const BlockHash* hashes, const TokenId* tokens,
                       int64_t count, uint64_t root_id, BlockId* blocks,
                       uint64_t& last_id) const;
  // LongestMatch for 16-token blocks and the XXH3 block hash, with the hash
  // chain made in the same loop, a few blocks ahead of the compare (its
  // latency then overlaps the lookups): appends the hashes of the `full`
  // blocks of `tokens` to `hashes` (which needs the capacity) and matches up
  // to `count` <= full of them. REQUIRES: block_size 16.
  int64_t HashAndMatch16(const BlockHash& root_hash, const TokenId* tokens,
                         int64_t full, int64_t count, uint64_t root_id,
                         std::vector<BlockHash>& hashes, BlockId* blocks,
                         uint64_t& last_id) const;
  // Registers `block` under `hash` (its new content id in `content_id`) and
  // returns -1, unless a block is registered under `hash` already: returns
  // that one and changes nothing. REQUIRES: `block` not registered; `tokens`
  // holds block_size tokens.
  BlockId FindOrInsert(const BlockHash& hash, BlockId block, uint64_t parent_id,
                       const TokenId* tokens, uint64_t& content_id);
  // Drops a registered block (it was evicted).
  void Erase(BlockId block);
  // Registers `block` under `hash` with the ids a registration had in
  // another tier (the host tier; allocator/host_tier.h), so chains through it
  // still confirm. REQUIRES: `block` and `hash` not registered.
  void Restore(const BlockHash& hash, BlockId block, uint64_t parent_id,
               uint64_t content_id, const TokenId* tokens);

  bool registered(BlockId block) const { return ids_[block].content != 0; }
  uint64_t content_id(BlockId block) const { return ids_[block].content; }
  const BlockHash& hash(BlockId block) const { return ids_[block].hash; }
  size_t size() const { return table_.size(); }
  int32_t num_blocks() const { return static_cast<int32_t>(ids_.size()); }
  const BlockHashTable& table() const { return table_; }

  // A content id no block holds yet (for chains that must never match
  // anything).
  uint64_t NewId() { return next_id_++; }

  // Roots. The root id of an extra key is what a chain's first block names as
  // its parent: equal keys (adapter id and salt bytes, compared exactly) get
  // equal ids, different keys different ones, never a content id. A root is
  // reference counted by the sequences that hold it and by the registered
  // blocks that name it as parent, and forgotten at zero (issue #12: one
  // root per distinct salt was kept forever), so the index holds at most
  // one root per live sequence or cached block.
  //
  // A reference on the root of (adapter_id, salt), made if new. May throw
  // std::bad_alloc, changing nothing.
  uint64_t AcquireRoot(int64_t adapter_id, const std::string& salt);
  // The root id of (adapter_id, salt), or 0 when no one holds it. No change.
  uint64_t FindRoot(int64_t adapter_id, const std::string& salt) const;
  // Another reference on a held root (Fork). REQUIRES: IsRoot(root_id), held.
  void AcquireRoot(uint64_t root_id);
  // Drops a reference; the root goes with the last. REQUIRES: held.
  void ReleaseRoot(uint64_t root_id);
  static bool IsRoot(uint64_t id) { return (id & kRootBit) != 0; }
  size_t num_roots() const { return roots_.size(); }
  // References of a held root (0 if unknown).
  int64_t root_refs(uint64_t root_id) const;
  // Calls f(root_id, refs) for every root.
  template <typename F>
  void ForEachRoot(F f) const {
    for (const auto& [key, root] : roots_) f(root.id, root.refs);
  }
  // The parent content id of a registered block, and its stored tokens.
  uint64_t parent_id(BlockId block) const { return ids_[block].parent; }
  const TokenId* stored_tokens(BlockId block) const {
    return &tokens_[static_cast<size_t>(block) * block_size_];
  }

 private:
  struct Ids {             // One per block: 32 bytes, two to a cache line.
    BlockHash hash;        // Registered under (Erase finds its slot by it).
    uint64_t parent = 0;   // Content id of the parent.
    uint64_t content = 0;  // 0 when not registered.
  };
  // Inline, with a branch-free 64-byte compare for 16-token blocks: a hit
  // compares every block of the prompt.
  bool TokensEqual(const TokenId* a, const TokenId* b) const {
    return TokensEqual(a, b, block_size_);
  }
  static bool TokensEqual(const TokenId* a, const TokenId* b,
                          int32_t block_size) {
#ifdef __SSE2__
    if (block_size == 16) {
      const __m128i* x = reinterpret_cast<const __m128i*>(a);
      const __m128i* y = reinterpret_cast<const __m128i*>(b);
      const __m128i eq = _mm_and_si128(
          _mm_and_si128(
              _mm_cmpeq_epi8(_mm_loadu_si128(x), _mm_loadu_si128(y)),
              _mm_cmpeq_epi8(_mm_loadu_si128(x + 1), _mm_loadu_si128(y + 1))),
          _mm_and_si128(
              _mm_cmpeq_epi8(_mm_loadu_si128(x + 2), _mm_loadu_si128(y + 2)),
              _mm_cmpeq_epi8(_mm_loadu_si128(x + 3), _mm_loadu_si128(y + 3))));
      return _mm_movemask_epi8(eq) == 0xffff;
    }
#endif
    return std::memcmp(a, b, block_size * sizeof(TokenId)) == 0;
  }

  uint64_t Register(const BlockHash& hash, BlockId block, uint64_t parent_id,
                    uint64_t content_id, const TokenId* tokens);

  static constexpr uint64_t kRootBit = uint64_t{1} << 63;
  using RootKey = std::pair<int64_t, std::string>;
  struct Root {
    uint64_t id = 0;
    int64_t refs = 0;
  };
  using RootMap = std::unordered_map<RootKey, Root, absl::Hash<RootKey>>;

  int32_t block_size_;
  uint64_t next_id_ = 1;  // 0 means "not registered".
  uint64_t next_root_ = kRootBit | 1;
  BlockHashTable table_;
  // std::unordered_map: an insert that throws std::bad_alloc leaves it
  // unchanged, which Debian's Abseil flat_hash_map (20220623) does not (it
  // frees an invalid pointer afterwards; seen in the allocation-failure test).
  RootMap roots_;
  // Root id -> its entry in roots_ (whose nodes never move).
  std::unordered_map<uint64_t, RootMap::value_type*> root_by_id_;
  std::vector<Ids> ids_;         // Per block.
  std::vector<TokenId> tokens_;  // num_blocks * block_size.
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_PREFIX_CACHE_INDEX_H_
