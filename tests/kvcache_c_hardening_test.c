/* Regression tests of issue #12 through the C API, from C: hostile counts
 * (checked before anything is copied), salts as bytes, the per-thread last
 * error, NULL handles and arguments named by their real fault, and Gather
 * outputs that overlap. Exits non-zero on the first failure. */

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/kvcache_c.h"

static int failures = 0;

#define CHECK(cond)                                                           \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, \
              __LINE__, #cond, kvcache_last_error(NULL));                     \
      ++failures;                                                             \
    }                                                                         \
  } while (0)

/* The call fails with `code` and a last error containing `text`. */
#define CHECK_ERROR(call, code, text)                                       \
  do {                                                                      \
    kvcache_status s_ = (call);                                             \
    if (s_ != (code) || strstr(kvcache_last_error(NULL), (text)) == NULL) { \
      fprintf(stderr, "%s:%d: %s -> %s: \"%s\", expected %s with \"%s\"\n", \
              __FILE__, __LINE__, #call, kvcache_status_name(s_),           \
              kvcache_last_error(NULL), kvcache_status_name(code), text);   \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

enum { H = 2, D = 8, BS = 4 };

static kvcache_manager* Make(int prefix_caching) {
  kvcache_config config;
  kvcache_config_init(&config);
  config.num_layers = 2;
  config.num_kv_heads = H;
  config.head_size = D;
  config.block_size = BS;
  config.num_blocks = 32;
  config.input_dtype = KVCACHE_FLOAT32;
  config.enable_prefix_caching = prefix_caching;
  kvcache_manager* m = NULL;
  if (kvcache_create(&config, &m) != KVCACHE_OK) {
    fprintf(stderr, "create: %s\n", kvcache_last_error(NULL));
    exit(1);
  }
  return m;
}

static kvcache_tensor Tensor(float* data, int64_t t) {
  kvcache_tensor x;
  memset(&x, 0, sizeof(x));
  x.struct_size = sizeof(x);
  x.data = data;
  x.dtype = KVCACHE_FLOAT32;
  x.ndim = 3;
  x.shape[0] = t;
  x.shape[1] = H;
  x.shape[2] = D;
  x.strides[0] = H * D;
  x.strides[1] = D;
  x.strides[2] = 1;
  x.memory = KVCACHE_HOST;
  return x;
}

/* Adds `id` with an 8-token prompt under (salt, salt_len), writes what the
 * prefix cache did not have (filled with `fill`) and returns the tokens the
 * cache had. */
static int64_t AddAndPrefill(kvcache_manager* m, int64_t id, const void* salt,
                             size_t salt_len, float fill) {
  int32_t prompt[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  int64_t computed = -1;
  CHECK(kvcache_add_sequence(m, id, prompt, 8, 0, (const uint8_t*)salt,
                             salt_len, &computed) == KVCACHE_OK);
  kvcache_reserve_request request = {sizeof(kvcache_reserve_request), id,
                                     8 - computed, NULL, 0};
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  CHECK(kvcache_reserve(m, &request, 1, NULL, &plan) == KVCACHE_OK);
  float k[8 * H * D];
  for (int i = 0; i < 8 * H * D; ++i) k[i] = fill + 0.001f * (float)i;
  kvcache_tensor kt = Tensor(k, plan.num_tokens);
  for (int layer = 0; layer < 2; ++layer) {
    CHECK(kvcache_append(m, plan.id, layer, &kt, &kt, NULL) == KVCACHE_OK);
  }
  CHECK(kvcache_commit(m, plan.id) == KVCACHE_OK);
  return computed;
}

/* Item 2: counts are checked before anything is copied or read. */
static void HostileCounts(void) {
  kvcache_manager* m = Make(/*prefix_caching=*/0);
  int32_t prompt[4] = {1, 2, 3, 4};
  int64_t computed = 0;
  CHECK_ERROR(
      kvcache_add_sequence(m, 1, prompt, 1LL << 62, 0, NULL, 0, &computed),
      KVCACHE_INVALID_ARGUMENT, "prompt_len 4611686018427387904");
  CHECK_ERROR(kvcache_add_sequence(m, 1, prompt, -1, 0, NULL, 0, &computed),
              KVCACHE_INVALID_ARGUMENT, "prompt_len -1 is negative");
  CHECK(kvcache_add_sequence(m, 1, prompt, 4, 0, NULL, 0, &computed) ==
        KVCACHE_OK);
  kvcache_reserve_request request = {sizeof(kvcache_reserve_request), 1, 1,
                                     NULL, 0};
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  CHECK_ERROR(kvcache_reserve(m, &request, 1LL << 60, NULL, &plan),
              KVCACHE_INVALID_ARGUMENT, "batch_size 1152921504606846976");
  CHECK_ERROR(kvcache_can_reserve(m, &request, 1LL << 60),
              KVCACHE_INVALID_ARGUMENT, "batch_size");
  CHECK_ERROR(kvcache_can_reserve(m, &request, -3), KVCACHE_INVALID_ARGUMENT,
              "batch_size -3 is negative");
  int32_t token = 5;
  kvcache_reserve_request wrapping = {sizeof(kvcache_reserve_request), 1, 1,
                                      &token, 1LL << 62};
  CHECK_ERROR(kvcache_reserve(m, &wrapping, 1, NULL, &plan),
              KVCACHE_INVALID_ARGUMENT,
              "num_new_token_ids 4611686018427387904");
  kvcache_reserve_request minimum = {sizeof(kvcache_reserve_request), 1,
                                     INT64_MIN, NULL, 0};
  CHECK_ERROR(kvcache_reserve(m, &minimum, 1, NULL, &plan),
              KVCACHE_INVALID_ARGUMENT, "-9223372036854775808");
  CHECK_ERROR(kvcache_can_reserve(m, &minimum, 1), KVCACHE_INVALID_ARGUMENT,
              "-9223372036854775808");
  CHECK(kvcache_validate(m) == KVCACHE_OK);
  kvcache_metrics metrics = KVCACHE_STRUCT_INIT(kvcache_metrics);
  CHECK(kvcache_get_metrics(m, &metrics) == KVCACHE_OK);
  CHECK(metrics.plans_in_flight == 0 && metrics.blocks_in_use == 0);
  kvcache_destroy(m);
}

/* Item 6: salts are bytes with a length. */
static void SaltsAreBytes(void) {
  kvcache_manager* m = Make(/*prefix_caching=*/1);
  const char alice[] = "\0Alice", bob[] = "\0Bob", zero[] = "\0";
  CHECK(AddAndPrefill(m, 1, alice, 6, 1.0f) == 0);
  CHECK(AddAndPrefill(m, 2, bob, 4, 2.0f) == 0);   /* Was a hit. */
  CHECK(AddAndPrefill(m, 3, NULL, 0, 3.0f) == 0);  /* Was a hit. */
  CHECK(AddAndPrefill(m, 4, zero, 1, 4.0f) == 0);  /* One zero byte. */
  CHECK(AddAndPrefill(m, 5, alice, 6, 5.0f) == 4); /* Alice again: a hit. */
  CHECK(AddAndPrefill(m, 6, bob, 4, 6.0f) == 4);
  CHECK(AddAndPrefill(m, 7, "", 0, 7.0f) == 4);    /* No salt again. */
  CHECK(AddAndPrefill(m, 8, alice, 5, 8.0f) == 0); /* A prefix of Alice's. */
  int32_t prompt[1] = {1};
  CHECK_ERROR(kvcache_add_sequence(m, 9, prompt, 1, 0, NULL, 3, NULL),
              KVCACHE_INVALID_ARGUMENT, "salt is NULL");
  CHECK_ERROR(kvcache_add_sequence(m, 9, prompt, 1, 0, (const uint8_t*)alice,
                                   (size_t)1 << 40, NULL),
              KVCACHE_INVALID_ARGUMENT, "salt_len 1099511627776 exceeds");
  CHECK(kvcache_validate(m) == KVCACHE_OK);
  kvcache_destroy(m);
}

/* Item 10: NULL handles, arguments named by their fault, overlapping outputs.
 */
static void Messages(void) {
  CHECK_ERROR(kvcache_free(NULL, 1), KVCACHE_INVALID_ARGUMENT,
              "manager is NULL");
  CHECK(strstr(kvcache_last_error(NULL), "kvcache_free") != NULL);
  CHECK(kvcache_metrics_text(NULL, NULL, 0) == 0);
  kvcache_manager* m = Make(/*prefix_caching=*/1);
  CHECK(AddAndPrefill(m, 1, NULL, 0, 1.0f) == 0);
  int64_t ids[1] = {1};
  kvcache_block_table_view table =
      KVCACHE_STRUCT_INIT(kvcache_block_table_view);
  CHECK_ERROR(kvcache_batch_block_table(m, ids, -1, NULL, &table),
              KVCACHE_INVALID_ARGUMENT, "num_sequences -1 is negative");
  CHECK_ERROR(kvcache_batch_block_table(m, NULL, 1, NULL, &table),
              KVCACHE_INVALID_ARGUMENT, "sequences is NULL");
  float out[8 * H * D];
  kvcache_tensor o = Tensor(out, 8);
  CHECK_ERROR(kvcache_gather(m, 1, 0, 0, 8, &o, &o, NULL),
              KVCACHE_INVALID_ARGUMENT, "same tensor");
  kvcache_tensor bad = o;
  bad.ndim = 12;
  CHECK_ERROR(kvcache_gather(m, 1, 0, 0, 8, &bad, &o, NULL),
              KVCACHE_INVALID_ARGUMENT, "ndim 12");
  CHECK(kvcache_validate(m) == KVCACHE_OK);
  kvcache_destroy(m);
}

/* Item 10: the last error is per thread. */
enum { kThreads = 8, kCalls = 20000 };
static kvcache_manager* shared;
static int thread_failures[kThreads];

static void* Worker(void* arg) {
  const int t = (int)(intptr_t)arg;
  char expected[64];
  snprintf(expected, sizeof(expected), "sequence %d not found", 1000 + t);
  for (int i = 0; i < kCalls; ++i) {
    int64_t length;
    if (kvcache_sequence_length(shared, 1000 + t, &length) !=
            KVCACHE_NOT_FOUND ||
        strstr(kvcache_last_error(shared), expected) == NULL) {
      ++thread_failures[t];
    }
  }
  return NULL;
}

static void LastErrorIsPerThread(void) {
  shared = Make(/*prefix_caching=*/1);
  pthread_t threads[kThreads];
  for (int t = 0; t < kThreads; ++t) {
    CHECK(pthread_create(&threads[t], NULL, Worker, (void*)(intptr_t)t) == 0);
  }
  int wrong = 0;
  for (int t = 0; t < kThreads; ++t) {
    pthread_join(threads[t], NULL);
    wrong += thread_failures[t];
  }
  if (wrong != 0) {
    fprintf(stderr, "%d of %d reads saw another thread's message\n", wrong,
            kThreads * kCalls);
  }
  CHECK(wrong == 0);
  kvcache_destroy(shared);
}

int main(void) {
  HostileCounts();
  SaltsAreBytes();
  Messages();
  LastErrorIsPerThread();
  if (failures == 0) printf("kvcache_c_hardening_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
