// The 64-bit external form of a block's chained hash, the block hash that KV
// events publish (README "KV events"): the low 64 bits of the prefix cache's
// 128-bit XXH3 hash (BlockHash::low, XXH128_hash_t::low64). XXH3-128's halves
// are each a full-quality 64-bit hash of the same input, so the external form
// is as well mixed as the internal one; only the collision odds change (two
// distinct cached blocks share one with odds of about n^2 / 2^65 for n blocks).
// Routers compare these numbers only; the manager itself always matches on the
// full 128 bits and then on the tokens. Stateless.

#ifndef KVCACHE_EVENTS_EXTERNAL_HASH_H_
#define KVCACHE_EVENTS_EXTERNAL_HASH_H_

#include <cstdint>

#include "allocator/block_hash.h"

namespace kvcache {

inline uint64_t ExternalBlockHash(const BlockHash& hash) { return hash.low; }

}  // namespace kvcache

#endif  // KVCACHE_EVENTS_EXTERNAL_HASH_H_
