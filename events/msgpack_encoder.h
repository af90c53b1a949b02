// Encodes a KVEventBatch in the msgpack layout of vLLM's KV events (its
// msgspec structs with array_like and tag: each struct an array, an event's
// first element its type name), so routers that read vLLM's events read ours:
//
//   batch            [ts: float64, events: [event...], data_parallel_rank: int]
//   BlockStored      ["BlockStored", block_hashes: [uint64...],
//                     parent_block_hash: uint64 | nil, token_ids: [int...],
//                     block_size: int, lora_id: int | nil, medium: str]
//   BlockRemoved     ["BlockRemoved", block_hashes: [uint64...], medium: str]
//   AllBlocksCleared ["AllBlocksCleared"]
//
// medium is "GPU" for the device cache and "CPU" for the host tier (vLLM's
// names for its primary and offloaded tiers, whatever the backend); lora_id is
// the adapter id, nil for adapter 0. Stateless, thread-safe.

#ifndef KVCACHE_EVENTS_MSGPACK_ENCODER_H_
#define KVCACHE_EVENTS_MSGPACK_ENCODER_H_

#include <cstdint>
#include <string>

#include "core/kv_event.h"

namespace kvcache {
namespace internal {

inline constexpr char kMediumDevice[] = "GPU";
inline constexpr char kMediumHost[] = "CPU";

// REQUIRES: data_parallel_rank >= 0.
std::string EncodeEventBatch(const KVEventBatch& batch,
                             int32_t data_parallel_rank);

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_EVENTS_MSGPACK_ENCODER_H_
