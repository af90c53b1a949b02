// PlanSequence: one sequence's part of a step plan, as KVCacheManager reports
// it (StepPlanInfo::sequences, PlanLayout). Plain value type.

#ifndef KVCACHE_CORE_PLAN_SEQUENCE_H_
#define KVCACHE_CORE_PLAN_SEQUENCE_H_

#include <cstdint>

#include "core/ids.h"

namespace kvcache {

// Its tokens are slot_mapping[slot_offset, slot_offset + num_tokens), at
// positions first_position, first_position + 1, ... (first_position is the
// sequence's computed length at Reserve). After RemoveFromPlan, num_tokens is
// 0 and its former rows of the slot mapping are padding (-1).
struct PlanSequence {
  SequenceId sequence = 0;
  int64_t slot_offset = 0;
  int64_t num_tokens = 0;
  int64_t first_position = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_CORE_PLAN_SEQUENCE_H_
