/* The C API's layer groups (api/kvcache_c.h, kvcache_layer_group), from C:
 * kvcache_config_block_bytes validates a hybrid config and gives its page
 * bytes; hostile group arrays (NULL, a wrong struct_size, a huge count, a
 * layer twice) are INVALID_ARGUMENT with a message naming them; and
 * kvcache_create refuses groups with INVALID_ARGUMENT until the manager
 * serves them. Exits non-zero on the first failure. */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "api/kvcache_c.h"
#include "tests/c_check.h"

#define CHECK_ERROR_HAS(needle) \
  CHECK(strstr(kvcache_last_error(NULL), (needle)) != NULL)

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
  /* Slots: max(16 x 4 x (128 + 8), 16 x 1 x (576 + 4)) = 9280; 2 per page. */
  CHECK(bytes == 2 * 9280);

  kvcache_manager* m = (kvcache_manager*)1;
  CHECK_IS(KVCACHE_INVALID_ARGUMENT, kvcache_create(&config, &m));
  CHECK_ERROR_HAS("layer_groups");
  CHECK(m == NULL);

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

  if (failures != 0) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("kvcache_c_groups_test: all checks passed\n");
  return 0;
}
