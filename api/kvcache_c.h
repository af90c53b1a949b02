/* The C API of kvcache: an opaque handle over a KVCacheManager, for engines
 * written in C or loaded through an FFI. The semantics of every call are those
 * of the same method in kv_cache_manager.h.
 *
 * Every fallible call returns a kvcache_status; on failure
 * kvcache_last_error() returns its message. The last error is per thread: it
 * is the message of the calling thread's last failed call of any handle
 * (kvcache_create and calls on a NULL handle included), never another
 * thread's, and a successful call leaves it as it was. A failed call changes
 * nothing. Thread-safe like the C++ manager; the returned message pointer is
 * valid until the calling thread's next failed call.
 *
 * Counts are checked before anything is read or copied: batch_size at most
 * KVCACHE_MAX_BATCH, prompt_len and num_new_token_ids at most
 * KVCACHE_MAX_TOKENS, salt_len at most KVCACHE_MAX_SALT_BYTES; larger or
 * negative counts are KVCACHE_INVALID_ARGUMENT naming the argument.
 *
 * Ownership: kvcache_create returns a handle the caller destroys with
 * kvcache_destroy. Pointers returned in views and plans are owned by the
 * handle. Streams are cudaStream_t passed as void* (NULL = default stream);
 * they are ignored on the CPU backend. */

#ifndef KVCACHE_API_KVCACHE_C_H_
#define KVCACHE_API_KVCACHE_C_H_

#include <stddef.h>
#include <stdint.h>

#include "dlpack/dlpack.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvcache_manager kvcache_manager;

/* Limits on counts passed to the C API (see above). */
#define KVCACHE_MAX_BATCH 65536
#define KVCACHE_MAX_TOKENS 2147483647LL
#define KVCACHE_MAX_SALT_BYTES 65536

typedef enum kvcache_status {
  KVCACHE_OK = 0,
  KVCACHE_INVALID_ARGUMENT = 1,
  KVCACHE_NOT_FOUND = 2,
  KVCACHE_ALREADY_EXISTS = 3,
  KVCACHE_RESOURCE_EXHAUSTED = 4,
  KVCACHE_FAILED_PRECONDITION = 5,
  KVCACHE_OUT_OF_RANGE = 6,
  KVCACHE_INTERNAL = 7,
  KVCACHE_UNKNOWN = 8
} kvcache_status;

/* Values of kvcache::DType. */
typedef enum kvcache_dtype {
  KVCACHE_FLOAT32 = 0,
  KVCACHE_FLOAT16 = 1,
  KVCACHE_BFLOAT16 = 2,
  KVCACHE_INT8 = 3,
  KVCACHE_FP8_E4M3 = 4
} kvcache_dtype;

typedef enum kvcache_backend {
  KVCACHE_CPU = 0,
  KVCACHE_CUDA = 1
} kvcache_backend;
typedef enum kvcache_memory {
  KVCACHE_HOST = 0,
  KVCACHE_DEVICE = 1
} kvcache_memory;

typedef struct kvcache_config {
  int32_t num_layers;
  int32_t num_kv_heads;
  int32_t head_size;
  int32_t head_size_v; /* 0 = head_size */
  int32_t block_size;
  int32_t cache_dtype; /* kvcache_dtype */
  int32_t input_dtype; /* kvcache_dtype */
  int32_t backend;     /* kvcache_backend */
  int32_t device;
  int64_t num_blocks; /* Exactly one of the three capacity fields is set. */
  int64_t memory_budget_bytes;
  double memory_fraction;
  int32_t enable_prefix_caching;
  int32_t max_tokens_per_step;
  int32_t max_sequences_per_step;
  int32_t max_blocks_per_sequence;
  int32_t max_inflight_plans;
  /* Query heads for kvcache_attention (0 = attention off). Appended last. */
  int32_t num_q_heads;
} kvcache_config;

/* A caller tensor: strides in elements; [tokens, heads, head_size] for K/V. */
typedef struct kvcache_tensor {
  void* data;
  int32_t dtype; /* kvcache_dtype */
  int32_t ndim;  /* <= 4 */
  int64_t shape[4];
  int64_t strides[4];
  int32_t memory; /* kvcache_memory */
  int32_t device;
} kvcache_tensor;

typedef struct kvcache_reserve_request {
  int64_t sequence;
  int64_t num_tokens;
  const int32_t* new_token_ids; /* May be NULL when num_new_token_ids is 0. */
  int64_t num_new_token_ids;
} kvcache_reserve_request;

typedef struct kvcache_plan {
  uint64_t id;
  int64_t num_tokens;
  const int64_t* slot_mapping; /* Backend memory, valid until commit/abort. */
  int64_t num_block_copies;
} kvcache_plan;

typedef struct kvcache_block_table_view {
  const int32_t* block_table; /* [num_sequences, row_stride], backend memory */
  const int32_t* seq_lens;
  int32_t num_sequences;
  int32_t max_blocks;
  int32_t row_stride;
} kvcache_block_table_view;

typedef struct kvcache_layer_view {
  void* key_cache;
  void* value_cache;
  float* key_scale; /* NULL for bf16/fp16 caches */
  float* value_scale;
  int32_t cache_dtype;
  int32_t memory;
  int32_t device;
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_size;
  int64_t head_size_v;
  int64_t key_strides[4];
  int64_t value_strides[4];
  int64_t scale_strides[3];
} kvcache_layer_view;

