/* The C API's layer groups (api/kvcache_c.h, kvcache_layer_group), from C:
 * kvcache_config_block_bytes validates a hybrid config and gives its page
 * bytes; hostile group arrays (NULL, a wrong struct_size, a huge count, a
 * layer twice) are INVALID_ARGUMENT with a message naming them;
 * kvcache_create serves groups of different shapes (records; each layer's
 * view its group's shape); a manager of same-shape groups (sliding + full,
 * then K-only) appends and gathers per layer, hands out block tables per
 * table, forks (the child's draft step writes a copy of the shared last
 * block; the parent reads back unchanged), truncates (refused below the
 * sliding window's released blocks), commits accepted drafts, runs a graph
 * step (kvcache_group_graph_step: each table's inputs), and refuses a
 * bad table, a V for a K-only group and what groups do not offer. Exits
 * non-zero on the first failure. */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "api/kvcache_c.h"
#include "tests/c_check.h"

#define CHECK_ERROR_HAS(needle) \
  CHECK(strstr(kvcache_last_error(NULL), (needle)) != NULL)

static uint64_t Reserve(kvcache_manager* m, int64_t seq, int64_t n) {
  kvcache_reserve_request r;
  memset(&r, 0, sizeof(r));
  r.struct_size = sizeof(r);
  r.sequence = seq;
  r.num_tokens = n;
  kvcache_plan plan;
  memset(&plan, 0, sizeof(plan));
  plan.struct_size = sizeof(plan);
  CHECK_IS(KVCACHE_OK, kvcache_reserve(m, &r, 1, NULL, &plan));
  return plan.id;
}

