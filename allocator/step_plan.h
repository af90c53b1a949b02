// StepPlan: what BlockManager::Reserve hands out for one step - a slot per
// reserved token and the copy-on-write block copies to run first. Part of
// BlockManager's interface (block_manager.h includes it).

#ifndef KVCACHE_ALLOCATOR_STEP_PLAN_H_
#define KVCACHE_ALLOCATOR_STEP_PLAN_H_

#include <cstdint>
#include <vector>

#include "core/ids.h"

namespace kvcache {

struct BlockCopy {
  BlockId src = 0;
  BlockId dst = 0;
};

// The result of Reserve: where each reserved token goes. Valid until Commit or
// Abort.
struct StepPlan {
  uint64_t id = 0;                    // Unique per BlockManager; never reused.
  std::vector<SequenceId> sequences;  // In request order.
  std::vector<int64_t> num_tokens;    // Per sequence, in request order.
  // Per sequence: the position of its first reserved token (its computed
  // length at Reserve).
  std::vector<int64_t> first_positions;
  // One slot per reserved token, in request order.
  std::vector<int64_t> slot_mapping;
  // Copy-on-write: run before any write of the step.
  std::vector<BlockCopy> copies;
};

}  // namespace kvcache

#endif  // KVCACHE_ALLOCATOR_STEP_PLAN_H_
