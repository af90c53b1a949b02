// The layer-groups part of the fuzzer (fuzz/manager_fuzzer.cc hands it every
// input whose first byte is kGroupInputTag): a hostile LayerGroup config for
// ValidateConfig, then a GroupBlockManager driven with valid and hostile
// calls (AddSequence, Reserve, Commit with or without accepted counts, Abort,
// RemoveFromPlan, Fork, Truncate, Free, lookups), its invariants checked
// after each. Any violation aborts.

#ifndef KVCACHE_FUZZ_GROUP_HARNESS_H_
#define KVCACHE_FUZZ_GROUP_HARNESS_H_

#include <cstddef>
#include <cstdint>

namespace kvcache {

inline constexpr uint8_t kGroupInputTag = 0xFF;

// `data` is the input after the tag.
void FuzzLayerGroups(const uint8_t* data, size_t size);

}  // namespace kvcache

#endif  // KVCACHE_FUZZ_GROUP_HARNESS_H_