typedef struct kvcache_metrics {
  int64_t blocks_total;
  int64_t blocks_free;
  int64_t blocks_cached;
  int64_t blocks_in_use;
  double usage;
  int64_t sequences;
  int64_t plans_in_flight;
  int64_t prefix_queries;
  int64_t prefix_query_tokens;
  int64_t prefix_hit_tokens;
  int64_t evictions;
  int64_t tokens_appended;
  int64_t tokens_committed;
  int64_t kernel_launches;
  int64_t reserve_failures;
  int64_t block_copies;
} kvcache_metrics;

/* Fills `config` with the C++ defaults (block_size 16, int8 cache, bf16 input,
 * CPU, ...). */
void kvcache_config_init(kvcache_config* config);
const char* kvcache_status_name(kvcache_status status);

kvcache_status kvcache_create(const kvcache_config* config,
                              kvcache_manager** out);
/* The calling thread's last error ("" if none); the same as
 * kvcache_last_error(NULL). Kept for callers of earlier versions. */
const char* kvcache_last_create_error(void);
void kvcache_destroy(kvcache_manager* manager);
/* The message of the calling thread's last failed call ("" if none), whatever
 * the handle (which is not read and may be NULL). */
const char* kvcache_last_error(kvcache_manager* manager);

/* Registers a sequence with its prompt. The extra key (adapter_id, salt)
 * separates tenants in the prefix cache: the salt is salt_len bytes, any
 * values (NUL included); salt NULL with salt_len 0 means no salt. Sequences
 * share cached blocks only when their adapter ids are equal and their salts
 * are equal byte for byte (so "\0Alice" and "\0Bob" never share, and a salt
 * of one zero byte never shares with no salt). */
kvcache_status kvcache_add_sequence(kvcache_manager* manager, int64_t sequence,
                                    const int32_t* prompt, int64_t prompt_len,
                                    int64_t adapter_id, const uint8_t* salt,
                                    size_t salt_len, int64_t* computed_tokens);
kvcache_status kvcache_reserve(kvcache_manager* manager,
                               const kvcache_reserve_request* batch,
                               int64_t batch_size, void* stream,
                               kvcache_plan* plan);
kvcache_status kvcache_can_reserve(kvcache_manager* manager,
                                   const kvcache_reserve_request* batch,
                                   int64_t batch_size);
kvcache_status kvcache_append(kvcache_manager* manager, uint64_t plan_id,
                              int32_t layer, const kvcache_tensor* key,
                              const kvcache_tensor* value, void* stream);
kvcache_status kvcache_append_dlpack(kvcache_manager* manager, uint64_t plan_id,
                                     int32_t layer, const DLTensor* key,
                                     const DLTensor* value, void* stream);
kvcache_status kvcache_commit(kvcache_manager* manager, uint64_t plan_id);
kvcache_status kvcache_abort(kvcache_manager* manager, uint64_t plan_id);
kvcache_status kvcache_fork(kvcache_manager* manager, int64_t parent,
                            int64_t child);
kvcache_status kvcache_free(kvcache_manager* manager, int64_t sequence);

/* Copies up to `capacity` block ids into `blocks`; *num_blocks gets the table's
 * length. KVCACHE_OUT_OF_RANGE (nothing copied) when capacity is too small. */
kvcache_status kvcache_block_table(kvcache_manager* manager, int64_t sequence,
                                   int32_t* blocks, int64_t capacity,
                                   int64_t* num_blocks);
kvcache_status kvcache_sequence_length(kvcache_manager* manager,
                                       int64_t sequence, int64_t* length);
kvcache_status kvcache_batch_block_table(kvcache_manager* manager,
                                         const int64_t* sequences,
                                         int64_t num_sequences, void* stream,
                                         kvcache_block_table_view* view);
kvcache_status kvcache_get_layer_view(kvcache_manager* manager, int32_t layer,
                                      kvcache_layer_view* view);
kvcache_status kvcache_gather(kvcache_manager* manager, int64_t sequence,
                              int32_t layer, int64_t token_begin,
                              int64_t num_tokens, const kvcache_tensor* key_out,
                              const kvcache_tensor* value_out, void* stream);
/* Options of kvcache_attention (KVCacheManager::Attention's AttentionOptions):
 * softmax_scale > 0, soft_cap 0 = off, window 0 = off, and 1 to 8 query
 * tokens per sequence (its last committed tokens). */
typedef struct kvcache_attention_options {
  float softmax_scale;
  float soft_cap;
  int32_t window;
  int32_t num_query_tokens_per_sequence;
} kvcache_attention_options;
/* Decode attention over `layer`'s cache for `num_sequences` sequences:
 * q [num_sequences * n, num_q_heads, head_size] (bf16/fp16) -> out [same rows,
 * num_q_heads, head_size_v] in q's dtype. Needs config.num_q_heads > 0. */
kvcache_status kvcache_attention(
    kvcache_manager* manager, const int64_t* sequences, int64_t num_sequences,
    int32_t layer, const kvcache_tensor* q, const kvcache_tensor* out,
    const kvcache_attention_options* options, void* stream);
kvcache_status kvcache_tokens_that_fit(kvcache_manager* manager,
                                       int64_t sequence, int64_t* tokens);
kvcache_status kvcache_get_metrics(kvcache_manager* manager,
                                   kvcache_metrics* metrics);
/* Writes the Prometheus text (NUL-terminated, truncated to capacity) and
 * returns its full length without the NUL. */
size_t kvcache_metrics_text(kvcache_manager* manager, char* buffer,
                            size_t capacity);
kvcache_status kvcache_validate(kvcache_manager* manager);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVCACHE_API_KVCACHE_C_H_ */
