// The integer ids every layer of kvcache shares: sequences (chosen by the
// engine), blocks (handed out by the allocator, indexing the caches' first
// dimension) and tokens (the model's vocabulary ids, part of a block's
// identity in the prefix cache). Plain aliases; no state.

#ifndef KVCACHE_CORE_IDS_H_
#define KVCACHE_CORE_IDS_H_

#include <cstdint>

namespace kvcache {

using SequenceId = int64_t;
using BlockId = int32_t;
using TokenId = int32_t;

}  // namespace kvcache

#endif  // KVCACHE_CORE_IDS_H_
