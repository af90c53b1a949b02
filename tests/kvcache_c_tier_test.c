/* The C API's host tier (api/kvcache_c.h), from C: host_tier_bytes in the
 * config, kvcache_add_sequence_hits splitting a hit by tier after the pool
 * evicted (offloaded) the prompt's blocks, the tier's metrics, and hostile
 * arguments. Exits non-zero on the first failure. */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "api/kvcache_c.h"
#include "tests/c_check.h"

enum { H = 1, D = 8, BS = 4, BLOCKS = 4 };

/* Adds `id` with `prompt` and computes all of it (rows of `value`). */
static void compute(kvcache_manager* m, int64_t id, const int32_t* prompt,
                    int64_t n, uint16_t value) {
  static uint16_t data[64 * H * D];
  for (int i = 0; i < 64 * H * D; ++i) data[i] = value;
  int64_t computed = -1;
  CHECK_IS(KVCACHE_OK,
           kvcache_add_sequence(m, id, prompt, n, 0, NULL, 0, &computed));
  kvcache_reserve_request r = {sizeof(kvcache_reserve_request), id,
                               n - computed, NULL, 0};
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  CHECK_IS(KVCACHE_OK, kvcache_reserve(m, &r, 1, NULL, &plan));
  kvcache_tensor x = HostTensor3(data, KVCACHE_BFLOAT16, n - computed, H, D);
  CHECK_IS(KVCACHE_OK, kvcache_append(m, plan.id, 0, &x, &x, NULL));
  CHECK_IS(KVCACHE_OK, kvcache_commit(m, plan.id));
}

int main(void) {
  kvcache_config config;
  kvcache_manager* m = NULL;
  kvcache_config_init(&config);
  CHECK(config.host_tier_bytes == 0);
  config.num_layers = 1;
  config.num_kv_heads = H;
  config.head_size = D;
  config.block_size = BS;
  config.cache_dtype = KVCACHE_INT8;
  config.input_dtype = KVCACHE_BFLOAT16;
  config.num_blocks = BLOCKS;
  config.host_tier_bytes = -5;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_create(&config, &m));
  CHECK(strstr(kvcache_last_error(NULL), "host_tier_bytes -5") != NULL);
  config.host_tier_bytes = 1 << 20;
  CHECK(config.tier_offload_min_hits == 1); /* The default policy... */
  CHECK(config.tier_hold_offloads == 1);
  config.tier_offload_min_hits = 0; /* ...but here every block offloads. */
  CHECK_IS(KVCACHE_OK, kvcache_create(&config, &m));
  if (m == NULL) return 1;

  /* Two full blocks cached, then evicted into the tier by a pool-filling
   * sequence. */
  const int32_t prompt[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  compute(m, 1, prompt, 9, 0x3f80); /* 1.0 in bf16 */
  CHECK_IS(KVCACHE_OK, kvcache_free(m, 1));
  int32_t other[BLOCKS * BS];
  for (int i = 0; i < BLOCKS * BS; ++i) other[i] = 100 + i;
  compute(m, 2, other, BLOCKS * BS, 0x4000); /* 2.0 */
  CHECK_IS(KVCACHE_OK, kvcache_free(m, 2));

  kvcache_prefix_hits hits = KVCACHE_STRUCT_INIT(kvcache_prefix_hits);
  int64_t computed = -1;
  CHECK_IS(KVCACHE_OK, kvcache_add_sequence_hits(m, 3, prompt, 9, 0, NULL, 0,
                                                 &computed, &hits));
  CHECK(computed == 8);
  CHECK(hits.host_tokens == 8);
  CHECK(hits.device_tokens == 0);
  /* The onboarded rows read back as the first sequence wrote them. */
  float k[8 * H * D], v[8 * H * D];
  kvcache_tensor out = KVCACHE_STRUCT_INIT(kvcache_tensor);
  out.dtype = KVCACHE_FLOAT32;
  out.ndim = 3;
  out.shape[0] = 8;
  out.shape[1] = H;
  out.shape[2] = D;
  out.strides[0] = H * D;
  out.strides[1] = D;
  out.strides[2] = 1;
  out.memory = KVCACHE_HOST;
  kvcache_tensor out_v = out;
  out.data = k;
  out_v.data = v;
  CHECK_IS(KVCACHE_OK, kvcache_gather(m, 3, 0, 0, 8, &out, &out_v, NULL));
  for (int i = 0; i < 8 * H * D; ++i) CHECK(k[i] == 1.0f && v[i] == 1.0f);
  /* Landed once gathered (the gather waited for it); bad input refused. */
  int loaded = -1;
  CHECK_IS(KVCACHE_OK, kvcache_prefix_loaded(m, 3, &loaded));
  CHECK(loaded == 1);
  CHECK_IS(KVCACHE_NOT_FOUND, kvcache_prefix_loaded(m, 77, &loaded));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_prefix_loaded(m, 3, NULL));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_prefix_loaded(NULL, 3, &loaded));

  kvcache_metrics metrics = KVCACHE_STRUCT_INIT(kvcache_metrics);
  CHECK_IS(KVCACHE_OK, kvcache_get_metrics(m, &metrics));
  CHECK(metrics.host_tier_blocks_total > 0);
  CHECK(metrics.prefix_hit_tokens_host == 8);
  CHECK(metrics.prefix_hit_tokens_device + metrics.prefix_hit_tokens_host ==
        metrics.prefix_hit_tokens);
  CHECK(metrics.tier_offloads >= 2);
  CHECK(metrics.tier_onboards == 2);
  CHECK(metrics.tier_onboard_bytes > 0);
  CHECK(metrics.tier_copy_failures == 0);

  /* NULL hits is allowed; a bad struct_size is refused, changing nothing. */
  CHECK_IS(KVCACHE_OK, kvcache_add_sequence_hits(m, 4, prompt, 9, 0, NULL, 0,
                                                 &computed, NULL));
  hits.struct_size = 3;
  CHECK_IS(
      KVCACHE_INVALID_ARGUMENT,
      kvcache_add_sequence_hits(m, 5, prompt, 9, 0, NULL, 0, &computed, &hits));
  int64_t length = 0;
  CHECK_IS(KVCACHE_NOT_FOUND, kvcache_sequence_length(m, 5, &length));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_add_sequence_hits(NULL, 5, prompt, 9, 0, NULL, 0, &computed,
                                     NULL));
  CHECK_IS(KVCACHE_OK, kvcache_validate(m));
  kvcache_destroy(m);
  if (failures == 0) printf("PASS\n");
  return failures == 0 ? 0 : 1;
}