/* Gemma-like: layers 0-3 sliding (window 8), 4-5 full, one shape. */
static void RunManager(void) {
  static const int32_t sliding[] = {0, 1, 2, 3};
  static const int32_t full[] = {4, 5};
  kvcache_layer_group g[2];
  memset(g, 0, sizeof(g));
  for (int i = 0; i < 2; ++i) {
    g[i].struct_size = sizeof(kvcache_layer_group);
    g[i].cache_dtype = KVCACHE_INT8;
    g[i].num_kv_heads = 1;
    g[i].head_size = 8;
    g[i].head_size_v = 8;
  }
  g[0].layers = sliding;
  g[0].num_layers = 4;
  g[0].kind = KVCACHE_ATTENTION_SLIDING_WINDOW;
  g[0].sliding_window = 8;
  g[1].layers = full;
  g[1].num_layers = 2;
  g[1].kind = KVCACHE_ATTENTION_FULL;
  kvcache_config c;
  kvcache_config_init(&c);
  c.num_layers = 6;
  c.block_size = 4;
  c.num_blocks = 64;
  c.input_dtype = KVCACHE_FLOAT32;
  c.layer_groups = g;
  c.num_layer_groups = 2;
  c.graph_max_tokens = 4;
  kvcache_manager* m = NULL;
  CHECK_IS(KVCACHE_OK, kvcache_create(&c, &m));
  if (m == NULL) return;
  int32_t tables = 0, table = -1;
  CHECK_IS(KVCACHE_OK, kvcache_num_block_tables(m, &tables));
  CHECK(tables == 3); /* gcd(4, 2) = 2 layers per page: 2 + 1 tables. */
  CHECK_IS(KVCACHE_OK, kvcache_layer_block_table(m, 5, &table));
  CHECK(table == 2);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_layer_block_table(m, 6, &table));
  CHECK_ERROR_HAS("layer 6");
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_layer_block_table(m, 0, NULL));

  const int32_t prompt[20] = {0};
  int64_t computed = -1;
  CHECK_IS(KVCACHE_OK,
           kvcache_add_sequence(m, 7, prompt, 20, 0, NULL, 0, &computed));
  CHECK(computed == 0);
  const uint64_t plan = Reserve(m, 7, 20);
  float k[20 * 8], v[20 * 8], ko[20 * 8], vo[20 * 8];
  for (int i = 0; i < 20 * 8; ++i) {
    /* Each row's amax is 127: scale 1, integers round-trip exactly. */
    k[i] = i % 8 == 0 ? 127.0f : (float)(i % 13) - 6.0f;
    v[i] = i % 8 == 0 ? -127.0f : (float)(i % 7) - 3.0f;
  }
  kvcache_tensor kt = HostTensor3(k, KVCACHE_FLOAT32, 20, 1, 8),
                 vt = HostTensor3(v, KVCACHE_FLOAT32, 20, 1, 8);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_append(m, plan, 0, &kt, NULL, NULL));
  CHECK_ERROR_HAS("value");
  for (int32_t layer = 0; layer < 6; ++layer) {
    CHECK_IS(KVCACHE_OK, kvcache_append(m, plan, layer, &kt, &vt, NULL));
  }
  CHECK_IS(KVCACHE_OK, kvcache_commit(m, plan));

  /* Full layer 4: every token. */
  kvcache_tensor kot = HostTensor3(ko, KVCACHE_FLOAT32, 20, 1, 8),
                 vot = HostTensor3(vo, KVCACHE_FLOAT32, 20, 1, 8);
  CHECK_IS(KVCACHE_OK, kvcache_gather(m, 7, 4, 0, 20, &kot, &vot, NULL));
  CHECK(memcmp(ko, k, sizeof(k)) == 0);
  /* Sliding layer 0: blocks 0-2 left the window of 8 (next token 20 reads
   * 13..20): released, -1 in the table, their tokens OUT_OF_RANGE. */
  int32_t blocks[8];
  int64_t n = 0;
  CHECK_IS(KVCACHE_OK, kvcache_group_block_table(m, 7, 0, blocks, 8, &n));
  CHECK(n == 5 && blocks[0] == -1 && blocks[2] == -1 && blocks[3] >= 0);
  CHECK_IS(KVCACHE_OUT_OF_RANGE,
           kvcache_gather(m, 7, 0, 0, 4, &kot, &vot, NULL));
  CHECK_ERROR_HAS("sliding window");
  kot = HostTensor3(ko, KVCACHE_FLOAT32, 8, 1, 8);
  vot = HostTensor3(vo, KVCACHE_FLOAT32, 8, 1, 8);
  CHECK_IS(KVCACHE_OK, kvcache_gather(m, 7, 0, 12, 8, &kot, &vot, NULL));
  CHECK(memcmp(ko, k + 12 * 8, 8 * 8 * sizeof(float)) == 0);
  CHECK(memcmp(vo, v + 12 * 8, 8 * 8 * sizeof(float)) == 0);
  int64_t held = -1;
  CHECK_IS(KVCACHE_OK, kvcache_held_blocks(m, 0, &held));
  CHECK(held == 2);
  CHECK_IS(KVCACHE_OK, kvcache_held_blocks(m, 2, &held));
  CHECK(held == 5);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_held_blocks(m, 3, &held));

  /* Block tables: a table per call; hostile tables and sizes by name. */
  const int64_t seqs[1] = {7};
  kvcache_block_table_view view;
  memset(&view, 0, sizeof(view));
  view.struct_size = sizeof(view);
  CHECK_IS(KVCACHE_OK,
           kvcache_group_batch_block_table(m, 0, seqs, 1, NULL, &view));
  CHECK(view.num_sequences == 1 && view.max_blocks == 5);
  CHECK(view.block_table[0] == -1 && view.block_table[3] == blocks[3]);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_group_batch_block_table(m, 3, seqs, 1, NULL, &view));
  CHECK_ERROR_HAS("block table 3");
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_group_batch_block_table(m, -1, seqs, 1, NULL, &view));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_group_batch_block_table(m, 0, NULL, 1, NULL, &view));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_group_batch_block_table(m, 0, seqs, 1, NULL, NULL));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_batch_block_table(m, seqs, 1, NULL, &view));
  CHECK_ERROR_HAS("3 block tables");
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_block_table(m, 7, blocks, 8, &n));
  CHECK_IS(KVCACHE_OUT_OF_RANGE,
           kvcache_group_block_table(m, 7, 2, blocks, 2, &n));
  CHECK(n == 5);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_group_block_table(m, 7, 9, blocks, 8, &n));
  CHECK_IS(KVCACHE_NOT_FOUND,
           kvcache_group_block_table(m, 8, 0, blocks, 8, &n));

  /* Fork: the child shares every table, released entries included. */
  CHECK_IS(KVCACHE_OK, kvcache_fork(m, 7, 8));
  int32_t child[8];
  for (int32_t t = 0; t < 3; ++t) {
    int64_t pn = 0, cn = 0;
    CHECK_IS(KVCACHE_OK, kvcache_group_block_table(m, 7, t, blocks, 8, &pn));
    CHECK_IS(KVCACHE_OK, kvcache_group_block_table(m, 8, t, child, 8, &cn));
    CHECK(pn == cn && memcmp(blocks, child, pn * sizeof(int32_t)) == 0);
  }
  int64_t length = 0;
  CHECK_IS(KVCACHE_OK, kvcache_known_length(m, 8, &length));
  CHECK(length == 20);
  /* 3 blocks left the window: at 18 tokens the window (8) reads token 11,
   * in a released block; 19 is the shortest length that works. */
  CHECK_IS(KVCACHE_FAILED_PRECONDITION, kvcache_truncate(m, 8, 18));
  CHECK_ERROR_HAS("sliding window of 8");
  CHECK_ERROR_HAS("at least 19");
  CHECK_IS(KVCACHE_OK, kvcache_truncate(m, 8, 19));
  /* A draft step of 3 tokens on the child, 1 accepted: token 19 sits in the
   * block it shares with the parent, which Reserve copies first. */
  const int32_t drafts[3] = {5, 6, 7};
  kvcache_reserve_request r;
  memset(&r, 0, sizeof(r));
  r.struct_size = sizeof(r);
  r.sequence = 8;
  r.num_tokens = 3;
  r.new_token_ids = drafts;
  r.num_new_token_ids = 3;
  kvcache_plan dp;
  memset(&dp, 0, sizeof(dp));
  dp.struct_size = sizeof(dp);
  CHECK_IS(KVCACHE_OK, kvcache_reserve(m, &r, 1, NULL, &dp));
  float dk[3 * 8], dv[3 * 8];
  for (int i = 0; i < 3 * 8; ++i) {
    dk[i] = i % 8 == 0 ? 127.0f : 2.0f;
    dv[i] = i % 8 == 0 ? 127.0f : -2.0f;
  }
  kvcache_tensor dkt = HostTensor3(dk, KVCACHE_FLOAT32, 3, 1, 8),
                 dvt = HostTensor3(dv, KVCACHE_FLOAT32, 3, 1, 8);
  for (int32_t layer = 0; layer < 6; ++layer) {
    CHECK_IS(KVCACHE_OK, kvcache_append(m, dp.id, layer, &dkt, &dvt, NULL));
  }
  const int64_t wrong[1] = {4};
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_commit_accepted(m, dp.id, wrong, 1));
  const int64_t accepted[1] = {1};
  CHECK_IS(KVCACHE_OK, kvcache_commit_accepted(m, dp.id, accepted, 1));
  CHECK_IS(KVCACHE_OK, kvcache_sequence_length(m, 8, &length));
  CHECK(length == 20);
  CHECK_IS(KVCACHE_OK, kvcache_known_length(m, 8, &length));
  CHECK(length == 20);
  kot = HostTensor3(ko, KVCACHE_FLOAT32, 20, 1, 8);
  vot = HostTensor3(vo, KVCACHE_FLOAT32, 20, 1, 8);
  CHECK_IS(KVCACHE_OK, kvcache_gather(m, 8, 4, 0, 20, &kot, &vot, NULL));
  CHECK(memcmp(ko, k, 19 * 8 * sizeof(float)) == 0);
  CHECK(memcmp(ko + 19 * 8, dk, 8 * sizeof(float)) == 0);
  CHECK(memcmp(vo + 19 * 8, dv, 8 * sizeof(float)) == 0);
  CHECK_IS(KVCACHE_OK, kvcache_gather(m, 7, 4, 0, 20, &kot, &vot, NULL));
  CHECK(memcmp(ko, k, sizeof(k)) == 0);
  CHECK(memcmp(vo, v, sizeof(v)) == 0);
  CHECK_IS(KVCACHE_OK, kvcache_validate(m));
  CHECK_IS(KVCACHE_OK, kvcache_free(m, 8));

  /* A graph step: per table a slot mapping and a block table at fixed
   * addresses (rows interleaved: row_stride = 3 tables x 64 columns), the
   * positions and lengths shared; released entries -1. */
  kvcache_graph_step_inputs gs[3];
  for (int32_t t = 0; t < 3; ++t) {
    memset(&gs[t], 0, sizeof(gs[t]));
    gs[t].struct_size = sizeof(gs[t]);
    CHECK_IS(KVCACHE_OK, kvcache_group_graph_step(m, t, &gs[t]));
  }
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_graph_step(m, &gs[0]));
  CHECK_ERROR_HAS("3 block tables");
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_group_graph_step(m, 3, &gs[0]));
  CHECK_ERROR_HAS("block table 3");
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_group_graph_step(m, -1, &gs[0]));
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_group_graph_step(m, 0, NULL));
  CHECK(gs[0].positions == gs[2].positions);
  CHECK(gs[0].slot_mapping != gs[2].slot_mapping);
  CHECK(gs[0].max_tokens == 4 && gs[0].row_stride == 3 * 64);
  const int32_t next[1] = {9};
  memset(&r, 0, sizeof(r));
  r.struct_size = sizeof(r);
  r.sequence = 7;
  r.num_tokens = 1;
  r.new_token_ids = next;
  r.num_new_token_ids = 1;
  kvcache_plan gp;
  memset(&gp, 0, sizeof(gp));
  gp.struct_size = sizeof(gp);
  CHECK_IS(KVCACHE_OK, kvcache_reserve_graph_step(m, &r, 1, 2, NULL, &gp));
  CHECK(gp.graph_tokens == 2 && gp.slot_mapping == gs[0].slot_mapping);
  for (int32_t t = 0; t < 3; ++t) {
    CHECK_IS(KVCACHE_OK, kvcache_group_block_table(m, 7, t, blocks, 8, &n));
    CHECK(n == 6);
    CHECK(gs[t].slot_mapping[0] == (int64_t)blocks[5] * 4);
    CHECK(gs[t].slot_mapping[1] == -1);
    CHECK(memcmp(gs[t].block_table, blocks, 6 * sizeof(int32_t)) == 0);
    CHECK(gs[t].block_table[6] == 0);
  }
  CHECK(gs[0].block_table[0] == -1 && gs[2].block_table[0] >= 0);
  CHECK(gs[0].positions[0] == 20 && gs[0].positions[1] == 0);
  CHECK(gs[0].seq_lens[0] == 21 && gs[0].seq_lens[1] == 0);
  /* Each append takes the padded 2 rows (the second is padding). */
  float gk[2 * 8], gv[2 * 8];
  for (int i = 0; i < 2 * 8; ++i) {
    gk[i] = i % 8 == 0 ? 127.0f : 3.0f;
    gv[i] = i % 8 == 0 ? -127.0f : -4.0f;
  }
  kvcache_tensor gkt = HostTensor3(gk, KVCACHE_FLOAT32, 2, 1, 8),
                 gvt = HostTensor3(gv, KVCACHE_FLOAT32, 2, 1, 8);
  for (int32_t layer = 0; layer < 6; ++layer) {
    CHECK_IS(KVCACHE_OK, kvcache_append(m, gp.id, layer, &gkt, &gvt, NULL));
  }
  CHECK_IS(KVCACHE_OK, kvcache_commit(m, gp.id));
  kot = HostTensor3(ko, KVCACHE_FLOAT32, 1, 1, 8);
  vot = HostTensor3(vo, KVCACHE_FLOAT32, 1, 1, 8);
  for (int32_t layer = 0; layer < 6; ++layer) {
    CHECK_IS(KVCACHE_OK, kvcache_gather(m, 7, layer, 20, 1, &kot, &vot, NULL));
    CHECK(memcmp(ko, gk, 8 * sizeof(float)) == 0);
    CHECK(memcmp(vo, gv, 8 * sizeof(float)) == 0);
  }
  CHECK_IS(KVCACHE_OK, kvcache_reset_prefix_cache(m));
  CHECK_IS(KVCACHE_OK, kvcache_validate(m));
  CHECK_IS(KVCACHE_OK, kvcache_free(m, 7));
  kvcache_destroy(m);
}

