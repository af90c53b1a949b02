/* KV events through the C API, from C: kvcache_take_events' owned result
 * (stores with their chain and tokens, evictions, the reset), the config's
 * event fields, kvcache_reset_prefix_cache, and hostile arguments (NULL
 * handle and struct, wrong struct_size, an unfreed result, double free,
 * unterminated and bad endpoint strings). Exits non-zero on a failure. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/kvcache_c.h"

static int failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

#define CHECK_OK(call)                                                    \
  do {                                                                    \
    kvcache_status s_ = (call);                                           \
    if (s_ != KVCACHE_OK) {                                               \
      fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call, \
              kvcache_status_name(s_), kvcache_last_error(NULL));         \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

enum { BS = 4, D = 8 };

static void Config(kvcache_config* c) {
  kvcache_config_init(c);
  c->num_layers = 1;
  c->num_kv_heads = 1;
  c->head_size = D;
  c->block_size = BS;
  c->num_blocks = 4;
  c->input_dtype = KVCACHE_FLOAT32;
  c->enable_kv_events = 1;
}

/* Reserve n tokens of `seq`, append zeros to the one layer, commit. */
static void Step(kvcache_manager* m, int64_t seq, int64_t n) {
  float zeros[64 * D];
  memset(zeros, 0, sizeof(zeros));
  kvcache_reserve_request r = KVCACHE_STRUCT_INIT(kvcache_reserve_request);
  r.sequence = seq;
  r.num_tokens = n;
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  CHECK_OK(kvcache_reserve(m, &r, 1, NULL, &plan));
  kvcache_tensor kv = KVCACHE_STRUCT_INIT(kvcache_tensor);
  kv.data = zeros;
  kv.dtype = KVCACHE_FLOAT32;
  kv.ndim = 3;
  kv.shape[0] = n;
  kv.shape[1] = 1;
  kv.shape[2] = D;
  kv.strides[0] = D;
  kv.strides[1] = D;
  kv.strides[2] = 1;
  kv.memory = KVCACHE_HOST;
  CHECK_OK(kvcache_append(m, plan.id, 0, &kv, &kv, NULL));
  CHECK_OK(kvcache_commit(m, plan.id));
}

static void Events(void) {
  kvcache_config c;
  Config(&c);
  kvcache_manager* m = NULL;
  CHECK_OK(kvcache_create(&c, &m));
  if (m == NULL) return;

  int32_t prompt[2 * BS + 1];
  for (int i = 0; i < 2 * BS + 1; ++i) prompt[i] = 1000 + rand() % 1000;
  const uint8_t salt[3] = {0, 'x', 0};
  int64_t computed = -1;
  CHECK_OK(
      kvcache_add_sequence(m, 1, prompt, 2 * BS + 1, 5, salt, 3, &computed));
  Step(m, 1, 2 * BS + 1);
  CHECK_OK(kvcache_free(m, 1));

  kvcache_events ev = KVCACHE_STRUCT_INIT(kvcache_events);
  CHECK_OK(kvcache_take_events(m, &ev));
  CHECK(ev.num_batches == 1 && ev.owner != NULL);
  uint64_t stored[2] = {0, 0};
  if (ev.num_batches == 1) {
    const kvcache_event_batch* b = &ev.batches[0];
    CHECK(b->sequence == 0);
    CHECK(b->timestamp > 1.6e9);
    CHECK(b->num_events == 1);
    const kvcache_event* e = &b->events[0];
    CHECK(e->type == KVCACHE_EVENT_BLOCK_STORED);
    CHECK(e->medium == KVCACHE_MEDIUM_DEVICE);
    CHECK(e->num_block_hashes == 2);
    CHECK(e->has_parent == 0);
    CHECK(e->block_size == BS);
    CHECK(e->adapter_id == 5);
    CHECK(e->num_token_ids == 2 * BS);
    CHECK(e->num_token_ids == 2 * BS &&
          memcmp(e->token_ids, prompt, sizeof(int32_t) * 2 * BS) == 0);
    CHECK(e->block_hashes[0] != e->block_hashes[1]);
    stored[0] = e->block_hashes[0];
    stored[1] = e->block_hashes[1];
  }
  /* An unfreed result is refused rather than leaked. */
  CHECK(kvcache_take_events(m, &ev) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "kvcache_events_free") != NULL);
  kvcache_events_free(&ev);
  CHECK(ev.owner == NULL && ev.batches == NULL && ev.num_batches == 0);
  kvcache_events_free(&ev); /* A second free does nothing. */
  kvcache_events_free(NULL);

  /* Four fresh blocks evict both cached ones: one removal, tail first. */
  int32_t other[4 * BS - 1];
  for (int i = 0; i < 4 * BS - 1; ++i) other[i] = 5000 + i;
  CHECK_OK(
      kvcache_add_sequence(m, 2, other, 4 * BS - 1, 0, NULL, 0, &computed));
  Step(m, 2, 4 * BS - 1);
  CHECK_OK(kvcache_take_events(m, &ev));
  CHECK(ev.num_batches == 2); /* The removal, then the new blocks' store. */
  const int64_t evict_batches = ev.num_batches;
  if (ev.num_batches >= 1) {
    const kvcache_event* e = &ev.batches[0].events[0];
    CHECK(ev.batches[0].sequence == 1);
    CHECK(e->type == KVCACHE_EVENT_BLOCK_REMOVED);
    CHECK(e->num_block_hashes == 2);
    CHECK(e->num_block_hashes == 2 && e->block_hashes[0] == stored[1] &&
          e->block_hashes[1] == stored[0]);
    CHECK(e->num_token_ids == 0 && e->token_ids == NULL);
  }
  kvcache_events_free(&ev);

  /* The reset: refused while a plan is in flight, then AllBlocksCleared. */
  kvcache_reserve_request r = KVCACHE_STRUCT_INIT(kvcache_reserve_request);
  r.sequence = 2;
  r.num_tokens = 1;
  const int32_t next = 7;
  r.new_token_ids = &next;
  r.num_new_token_ids = 1;
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  CHECK_OK(kvcache_reserve(m, &r, 1, NULL, &plan));
  CHECK(kvcache_reset_prefix_cache(m) == KVCACHE_FAILED_PRECONDITION);
  CHECK(strstr(kvcache_last_error(m), "in flight") != NULL);
  CHECK_OK(kvcache_abort(m, plan.id));
  CHECK_OK(kvcache_reset_prefix_cache(m));
  CHECK_OK(kvcache_take_events(m, &ev));
  CHECK(ev.num_batches == 1);
  if (ev.num_batches == 1) {
    CHECK(ev.batches[0].num_events == 1);
    CHECK(ev.batches[0].events[0].type == KVCACHE_EVENT_ALL_BLOCKS_CLEARED);
  }
  kvcache_events_free(&ev);

  kvcache_metrics metrics = KVCACHE_STRUCT_INIT(kvcache_metrics);
  CHECK_OK(kvcache_get_metrics(m, &metrics));
  CHECK(metrics.kv_event_batches == 1 + evict_batches + 1);
  CHECK(metrics.kv_event_batches_dropped == 0);

  /* Nothing new: an empty result with no owner. */
  CHECK_OK(kvcache_take_events(m, &ev));
  CHECK(ev.num_batches == 0 && ev.batches == NULL && ev.owner == NULL);
  kvcache_destroy(m);
}

