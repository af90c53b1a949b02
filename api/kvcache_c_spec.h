/* The C API's calls for speculative decoding and scheduling (issue #15), next
 * to kvcache_c.h (which they extend; include either). Same conventions:
 * every fallible call returns a kvcache_status, kvcache_last_error() has the
 * message of the calling thread's last failed call, a failed call changes
 * nothing, a NULL handle fails with a message. The semantics are those of the
 * same methods of kv_cache_manager.h.
 *
 * A speculative step:
 *
 *   kvcache_reserve(m, {seq, 1 + k, {sampled, draft_1..draft_k}}, ...)
 *   kvcache_append(...) for every layer, all 1 + k tokens
 *   kvcache_commit_accepted(m, plan.id, accepted, batch_size)
 *
 * Never fits vs not now: kvcache_reserve and kvcache_add_sequence return
 * KVCACHE_RESOURCE_EXHAUSTED when the pool cannot hold the request now
 * (preempt and retry) and KVCACHE_OUT_OF_RANGE when it never can (the
 * sequence needs more blocks than the whole pool); kvcache_last_shortfall
 * then gives the numbers. */
#ifndef KVCACHE_API_KVCACHE_C_SPEC_H_
#define KVCACHE_API_KVCACHE_C_SPEC_H_

#include <stddef.h>
#include <stdint.h>

#include "api/kvcache_c.h"

#ifdef __cplusplus
extern "C" {
#endif

/* kvcache::Shortfall (core/shortfall.h). */
typedef struct kvcache_shortfall {
  int64_t blocks_needed; /* new blocks (not now), or the sequence's (never) */
  int64_t blocks_free;
  int64_t blocks_evictable;
  int64_t blocks_total;
  int32_t never_fits; /* 1 for KVCACHE_OUT_OF_RANGE, 0 otherwise */
} kvcache_shortfall;

/* The shortfall of the calling thread's last failed call: 1 and *shortfall
 * filled when that call failed for lack of room, 0 (and *shortfall left as
 * it was) when it failed otherwise or no call failed yet. Per thread, like
 * kvcache_last_error. */
int32_t kvcache_last_shortfall(kvcache_shortfall* shortfall);

/* Commit keeping accepted[i] of sequence i's reserved tokens (batch order,
 * num_accepted = the plan's batch size); the rest are rolled back. */
kvcache_status kvcache_commit_accepted(kvcache_manager* manager,
                                       uint64_t plan_id,
                                       const int64_t* accepted,
                                       int64_t num_accepted);
/* Takes one sequence out of a plan in flight; its rows of the plan's slot
 * mapping become -1 (padding), rewritten on `stream`. */
kvcache_status kvcache_remove_from_plan(kvcache_manager* manager,
                                        uint64_t plan_id, int64_t sequence,
                                        void* stream);
/* Rewinds a sequence to its first new_length committed tokens. */
kvcache_status kvcache_truncate(kvcache_manager* manager, int64_t sequence,
                                int64_t new_length);
/* The prompt tokens kvcache_add_sequence would find computed now, with no
 * pin and no metric change. The extra key as for kvcache_add_sequence. */
kvcache_status kvcache_peek_prefix(kvcache_manager* manager,
                                   const int32_t* prompt, int64_t prompt_len,
                                   int64_t adapter_id, const uint8_t* salt,
                                   size_t salt_len, int64_t* cached_tokens);
/* The layout of a plan in flight, per sequence in batch order: its id, its
 * first row in the slot mapping, its token count (0 once removed) and the
 * position of its first token. Fills up to `capacity` entries of each
 * non-NULL array; *num_sequences gets the plan's batch size.
 * KVCACHE_OUT_OF_RANGE (nothing written) when capacity is too small. */
kvcache_status kvcache_plan_layout(kvcache_manager* manager, uint64_t plan_id,
                                   int64_t capacity, int64_t* sequences,
                                   int64_t* slot_offsets, int64_t* num_tokens,
                                   int64_t* first_positions,
                                   int64_t* num_sequences);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVCACHE_API_KVCACHE_C_SPEC_H_ */