/* DeepSeek-like: one K-only latent group (head_size_v 0). */
static void RunKOnly(void) {
  static const int32_t layers[] = {0, 1};
  kvcache_layer_group g;
  memset(&g, 0, sizeof(g));
  g.struct_size = sizeof(g);
  g.cache_dtype = KVCACHE_INT8;
  g.num_kv_heads = 1;
  g.head_size = 64;
  g.head_size_v = 0;
  g.layers = layers;
  g.num_layers = 2;
  kvcache_config c;
  kvcache_config_init(&c);
  c.num_layers = 2;
  c.block_size = 4;
  c.num_blocks = 8;
  c.input_dtype = KVCACHE_FLOAT32;
  c.layer_groups = &g;
  c.num_layer_groups = 1;
  kvcache_manager* m = NULL;
  CHECK_IS(KVCACHE_OK, kvcache_create(&c, &m));
  if (m == NULL) return;
  kvcache_layer_view lv;
  memset(&lv, 0, sizeof(lv));
  lv.struct_size = sizeof(lv);
  CHECK_IS(KVCACHE_OK, kvcache_get_layer_view(m, 1, &lv));
  CHECK(lv.value_cache == NULL && lv.head_size_v == 0);
  const int32_t prompt[5] = {1, 2, 3, 4, 5};
  int64_t computed = -1;
  CHECK_IS(KVCACHE_OK,
           kvcache_add_sequence(m, 1, prompt, 5, 0, NULL, 0, &computed));
  const uint64_t plan = Reserve(m, 1, 5);
  float k[5 * 64], ko[5 * 64];
  for (int i = 0; i < 5 * 64; ++i) {
    k[i] = i % 64 == 0 ? 127.0f : (float)(i % 11) - 5.0f;
  }
  kvcache_tensor kt = HostTensor3(k, KVCACHE_FLOAT32, 5, 1, 64),
                 vt = HostTensor3(k, KVCACHE_FLOAT32, 5, 1, 64);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_append(m, plan, 0, &kt, &vt, NULL));
  CHECK_ERROR_HAS("K-only");
  for (int32_t layer = 0; layer < 2; ++layer) {
    CHECK_IS(KVCACHE_OK, kvcache_append(m, plan, layer, &kt, NULL, NULL));
  }
  CHECK_IS(KVCACHE_OK, kvcache_commit(m, plan));
  kvcache_tensor kot = HostTensor3(ko, KVCACHE_FLOAT32, 5, 1, 64),
                 vot = HostTensor3(ko, KVCACHE_FLOAT32, 5, 1, 64);
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_gather(m, 1, 1, 0, 5, &kot, &vot, NULL));
  CHECK_ERROR_HAS("K-only");
  CHECK_IS(KVCACHE_OK, kvcache_gather(m, 1, 1, 0, 5, &kot, NULL, NULL));
  CHECK(memcmp(ko, k, sizeof(k)) == 0);
  CHECK_IS(KVCACHE_OK, kvcache_validate(m));
  kvcache_destroy(m);
}

