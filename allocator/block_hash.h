// Chained 128-bit block hashes for the prefix cache (DESIGN.md section 4).
//
// A full block's hash is XXH3-128 over (parent block's hash, the block's token
// ids). The first block's parent is the hash of the sequence's extra key
// (adapter id and salt), so blocks of different extra keys never hash alike by
// construction. Hashes only find candidates: the prefix cache index confirms
// every hit by exact comparison. Thread-compatible, no state.

#ifndef KVCACHE_ALLOCATOR_BLOCK_HASH_H_
#define KVCACHE_ALLOCATOR_BLOCK_HASH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/types/span.h"

namespace kvcache {

using TokenId = int32_t;

struct BlockHash {
  uint64_t low = 0;
  uint64_t high = 0;

  friend bool operator==(const BlockHash& a, const BlockHash& b) {
    return a.low == b.low && a.high == b.high;
  }
  friend bool operator!=(const BlockHash& a, const BlockHash& b) {
    return !(a == b);
  }
  template <typename H>
  friend H AbslHashValue(H h, const BlockHash& x) {
    return H::combine(std::move(h), x.low, x.high);
  }
};

// Replaces HashBlock (a test seam to force collisions). Must be deterministic.
using BlockHashFunction = BlockHash (*)(const BlockHash& parent,
                                        absl::Span<const TokenId> tokens);

// The root of a chain: a hash of the extra key.
BlockHash HashExtraKey(int64_t adapter_id, const std::string& salt);

// XXH3-128 of the parent hash followed by the token ids' bytes.
BlockHash HashBlock(const BlockHash& parent, absl::Span<const TokenId> tokens);

// Appends to `out` the chained hashes of `count` consecutive blocks of
// `block_size` tokens: HashBlock(parent, block 0), then each block's hash with
// the previous one as its parent. For a whole prompt at once: the common block
// sizes run without a call per block. Allocates only if `out` lacks the
// capacity.
void HashBlocks(const BlockHash& parent, const TokenId* tokens,
                size_t block_size, size_t count, std::vector<BlockHash>& out);

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_BLOCK_HASH_H_
