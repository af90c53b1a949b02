/* The C API, from C, using only api/kvcache_c.h: create, a prefilled and forked
 * sequence, append, gather, lookups, metrics, and error codes with messages.
 * Exits non-zero on the first failure. */

#include "api/kvcache_c.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/c_check.h"

#define CHECK_OK(m, call)                                                 \
  do {                                                                    \
    kvcache_status s_ = (call);                                           \
    if (s_ != KVCACHE_OK) {                                               \
      fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call, \
              kvcache_status_name(s_), kvcache_last_error(m));            \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

/* Collects what the log sink receives. */
static int log_messages = 0;
static int log_saw_layout = 0;
static void CollectLog(int32_t level, const char* message, void* user_data) {
  CHECK(user_data == &log_messages);
  ++log_messages;
  if (level == KVCACHE_LOG_INFO && strstr(message, "kvcache: CPU backend")) {
    log_saw_layout = 1;
  }
}

int main(void) {
  enum { H = 2, D = 8, T = 5 };
  kvcache_config config;
  kvcache_manager* m = NULL;

  /* A bad config fails with a message naming the value. */
  kvcache_config_init(&config);
  config.num_layers = 2;
  config.num_kv_heads = H;
  config.head_size = 12;
  config.num_blocks = 8;
  config.block_size = 4;
  config.input_dtype = KVCACHE_FLOAT32;
  CHECK(kvcache_create(&config, &m) == KVCACHE_INVALID_ARGUMENT);
  CHECK(m == NULL);
  CHECK(strstr(kvcache_last_create_error(), "head_size 12") != NULL);

  /* ABI: a struct of another size is refused, naming it and both sizes. */
  CHECK(strcmp(kvcache_version(), "1.0.0") == 0);
  config.head_size = D;
  config.struct_size = sizeof(config) - 8;
  CHECK(kvcache_create(&config, &m) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(NULL), "kvcache_config.struct_size") != NULL);
  config.struct_size = sizeof(config);

  /* Logging: quiet by default; a sink at INFO gets the layout line. */
  config.log_level = KVCACHE_LOG_INFO;
  config.log_sink = CollectLog;
  config.log_sink_user_data = &log_messages;
  CHECK_OK(m, kvcache_create(&config, &m));
  CHECK(log_saw_layout == 1);
  kvcache_destroy(m);
  m = NULL;
  log_messages = 0;
  config.log_level = KVCACHE_LOG_DEFAULT;
  CHECK_OK(m, kvcache_create(&config, &m));
  CHECK(log_messages == 0);
  kvcache_destroy(m);
  m = NULL;
  config.log_level = 42;
  CHECK(kvcache_create(&config, &m) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(NULL), "log_level 42") != NULL);
  config.log_level = KVCACHE_LOG_DEFAULT;
  config.log_sink = NULL;

  CHECK_OK(m, kvcache_create(&config, &m));
  CHECK(m != NULL);
  if (m == NULL) return 1;

  int32_t prompt[T] = {11, 12, 13, 14, 15};
  int64_t computed = -1;
  CHECK_OK(m, kvcache_add_sequence(m, 7, prompt, T, 0,
                                   (const uint8_t*)"tenant-a", 8, &computed));
  CHECK(computed == 0);
  CHECK(kvcache_add_sequence(m, 7, prompt, T, 0, NULL, 0, &computed) ==
        KVCACHE_ALREADY_EXISTS);
  CHECK(strstr(kvcache_last_error(m), "7") != NULL);

  kvcache_reserve_request request = {sizeof(kvcache_reserve_request), 7, T,
                                     NULL, 0};
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  kvcache_plan small_plan = {.struct_size = sizeof(kvcache_plan) - 8};
  CHECK(kvcache_reserve(m, &request, 1, NULL, &small_plan) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "kvcache_plan.struct_size") != NULL);
  request.struct_size = 8;
  CHECK(kvcache_reserve(m, &request, 1, NULL, &plan) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "batch[0]") != NULL);
  request.struct_size = sizeof(request);
  CHECK_OK(m, kvcache_reserve(m, &request, 1, NULL, &plan));
  CHECK(plan.num_tokens == T);
  /* The host copy of the slot mapping (on the CPU backend both are host). */
  CHECK(plan.host_slot_mapping != NULL);
  for (int i = 0; i < T && plan.host_slot_mapping != NULL; ++i) {
    CHECK(plan.host_slot_mapping[i] == plan.slot_mapping[i]);
    CHECK(plan.host_slot_mapping[i] >= 0);
  }

  float k[T * H * D], v[T * H * D];
  for (int i = 0; i < T * H * D; ++i) {
    k[i] = sinf((float)i) * 3.0f;
    v[i] = cosf((float)i) * 0.5f;
  }
  kvcache_tensor kt = HostTensor3(k, KVCACHE_FLOAT32, T, H, D);
  kvcache_tensor vt = HostTensor3(v, KVCACHE_FLOAT32, T, H, D);
  CHECK(kvcache_commit(m, plan.id) == KVCACHE_FAILED_PRECONDITION);
  for (int layer = 0; layer < 2; ++layer) {
    CHECK_OK(m, kvcache_append(m, plan.id, layer, &kt, &vt, NULL));
  }
  CHECK(kvcache_append(m, plan.id, 2, &kt, &vt, NULL) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "layer 2") != NULL);
  CHECK(kvcache_append(m, plan.id, 0, NULL, &vt, NULL) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK_OK(m, kvcache_commit(m, plan.id));
  CHECK(kvcache_commit(m, plan.id) == KVCACHE_NOT_FOUND);

  /* Gather back: int8 round trip error is small. */
  float gk[T * H * D], gv[T * H * D];
  kvcache_tensor gkt = HostTensor3(gk, KVCACHE_FLOAT32, T, H, D);
  kvcache_tensor gvt = HostTensor3(gv, KVCACHE_FLOAT32, T, H, D);
  CHECK_OK(m, kvcache_gather(m, 7, 1, 0, T, &gkt, &gvt, NULL));
  double err = 0, norm = 0;
  for (int i = 0; i < T * H * D; ++i) {
    err += (gk[i] - k[i]) * (gk[i] - k[i]);
    norm += k[i] * k[i];
  }
  CHECK(sqrt(err / norm) < 7e-3);

  /* Lookups. */
  int64_t length = 0, num_blocks = 0;
  int32_t blocks[8];
  CHECK_OK(m, kvcache_sequence_length(m, 7, &length));
  CHECK(length == T);
  CHECK_OK(m, kvcache_block_table(m, 7, blocks, 8, &num_blocks));
  CHECK(num_blocks == 2);
  num_blocks = 0;
  CHECK(kvcache_block_table(m, 7, blocks, 1, &num_blocks) ==
        KVCACHE_OUT_OF_RANGE);
  CHECK(num_blocks == 2); /* The size needed. */
  num_blocks = 0;
  CHECK_OK(m, kvcache_block_table(m, 7, NULL, 0, &num_blocks));
  CHECK(num_blocks == 2);
  CHECK(kvcache_block_table(m, 7, NULL, 4, &num_blocks) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK(kvcache_sequence_length(m, 8, &length) == KVCACHE_NOT_FOUND);
  CHECK(strstr(kvcache_last_error(m), "8") != NULL);

  CHECK_OK(m, kvcache_fork(m, 7, 8));
  int64_t ids[2] = {7, 8};
  kvcache_block_table_view table =
      KVCACHE_STRUCT_INIT(kvcache_block_table_view);
  CHECK_OK(m, kvcache_batch_block_table(m, ids, 2, NULL, &table));
  CHECK(table.num_sequences == 2);
  CHECK(table.block_table[0] == blocks[0]);
  CHECK(table.block_table[table.row_stride + 1] == blocks[1]);
  CHECK(table.seq_lens[1] == T);

  kvcache_layer_view layer = KVCACHE_STRUCT_INIT(kvcache_layer_view);
  CHECK_OK(m, kvcache_get_layer_view(m, 0, &layer));
  CHECK(layer.num_blocks == 8 && layer.block_size == 4 &&
        layer.key_scale != NULL);
  CHECK(layer.key_strides[0] == 4 * H * D);

  int64_t fit = 0;
  CHECK_OK(m, kvcache_tokens_that_fit(m, 8, &fit));
  CHECK(fit > 0);
  kvcache_reserve_request too_many = {sizeof(kvcache_reserve_request), 8, 1000,
                                      NULL, 0};
  CHECK(kvcache_can_reserve(m, &too_many, 1) != KVCACHE_OK);

  kvcache_metrics metrics = KVCACHE_STRUCT_INIT(kvcache_metrics);
  CHECK_OK(m, kvcache_get_metrics(m, &metrics));
  CHECK(metrics.blocks_total == 8);
  CHECK(metrics.sequences == 2);
  CHECK(metrics.tokens_committed == T);
  CHECK(metrics.blocks_free + metrics.blocks_cached + metrics.blocks_in_use ==
        8);
  char text[4096];
  size_t n = kvcache_metrics_text(m, text, sizeof(text));
  CHECK(n > 0 && n < sizeof(text));
  CHECK(kvcache_metrics_text(m, NULL, 0) == n);
  kvcache_metrics small_metrics = {.struct_size = sizeof(kvcache_metrics) + 8};
  CHECK(kvcache_get_metrics(m, &small_metrics) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(text, "kvcache_sequences 2") != NULL);

  CHECK_OK(m, kvcache_free(m, 8));
  CHECK(kvcache_free(m, 8) == KVCACHE_NOT_FOUND);
  CHECK_OK(m, kvcache_validate(m));

  /* Lengths and gathers of a step: known = committed + reserved + pending. */
  int64_t known = 0;
  CHECK_OK(m, kvcache_known_length(m, 7, &known));
  CHECK(known == T);
  CHECK(kvcache_known_length(m, 8, &known) == KVCACHE_NOT_FOUND);
  CHECK(kvcache_gather(m, 7, 0, 2, 0, &gkt, &gvt, NULL) == KVCACHE_OK);
  kvcache_gather_request gather[2] = {
      {sizeof(kvcache_gather_request), 7, 1, 2},
      {sizeof(kvcache_gather_request), 7, 0, 3}};
  kvcache_tensor bk = HostTensor3(gk, KVCACHE_FLOAT32, 5, H, D);
  kvcache_tensor bv = HostTensor3(gv, KVCACHE_FLOAT32, 5, H, D);
  CHECK_OK(m, kvcache_gather_batch(m, gather, 2, 1, &bk, &bv, 0, NULL));
  float one[3 * H * D], one_v[3 * H * D];
  kvcache_tensor ok = HostTensor3(one, KVCACHE_FLOAT32, 3, H, D);
  kvcache_tensor ov = HostTensor3(one_v, KVCACHE_FLOAT32, 3, H, D);
  CHECK_OK(m, kvcache_gather_async(m, 7, 1, 0, 3, &ok, &ov, 0, NULL));
  CHECK(memcmp(one, gk + 2 * H * D, sizeof(one)) == 0);
  gather[1].struct_size = 4;
  CHECK(kvcache_gather_batch(m, gather, 2, 1, &bk, &bv, 0, NULL) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(m), "requests[1].struct_size") != NULL);
  kvcache_graph_step_inputs inputs =
      KVCACHE_STRUCT_INIT(kvcache_graph_step_inputs);
  CHECK(kvcache_graph_step(m, &inputs) == KVCACHE_FAILED_PRECONDITION);
  kvcache_destroy(m);

  /* The graph step: padded inputs, Commit rules. */
  config.graph_max_tokens = 4;
  config.max_tokens_per_step = 8;
  m = NULL;
  CHECK_OK(m, kvcache_create(&config, &m));
  if (m == NULL) return 1;
  CHECK_OK(m, kvcache_graph_step(m, &inputs));
  CHECK(inputs.max_tokens == 4 && inputs.max_sequences == 4);
  CHECK_OK(m, kvcache_add_sequence(m, 1, prompt, 3, 0, NULL, 0, &computed));
  kvcache_reserve_request prefill = {sizeof(kvcache_reserve_request), 1, 3,
                                     NULL, 0};
  CHECK_OK(m, kvcache_reserve(m, &prefill, 1, NULL, &plan));
  kvcache_tensor k3 = HostTensor3(k, KVCACHE_FLOAT32, 3, H, D);
  kvcache_tensor v3 = HostTensor3(v, KVCACHE_FLOAT32, 3, H, D);
  for (int l = 0; l < 2; ++l) {
    CHECK_OK(m, kvcache_append(m, plan.id, l, &k3, &v3, NULL));
  }
  CHECK_OK(m, kvcache_commit(m, plan.id));
  int32_t next = 99;
  kvcache_reserve_request decode = {sizeof(kvcache_reserve_request), 1, 1,
                                    &next, 1};
  CHECK(kvcache_reserve_graph_step(m, &decode, 1, 0, NULL, &plan) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK_OK(m, kvcache_reserve_graph_step(m, &decode, 1, 4, NULL, &plan));
  CHECK(plan.graph_tokens == 4 && plan.slot_mapping == inputs.slot_mapping);
  CHECK(inputs.slot_mapping[0] == plan.host_slot_mapping[0]);
  CHECK(inputs.slot_mapping[1] == -1 && inputs.slot_mapping[3] == -1);
  CHECK(inputs.positions[0] == 3 && inputs.seq_lens[0] == 4);
  CHECK_OK(m, kvcache_known_length(m, 1, &known));
  CHECK_OK(m, kvcache_sequence_length(m, 1, &length));
  CHECK(length == 3 && known == 4); /* computed + reserved <= known */
  CHECK(kvcache_commit(m, plan.id) == KVCACHE_FAILED_PRECONDITION);
  kvcache_tensor k4 = HostTensor3(k, KVCACHE_FLOAT32, 4, H, D);
  kvcache_tensor v4 = HostTensor3(v, KVCACHE_FLOAT32, 4, H, D);
  CHECK_OK(m, kvcache_append(m, plan.id, 0, &k4, &v4, NULL));
  /* The in-flight token of layer 0 can be read before the commit. */
  kvcache_tensor g1 = HostTensor3(gk, KVCACHE_FLOAT32, 1, H, D);
  kvcache_tensor g1v = HostTensor3(gv, KVCACHE_FLOAT32, 1, H, D);
  CHECK(kvcache_gather_async(m, 1, 0, 3, 1, &g1, &g1v, 0, NULL) ==
        KVCACHE_INVALID_ARGUMENT);
  CHECK_OK(m, kvcache_gather_async(m, 1, 0, 3, 1, &g1, &g1v, 1, NULL));
  CHECK(fabsf(gk[0] - k[0]) < 0.05f);
  CHECK_OK(m, kvcache_append(m, plan.id, 1, &k4, &v4, NULL));
  CHECK_OK(m, kvcache_commit(m, plan.id));
  /* A replay (no append seen on the host) of the captured size commits. */
  CHECK_OK(m, kvcache_reserve_graph_step(m, &decode, 1, 4, NULL, &plan));
  CHECK_OK(m, kvcache_commit(m, plan.id));
  CHECK_OK(m, kvcache_validate(m));
  kvcache_destroy(m);
  m = NULL;

  /* Inline scales: int8/fp8 only; the view gives the row pitch and the
   * scale's byte offset (D = 8: 8 codes, the scale, 4 bytes of padding). */
  CHECK(config.scale_placement == KVCACHE_SCALES_SIDE);
  config.scale_placement = 7;
  CHECK(kvcache_create(&config, &m) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(NULL), "scale_placement 7") != NULL);
  config.scale_placement = KVCACHE_SCALES_INLINE;
  config.cache_dtype = KVCACHE_BFLOAT16;
  config.input_dtype = KVCACHE_BFLOAT16;
  CHECK(kvcache_create(&config, &m) == KVCACHE_INVALID_ARGUMENT);
  CHECK(strstr(kvcache_last_error(NULL), "bfloat16") != NULL);
  config.cache_dtype = KVCACHE_INT8;
  CHECK_OK(m, kvcache_create(&config, &m));
  if (m == NULL) return 1;
  kvcache_layer_view inline_view = KVCACHE_STRUCT_INIT(kvcache_layer_view);
  CHECK_OK(m, kvcache_get_layer_view(m, 1, &inline_view));
  CHECK(inline_view.scale_placement == KVCACHE_SCALES_INLINE);
  CHECK(inline_view.key_row_pitch_bytes == 16);
  CHECK(inline_view.value_row_pitch_bytes == 16);
  CHECK(inline_view.scale_byte_offset == 8);
  CHECK((char*)inline_view.key_scale == (char*)inline_view.key_cache + 8);
  CHECK((char*)inline_view.value_scale == (char*)inline_view.value_cache + 8);
  CHECK(inline_view.key_strides[2] == 16 && inline_view.key_strides[1] == 32);
  CHECK(inline_view.scale_strides[2] == 4 && inline_view.scale_strides[1] == 8);
  kvcache_destroy(m);

  if (failures == 0) printf("kvcache_c_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
