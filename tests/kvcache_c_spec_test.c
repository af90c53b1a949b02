/* The C API's speculative-decoding and scheduling calls (api/kvcache_c.h),
 * from C: a draft step committed with accepted counts, the plan layout,
 * removal from a plan, truncation, a side-effect-free prefix peek, never fits
 * vs not now with kvcache_last_shortfall, and hostile arguments. Exits non-zero
 * on the first failure. */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "api/kvcache_c.h"
#include "tests/c_check.h"

enum { H = 1, D = 8, BS = 4 };

/* Appends t rows of zeros to layer 0. */
static void append_rows(kvcache_manager* m, uint64_t plan, int64_t t) {
  static uint16_t data[64 * H * D];
  kvcache_tensor x = HostTensor3(data, KVCACHE_BFLOAT16, t, H, D);
  CHECK_IS(KVCACHE_OK, kvcache_append(m, plan, 0, &x, &x, NULL));
}

int main(void) {
  kvcache_config config;
  kvcache_manager* m = NULL;
  kvcache_config_init(&config);
  config.num_layers = 1;
  config.num_kv_heads = H;
  config.head_size = D;
  config.block_size = BS;
  config.cache_dtype = KVCACHE_BFLOAT16;
  config.input_dtype = KVCACHE_BFLOAT16;
  config.num_blocks = 8;
  CHECK_IS(KVCACHE_OK, kvcache_create(&config, &m));
  if (m == NULL) return 1;

  /* A prompt of 6, prefilled. */
  const int32_t prompt[6] = {1, 2, 3, 4, 5, 6};
  int64_t computed = -1;
  CHECK_IS(KVCACHE_OK,
           kvcache_add_sequence(m, 1, prompt, 6, 0, NULL, 0, &computed));
  kvcache_reserve_request r = {sizeof(kvcache_reserve_request), 1, 6, NULL, 0};
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  CHECK_IS(KVCACHE_OK, kvcache_reserve(m, &r, 1, NULL, &plan));
  append_rows(m, plan.id, 6);
  CHECK_IS(KVCACHE_OK, kvcache_commit(m, plan.id));

  /* A speculative step: the sampled token and 3 drafts, 1 accepted. */
  const int32_t step[4] = {7, 8, 9, 10};
  kvcache_reserve_request d = {sizeof(kvcache_reserve_request), 1, 4, step, 4};
  CHECK_IS(KVCACHE_OK, kvcache_reserve(m, &d, 1, NULL, &plan));
  int64_t seqs[2], offsets[2], counts[2], firsts[2], n = 0;
  CHECK_IS(KVCACHE_OK, kvcache_plan_layout(m, plan.id, 2, seqs, offsets, counts,
                                           firsts, &n));
  CHECK(n == 1 && seqs[0] == 1 && offsets[0] == 0 && counts[0] == 4 &&
        firsts[0] == 6);
  CHECK_IS(KVCACHE_OUT_OF_RANGE,
           kvcache_plan_layout(m, plan.id, 0, NULL, NULL, NULL, NULL, &n));
  append_rows(m, plan.id, 4);
  const int64_t too_many[1] = {5};
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_commit_accepted(m, plan.id, too_many, 1));
  CHECK(strstr(kvcache_last_error(NULL), "accepted[0] = 5") != NULL);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_commit_accepted(m, plan.id, NULL, 1));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_commit_accepted(m, plan.id, too_many, -1));
  const int64_t one[1] = {1};
  CHECK_IS(KVCACHE_OK, kvcache_commit_accepted(m, plan.id, one, 1));
  int64_t length = 0;
  CHECK_IS(KVCACHE_OK, kvcache_sequence_length(m, 1, &length));
  CHECK(length == 7);
  CHECK_IS(KVCACHE_NOT_FOUND, kvcache_commit_accepted(m, plan.id, one, 1));

  /* The drafts are not in the prefix cache; the peek changes no metric. */
  const int32_t other[11] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  kvcache_metrics before = KVCACHE_STRUCT_INIT(kvcache_metrics);
  kvcache_metrics after = KVCACHE_STRUCT_INIT(kvcache_metrics);
  CHECK_IS(KVCACHE_OK, kvcache_get_metrics(m, &before));
  int64_t cached = -1;
  CHECK_IS(KVCACHE_OK, kvcache_peek_prefix(m, other, 11, 0, NULL, 0, &cached));
  CHECK(cached == 4);
  CHECK_IS(KVCACHE_OK, kvcache_get_metrics(m, &after));
  CHECK(after.prefix_queries == before.prefix_queries);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_peek_prefix(m, other, -3, 0, NULL, 0, &cached));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_peek_prefix(m, NULL, 3, 0, NULL, 0, &cached));

  /* Truncate, and remove from a plan. */
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_truncate(m, 1, 8));
  CHECK_IS(KVCACHE_NOT_FOUND, kvcache_truncate(m, 42, 0));
  CHECK_IS(KVCACHE_OK, kvcache_truncate(m, 1, 5));
  CHECK_IS(KVCACHE_OK, kvcache_sequence_length(m, 1, &length));
  CHECK(length == 5);
  CHECK_IS(KVCACHE_OK,
           kvcache_add_sequence(m, 2, prompt, 3, 0, NULL, 0, &computed));
  kvcache_reserve_request both[2] = {
      {sizeof(kvcache_reserve_request), 1, 1, step, 1},
      {sizeof(kvcache_reserve_request), 2, 3, NULL, 0}};
  CHECK_IS(KVCACHE_OK, kvcache_reserve(m, both, 2, NULL, &plan));
  CHECK_IS(KVCACHE_NOT_FOUND, kvcache_remove_from_plan(m, plan.id, 9, NULL));
  CHECK_IS(KVCACHE_OK, kvcache_remove_from_plan(m, plan.id, 1, NULL));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_remove_from_plan(m, plan.id, 1, NULL));
  CHECK_IS(KVCACHE_OK,
           kvcache_plan_layout(m, plan.id, 2, NULL, NULL, counts, NULL, &n));
  CHECK(n == 2 && counts[0] == 0 && counts[1] == 3);
  append_rows(m, plan.id, 4);
  CHECK_IS(KVCACHE_OK, kvcache_commit(m, plan.id));
  CHECK_IS(KVCACHE_OK, kvcache_sequence_length(m, 1, &length));
  CHECK(length == 5);
  CHECK_IS(KVCACHE_OK, kvcache_validate(m));

  /* Never fits (more blocks than the pool) vs not now. */
  int32_t huge[40];
  for (int i = 0; i < 40; ++i) huge[i] = i;
  kvcache_shortfall s;
  memset(&s, 0, sizeof(s));
  CHECK_IS(KVCACHE_OUT_OF_RANGE,
           kvcache_add_sequence(m, 3, huge, 33, 0, NULL, 0, &computed));
  CHECK(kvcache_last_shortfall(&s) == 1);
  CHECK(s.never_fits == 1 && s.blocks_needed == 9 && s.blocks_total == 8);
  CHECK_IS(KVCACHE_OK,
           kvcache_add_sequence(m, 3, huge, 32, 0, NULL, 0, &computed));
  kvcache_reserve_request big = {sizeof(kvcache_reserve_request), 3, 32, NULL,
                                 0};
  CHECK_IS(KVCACHE_RESOURCE_EXHAUSTED,
           kvcache_reserve(m, &big, 1, NULL, &plan));
  CHECK(kvcache_last_shortfall(&s) == 1);
  CHECK(s.never_fits == 0 && s.blocks_needed == 8 && s.blocks_total == 8);
  CHECK(s.blocks_free + s.blocks_evictable < 8);
  CHECK_IS(KVCACHE_NOT_FOUND, kvcache_truncate(m, 77, 0));
  CHECK(kvcache_last_shortfall(&s) == 0);

  /* A NULL handle fails with a message. */
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_truncate(NULL, 1, 0));
  CHECK(strstr(kvcache_last_error(NULL), "NULL") != NULL);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_commit_accepted(NULL, 1, one, 1));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_plan_layout(NULL, 1, 0, NULL, NULL, NULL, NULL, NULL));

  kvcache_destroy(m);
  if (failures == 0) printf("kvcache_c_spec_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