static void Hostile(void) {
  kvcache_config c;
  Config(&c);
  kvcache_manager* m = NULL;
  CHECK_OK(kvcache_create(&c, &m));
  kvcache_events ev = KVCACHE_STRUCT_INIT(kvcache_events);
  CHECK(kvcache_take_events(NULL, &ev) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(NULL), "manager is NULL") != NULL);
  CHECK(kvcache_reset_prefix_cache(NULL) == KVCACHE_INVALID_ARGUMENT);
  CHECK(kvcache_take_events(m, NULL) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "events is NULL") != NULL);
  ev.struct_size = sizeof(ev) + 8;
  CHECK(kvcache_take_events(m, &ev) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "kvcache_events.struct_size") != NULL);
  ev.owner = &ev; /* A mis-sized struct is not freed... */
  kvcache_events_free(&ev);
  CHECK(ev.owner == &ev); /* ...nor touched. */
  kvcache_destroy(m);

  /* Config strings: unterminated within the limit, a bad endpoint, events
   * off with an endpoint. */
  char* long_string = malloc(KVCACHE_MAX_CONFIG_STRING + 10);
  memset(long_string, 'a', KVCACHE_MAX_CONFIG_STRING + 10);
  Config(&c);
  c.kv_events_topic = long_string;
  m = NULL;
  CHECK(kvcache_create(&c, &m) == KVCACHE_INVALID_ARGUMENT && m == NULL);
  CHECK(strstr(kvcache_last_error(NULL), "kv_events_topic is longer") != NULL);
  free(long_string);
  Config(&c);
  c.kv_events_endpoint = "nowhere";
  CHECK(kvcache_create(&c, &m) == KVCACHE_INVALID_ARGUMENT && m == NULL);
  CHECK(strstr(kvcache_last_error(NULL), "'nowhere' cannot be bound") != NULL);
  c.enable_kv_events = 0;
  CHECK(kvcache_create(&c, &m) == KVCACHE_INVALID_ARGUMENT && m == NULL);
  CHECK(strstr(kvcache_last_error(NULL), "enable_kv_events is false") != NULL);
  Config(&c);
  c.kv_events_queue_capacity = -5;
  CHECK(kvcache_create(&c, &m) == KVCACHE_INVALID_ARGUMENT && m == NULL);
  CHECK(strstr(kvcache_last_error(NULL), "kv_events_queue_capacity -5") !=
        NULL);

  /* Events off (the default): an empty result, and the reset still works. */
  kvcache_config_init(&c);
  CHECK(c.enable_kv_events == 0 && c.kv_events_queue_capacity == 4096);
  Config(&c);
  c.enable_kv_events = 0;
  CHECK_OK(kvcache_create(&c, &m));
  ev = (kvcache_events)KVCACHE_STRUCT_INIT(kvcache_events);
  CHECK_OK(kvcache_take_events(m, &ev));
  CHECK(ev.num_batches == 0 && ev.owner == NULL);
  CHECK_OK(kvcache_reset_prefix_cache(m));
  kvcache_destroy(m);
}

int main(void) {
  srand(12345u);
  Events();
  Hostile();
  if (failures == 0) printf("kvcache_c_events_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