int main(void) {
  static const int32_t sliding_layers[] = {0, 1, 3, 4};
  static const int32_t full_layers[] = {2, 5};
  kvcache_layer_group groups[2];
  memset(groups, 0, sizeof(groups));
  for (int i = 0; i < 2; ++i) {
    groups[i].struct_size = sizeof(kvcache_layer_group);
    groups[i].cache_dtype = KVCACHE_INT8;
  }
  groups[0].layers = sliding_layers;
  groups[0].num_layers = 4;
  groups[0].kind = KVCACHE_ATTENTION_SLIDING_WINDOW;
  groups[0].sliding_window = 64;
  groups[0].num_kv_heads = 4;
  groups[0].head_size = 64;
  groups[0].head_size_v = 64;
  groups[1].layers = full_layers;
  groups[1].num_layers = 2;
  groups[1].kind = KVCACHE_ATTENTION_FULL;
  groups[1].num_kv_heads = 1;
  groups[1].head_size = 576; /* K-only latent */
  groups[1].head_size_v = 0;

  kvcache_config config;
  kvcache_config_init(&config);
  CHECK(config.num_layer_groups == 0 && config.layer_groups == NULL);
  config.num_layers = 6;
  config.num_blocks = 8;
  config.layer_groups = groups;
  config.num_layer_groups = 2;
  int64_t bytes = 0;
  CHECK_IS(KVCACHE_OK, kvcache_config_block_bytes(&config, &bytes));
  /* Two shapes: records of the larger of 4 x 64 + 4 x 64 + 2 x 4 x 4 = 544
   * and 576 + 4 -> 592 bytes per token; slots of 16 records, 2 per page. */
  CHECK(bytes == 2 * 16 * 592);

  /* Each layer has its group's shape over the records. */
  kvcache_manager* m = NULL;
  CHECK_IS(KVCACHE_OK, kvcache_create(&config, &m));
  kvcache_layer_view lv;
  memset(&lv, 0, sizeof(lv));
  lv.struct_size = sizeof(lv);
  CHECK_IS(KVCACHE_OK, kvcache_get_layer_view(m, 0, &lv));
  CHECK(lv.num_kv_heads == 4 && lv.head_size == 64 && lv.value_cache != NULL);
  CHECK(lv.key_strides[1] == 592 && lv.value_strides[1] == 592);
  CHECK(lv.scale_strides[1] == 592 / 4);
  CHECK_IS(KVCACHE_OK, kvcache_get_layer_view(m, 2, &lv));
  CHECK(lv.num_kv_heads == 1 && lv.head_size == 576 && lv.value_cache == NULL);
  CHECK(lv.key_strides[1] == 592 && lv.key_strides[0] == 16 * 592);
  kvcache_destroy(m);

  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_config_block_bytes(&config, NULL));
  config.layer_groups = NULL;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("layer_groups is NULL but num_layer_groups is 2");
  config.layer_groups = groups;
  config.num_layer_groups = -1;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("num_layer_groups -1 is negative");
  config.num_layer_groups = 1 << 30;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("exceeds");
  config.num_layer_groups = 2;
  groups[1].struct_size = 3;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("layer_groups[1]");
  groups[1].struct_size = sizeof(kvcache_layer_group);
  groups[1].layers = NULL;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("layers is NULL");
  groups[1].layers = sliding_layers; /* Layer 0 twice, 5 in none. */
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("layer 0 is in layer_groups[0] and layer_groups[1]");
  groups[1].layers = full_layers;
  config.head_size = 64;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT,
           kvcache_config_block_bytes(&config, &bytes));
  CHECK_ERROR_HAS("head_size 64 must be 0 with layer_groups");
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_config_block_bytes(NULL, &bytes));

  /* No groups: the uniform config's block bytes, as before. */
  kvcache_config_init(&config);
  config.num_layers = 2;
  config.num_kv_heads = 2;
  config.head_size = 64;
  config.num_blocks = 4;
  CHECK_IS(KVCACHE_OK, kvcache_config_block_bytes(&config, &bytes));
  CHECK(bytes == 2 * 16 * 2 * (64 + 64 + 8));

  RunManager();
  RunKOnly();

  if (failures != 0) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("kvcache_c_groups_test: all checks passed\n");
  return 0;
}
