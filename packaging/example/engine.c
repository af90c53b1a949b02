/* A tiny engine step against the installed library (packaging/README in the
 * main README): create a CPU manager, add a sequence, reserve, append every
 * layer, commit, gather a layer back, destroy. Build it with
 *
 *   cc engine.c $(pkg-config --cflags --libs kvcache) -lm -o engine
 */
#include <kvcache/kvcache_c.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

enum { LAYERS = 2, HEADS = 2, HEAD_SIZE = 16, TOKENS = 6 };

static int Fail(const char* call, kvcache_status s) {
  fprintf(stderr, "engine: %s: %s: %s\n", call, kvcache_status_name(s),
          kvcache_last_error(NULL));
  return 1;
}

static kvcache_tensor Tensor(float* data) {
  kvcache_tensor t = KVCACHE_STRUCT_INIT(kvcache_tensor);
  t.data = data;
  t.dtype = KVCACHE_FLOAT32;
  t.ndim = 3;
  t.shape[0] = TOKENS;
  t.shape[1] = HEADS;
  t.shape[2] = HEAD_SIZE;
  t.strides[0] = HEADS * HEAD_SIZE;
  t.strides[1] = HEAD_SIZE;
  t.strides[2] = 1;
  t.memory = KVCACHE_HOST;
  return t;
}

int main(void) {
  printf("engine: kvcache %s\n", kvcache_version());
  kvcache_config config;
  kvcache_config_init(&config);
  config.num_layers = LAYERS;
  config.num_kv_heads = HEADS;
  config.head_size = HEAD_SIZE;
  config.block_size = 4;
  config.num_blocks = 16;
  config.cache_dtype = KVCACHE_INT8;
  config.input_dtype = KVCACHE_FLOAT32;
  kvcache_manager* m = NULL;
  kvcache_status s = kvcache_create(&config, &m);
  if (s != KVCACHE_OK) return Fail("kvcache_create", s);

  const int32_t prompt[TOKENS] = {1, 2, 3, 4, 5, 6};
  int64_t computed = 0;
  s = kvcache_add_sequence(m, 1, prompt, TOKENS, 0, NULL, 0, &computed);
  if (s != KVCACHE_OK) return Fail("kvcache_add_sequence", s);

  kvcache_reserve_request request =
      KVCACHE_STRUCT_INIT(kvcache_reserve_request);
  request.sequence = 1;
  request.num_tokens = TOKENS - computed;
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  s = kvcache_reserve(m, &request, 1, NULL, &plan);
  if (s != KVCACHE_OK) return Fail("kvcache_reserve", s);

  float k[TOKENS * HEADS * HEAD_SIZE], v[TOKENS * HEADS * HEAD_SIZE];
  for (int i = 0; i < TOKENS * HEADS * HEAD_SIZE; ++i) {
    k[i] = sinf(0.1f * (float)i);
    v[i] = cosf(0.1f * (float)i);
  }
  kvcache_tensor kt = Tensor(k), vt = Tensor(v);
  for (int layer = 0; layer < LAYERS; ++layer) {
    s = kvcache_append(m, plan.id, layer, &kt, &vt, NULL);
    if (s != KVCACHE_OK) return Fail("kvcache_append", s);
  }
  printf("engine: plan %llu, %lld tokens, first slot %lld\n",
         (unsigned long long)plan.id, (long long)plan.num_tokens,
         (long long)plan.host_slot_mapping[0]);
  s = kvcache_commit(m, plan.id);
  if (s != KVCACHE_OK) return Fail("kvcache_commit", s);

  float gk[TOKENS * HEADS * HEAD_SIZE], gv[TOKENS * HEADS * HEAD_SIZE];
  kvcache_tensor gkt = Tensor(gk), gvt = Tensor(gv);
  s = kvcache_gather(m, 1, LAYERS - 1, 0, TOKENS, &gkt, &gvt, NULL);
  if (s != KVCACHE_OK) return Fail("kvcache_gather", s);
  double err = 0, norm = 0;
  for (int i = 0; i < TOKENS * HEADS * HEAD_SIZE; ++i) {
    err += (gk[i] - k[i]) * (gk[i] - k[i]) + (gv[i] - v[i]) * (gv[i] - v[i]);
    norm += k[i] * k[i] + v[i] * v[i];
  }
  int64_t num_blocks = 0;
  s = kvcache_block_table(m, 1, NULL, 0, &num_blocks); /* size query */
  if (s != KVCACHE_OK) return Fail("kvcache_block_table", s);
  kvcache_destroy(m);
  const double rel = sqrt(err / norm);
  printf("engine: gathered %d tokens, relative error %.2e, %lld blocks\n",
         TOKENS, rel, (long long)num_blocks);
  if (rel > 1e-2 || num_blocks != 2) return 1;
  printf("engine: ok\n");
  return 0;
}
