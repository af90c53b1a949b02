// The layer-groups manager part of the fuzzer (fuzz/manager_fuzzer.cc hands
// it every input whose first byte is kGroupManagerInputTag): a small
// KVCacheManager (CPU backend) with sliding-window and full-attention groups
// of one shape (K and V, or K-only), driven with valid and hostile AddSequence,
// Reserve + Append, Commit (all or accepted counts), Abort, RemoveFromPlan,
// Fork, Truncate, Free and ResetPrefixCache. After every call: Validate()
// holds; the KV events so far rebuild the manager's cached hashes; a failed
// call left the pool, the lengths and every block table as they were; each
// sequence's tables have the entries its length needs, the released ones
// (kNullBlock) exactly where its windows ended; every token a layer still
// holds gathers to the reference quantization of what was appended; and a
// Truncate is refused exactly when a window would need a released block.
// Any violation aborts.

#ifndef KVCACHE_FUZZ_GROUP_MANAGER_HARNESS_H_
#define KVCACHE_FUZZ_GROUP_MANAGER_HARNESS_H_

#include <cstddef>
#include <cstdint>

namespace kvcache {

inline constexpr uint8_t kGroupManagerInputTag = 0xFE;

// `data` is the input after the tag.
void FuzzGroupManager(const uint8_t* data, size_t size);

}  // namespace kvcache

#endif  // KVCACHE_FUZZ_GROUP_MANAGER_HARNESS_H_
