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
 * they are ignored on the CPU backend.
 *
 * ABI: every struct passed by pointer begins with `size_t struct_size`, which
 * the caller sets to sizeof(the struct) as it was compiled
 * (kvcache_config_init does it for the config; KVCACHE_STRUCT_INIT(type) for
 * the others, e.g. `kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);`).
 * A call given a struct of another size fails with KVCACHE_INVALID_ARGUMENT
 * naming the struct and both sizes, before anything is read or written:
 * rebuild against this header. In an array (kvcache_reserve_request) every
 * element carries it. kvcache_version() and the KVCACHE_VERSION_* macros give
 * the version; the shared library's soname changes with the major version.
 *
 * Size queries: a call that fills a caller's buffer of `capacity` elements
 * (kvcache_block_table, kvcache_metrics_text) always reports the size needed,
 * also when the capacity is too small, and a NULL buffer with capacity 0 asks
 * for the size only.
 *
 * Logging: the library logs through a logger of its own (never spdlog's
 * default logger or global state): warnings and errors only by default, to
 * stderr, or to config.log_sink when one is set; config.log_level chooses
 * the level (KVCACHE_LOG_INFO shows the layout and capacity line of
 * kvcache_create). */

#ifndef KVCACHE_API_KVCACHE_C_H_
#define KVCACHE_API_KVCACHE_C_H_

#include <stddef.h>
#include <stdint.h>

#include "dlpack/dlpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVCACHE_VERSION_MAJOR 1
#define KVCACHE_VERSION_MINOR 0
#define KVCACHE_VERSION_PATCH 0

/* The functions of this header are the only symbols libkvcache.so exports. */
#if defined(__GNUC__)
#define KVCACHE_EXPORT __attribute__((visibility("default")))
#else
#define KVCACHE_EXPORT
#endif

/* `type var = KVCACHE_STRUCT_INIT(type);`: zeroes and sets struct_size. */
/* clang-format off */
#ifdef __cplusplus
#define KVCACHE_STRUCT_INIT(type) \
  ([] { type s_{}; s_.struct_size = sizeof(type); return s_; }())
#else
#define KVCACHE_STRUCT_INIT(type) {.struct_size = sizeof(type)}
#endif
/* clang-format on */

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
  KVCACHE_UNKNOWN = 8,
  /* Not offered for this config (e.g. Fork with layer groups). */
  KVCACHE_UNIMPLEMENTED = 9
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

/* Where an int8/fp8 cache keeps its per-(token, head) scales (values of
 * kvcache::ScalePlacement; README "Scale placement"). */
typedef enum kvcache_scale_placement {
  KVCACHE_SCALES_SIDE = 0,  /* their own tensors (default) */
  KVCACHE_SCALES_INLINE = 1 /* after each row's codes, rows padded to 16 B */
} kvcache_scale_placement;

/* Log levels (values of kvcache::LogLevel); 0 means the default, WARNING. */
typedef enum kvcache_log_level {
  KVCACHE_LOG_DEFAULT = 0,
  KVCACHE_LOG_TRACE = 1,
  KVCACHE_LOG_DEBUG = 2,
  KVCACHE_LOG_INFO = 3,
  KVCACHE_LOG_WARNING = 4,
  KVCACHE_LOG_ERROR = 5,
  KVCACHE_LOG_OFF = 6
} kvcache_log_level;

/* Receives each message at or above the config's log level (a kvcache_log_level
 * and the text, without a newline; valid for the call only). Called from the
 * thread that made the call that logs, one call at a time per manager; it
 * must not call back into the manager. */
typedef void (*kvcache_log_sink)(int32_t level, const char* message,
                                 void* user_data);

/* Attention kind of a layer group (kvcache::AttentionKind). */
typedef enum kvcache_attention_kind {
  KVCACHE_ATTENTION_FULL = 0,
  KVCACHE_ATTENTION_SLIDING_WINDOW = 1
} kvcache_attention_kind;

/* One layer group (kvcache::LayerGroup, README "Layer groups"): the layers
 * that share an attention kind and a cache shape. head_size_v 0 = a K-only
 * (latent, MLA) cache. */
typedef struct kvcache_layer_group {
  size_t struct_size;    /* sizeof(kvcache_layer_group), in every element */
  const int32_t* layers; /* [num_layers] layer indices; read during the call */
  int32_t num_layers;
  int32_t kind;           /* kvcache_attention_kind */
  int32_t sliding_window; /* tokens; 0 for full attention */
  int32_t num_kv_heads;
  int32_t head_size;
  int32_t head_size_v; /* 0 = K-only */
  int32_t cache_dtype; /* kvcache_dtype */
} kvcache_layer_group;

typedef struct kvcache_config {
  size_t struct_size; /* sizeof(kvcache_config); kvcache_config_init sets it */
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
  int32_t log_level;         /* kvcache_log_level; 0 = WARNING */
  kvcache_log_sink log_sink; /* NULL = stderr */
  void* log_sink_user_data;  /* passed to log_sink */
  /* Query heads for kvcache_attention (0 = attention off). */
  int32_t num_q_heads;
  /* KV events (KVCacheConfig's kv_events_* fields; README "KV events").
   * Strings are NUL-terminated, at most KVCACHE_MAX_CONFIG_STRING bytes, and
   * copied by kvcache_create; NULL or "" endpoints mean none, a NULL topic
   * the default "kv-events". kvcache_config_init sets the C++ defaults. */
  int32_t enable_kv_events; /* 0 = off (the default) */
  int32_t kv_events_queue_capacity;
  const char* kv_events_endpoint;
  const char* kv_events_replay_endpoint;
  const char* kv_events_topic;
  int32_t kv_events_replay_batches;
  int32_t kv_events_data_parallel_rank;
  int32_t scale_placement; /* kvcache_scale_placement; 0 = side */
  /* Graph step (kvcache_reserve_graph_step): the most tokens a captured step
   * is padded to, at most max_tokens_per_step; 0 = off. */
  int32_t graph_max_tokens;
  /* Layer groups ([num_layer_groups], read during the call; NULL with 0 = one
   * uniform group made of the shape fields above). With groups, num_kv_heads,
   * head_size, head_size_v and num_q_heads must be 0. */
  int32_t num_layer_groups;
  const kvcache_layer_group* layer_groups;
  /* Host tier: bytes of (pinned) host memory behind the cache; 0 = off
   * (KVCacheConfig::host_tier_bytes; README "Host tier"). */
  int64_t host_tier_bytes;
  /* The tier's offload policy (KVCacheConfig::tier_offload_min_hits,
   * tier_offload_max_in_flight_bytes; README "Host tier"). */
  int32_t tier_offload_min_hits;
  int64_t tier_offload_max_in_flight_bytes;
  int32_t tier_hold_offloads; /* bool */
  /* Offload ahead (KVCacheConfig::tier_offload_ahead_blocks): -1 = 1/16 of
   * the cache's blocks, 0 = off. */
  int64_t tier_offload_ahead_blocks;
  /* CUDA: thread blocks per tier copy kernel
   * (KVCacheConfig::tier_copy_thread_blocks; default 4; 0 = the copy
   * engines through a staging buffer). */
  int32_t tier_copy_thread_blocks;
} kvcache_config;

/* The longest string a kvcache_config field may hold (without its NUL). */
#define KVCACHE_MAX_CONFIG_STRING 4096

/* A caller tensor: strides in elements; [tokens, heads, head_size] for K/V. */
typedef struct kvcache_tensor {
  size_t struct_size; /* sizeof(kvcache_tensor) */
  void* data;
  int32_t dtype; /* kvcache_dtype */
  int32_t ndim;  /* <= 4 */
  int64_t shape[4];
  int64_t strides[4];
  int32_t memory; /* kvcache_memory */
  int32_t device;
} kvcache_tensor;

typedef struct kvcache_reserve_request {
  size_t struct_size; /* sizeof(kvcache_reserve_request), in every element */
  int64_t sequence;
  int64_t num_tokens;
  const int32_t* new_token_ids; /* May be NULL when num_new_token_ids is 0. */
  int64_t num_new_token_ids;
} kvcache_reserve_request;

/* What kvcache_reserve hands back (kvcache::StepPlanInfo). */
typedef struct kvcache_plan {
  size_t struct_size; /* sizeof(kvcache_plan), set by the caller */
  uint64_t id;
  int64_t num_tokens; /* Tokens reserved over the whole batch. */
  /* [num_tokens] slots in batch order, in backend memory (device memory on
   * CUDA, written asynchronously on the reserve stream). Valid until the
   * plan's commit or abort. */
  const int64_t* slot_mapping;
  /* The same slots in host memory, valid until the plan's commit or abort
   * (or kvcache_destroy). */
  const int64_t* host_slot_mapping;
  /* Copy-on-write block copies reserve ran (in every layer) before it
   * returned. */
  int64_t num_block_copies;
  /* kvcache_reserve_graph_step: the padded token count every append of the
   * step writes (slot_mapping is then the graph step's); 0 otherwise. */
  int64_t graph_tokens;
} kvcache_plan;

typedef struct kvcache_block_table_view {
  size_t struct_size;         /* sizeof(kvcache_block_table_view) */
  const int32_t* block_table; /* [num_sequences, row_stride], backend memory */
  const int32_t* seq_lens;
  int32_t num_sequences;
  int32_t max_blocks;
  int32_t row_stride;
} kvcache_block_table_view;

/* One layer's cache, as kvcache::LayerView (api/layer_view.h): element
 * (b, t, h, e) of K is key_cache[b * key_strides[0] + t * key_strides[1] +
 * h * key_strides[2] + e], V and the scales alike. With layer groups of
 * several cache shapes each token's K rows, V rows and side scales share one
 * record (key_strides[1] == value_strides[1] == record bytes / element size,
 * scale_strides[1] == record bytes / 4), and each layer has its group's
 * heads, head sizes and dtype. */
typedef struct kvcache_layer_view {
  size_t struct_size; /* sizeof(kvcache_layer_view) */
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
  int64_t scale_strides[3]; /* in floats */
  /* kvcache_scale_placement. Inline: each (token, head) row of K (V) takes
   * key_row_pitch_bytes (value_row_pitch_bytes), its float32 scale at byte
   * scale_byte_offset, and key_scale == key_cache + scale_byte_offset. */
  int32_t scale_placement;
  int64_t key_row_pitch_bytes;
  int64_t value_row_pitch_bytes;
  int64_t scale_byte_offset; /* 0 for side scales */
} kvcache_layer_view;

typedef struct kvcache_metrics {
  size_t struct_size; /* sizeof(kvcache_metrics) */
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
  int64_t kv_event_batches;
  int64_t kv_event_batches_dropped;
  int64_t kv_event_batches_unpublished;
  /* Host tier (all zero without one); MetricsSnapshot's fields. */
  int64_t host_tier_blocks_total;
  int64_t host_tier_blocks_stored;
  int64_t prefix_hit_tokens_device;
  int64_t prefix_hit_tokens_host;
  int64_t host_tier_evictions;
  int64_t tier_offloads;
  int64_t tier_onboards;
  int64_t tier_offload_bytes;
  int64_t tier_onboard_bytes;
  int64_t tier_copy_failures;
  int64_t tier_offloads_skipped;
  int64_t tier_offloads_unselected;
  int64_t tier_offloads_waited;
  int64_t tier_offload_ahead_copies;
  int64_t tier_offloads_ahead;
  int64_t tier_offloads_kept;
  int64_t tier_evictions_deferred;
} kvcache_metrics;

/* Where kvcache_add_sequence_hits's computed tokens came from. */
typedef struct kvcache_prefix_hits {
  size_t struct_size;    /* sizeof(kvcache_prefix_hits), set by the caller */
  int64_t device_tokens; /* shared blocks of the cache */
  int64_t host_tokens;   /* blocks onboarded from the host tier */
} kvcache_prefix_hits;

/* "1.0.0": the library's version (KVCACHE_VERSION_* of the header it was
 * built from). */
KVCACHE_EXPORT const char* kvcache_version(void);

/* Fills `config` with the C++ defaults (block_size 16, int8 cache, bf16 input,
 * CPU, log level WARNING, no sink, ...) and sets struct_size. */
KVCACHE_EXPORT void kvcache_config_init(kvcache_config* config);
KVCACHE_EXPORT const char* kvcache_status_name(kvcache_status status);
/* Validates `config` (as kvcache_create does, layer groups included) and sets
 * *bytes to the bytes of one block in all layers (with layer groups, one
 * page: README "Layer groups"). Needs no manager. */
KVCACHE_EXPORT kvcache_status
kvcache_config_block_bytes(const kvcache_config* config, int64_t* bytes);

KVCACHE_EXPORT kvcache_status kvcache_create(const kvcache_config* config,
                                             kvcache_manager** out);
/* The calling thread's last error ("" if none); the same as
 * kvcache_last_error(NULL). Kept for callers of earlier versions. */
KVCACHE_EXPORT const char* kvcache_last_create_error(void);
KVCACHE_EXPORT void kvcache_destroy(kvcache_manager* manager);
/* The message of the calling thread's last failed call ("" if none), whatever
 * the handle (which is not read and may be NULL). */
KVCACHE_EXPORT const char* kvcache_last_error(kvcache_manager* manager);

/* Registers a sequence with its prompt. The extra key (adapter_id, salt)
 * separates tenants in the prefix cache: the salt is salt_len bytes, any
 * values (NUL included); salt NULL with salt_len 0 means no salt. Sequences
 * share cached blocks only when their adapter ids are equal and their salts
 * are equal byte for byte (so "\0Alice" and "\0Bob" never share, and a salt
 * of one zero byte never shares with no salt). */
KVCACHE_EXPORT kvcache_status kvcache_add_sequence(
    kvcache_manager* manager, int64_t sequence, const int32_t* prompt,
    int64_t prompt_len, int64_t adapter_id, const uint8_t* salt,
    size_t salt_len, int64_t* computed_tokens);
/* kvcache_add_sequence that also fills `hits` (if not NULL; its struct_size
 * set) with how many computed tokens came from each tier. With a host tier,
 * a failed onboarding copy fails the call: the sequence is not added and
 * those tier blocks are dropped. */
KVCACHE_EXPORT kvcache_status kvcache_add_sequence_hits(
    kvcache_manager* manager, int64_t sequence, const int32_t* prompt,
    int64_t prompt_len, int64_t adapter_id, const uint8_t* salt,
    size_t salt_len, int64_t* computed_tokens, kvcache_prefix_hits* hits);
KVCACHE_EXPORT kvcache_status
kvcache_reserve(kvcache_manager* manager, const kvcache_reserve_request* batch,
                int64_t batch_size, void* stream, kvcache_plan* plan);
KVCACHE_EXPORT kvcache_status
kvcache_can_reserve(kvcache_manager* manager,
                    const kvcache_reserve_request* batch, int64_t batch_size);
KVCACHE_EXPORT kvcache_status kvcache_append(kvcache_manager* manager,
                                             uint64_t plan_id, int32_t layer,
                                             const kvcache_tensor* key,
                                             const kvcache_tensor* value,
                                             void* stream);
/* A DLPack tensor (version 0.6 as in dlpack/dlpack.h; from a 1.x producer's
 * DLManagedTensorVersioned pass &managed->dl_tensor: DLTensor is unchanged). */
KVCACHE_EXPORT kvcache_status
kvcache_append_dlpack(kvcache_manager* manager, uint64_t plan_id, int32_t layer,
                      const DLTensor* key, const DLTensor* value, void* stream);
KVCACHE_EXPORT kvcache_status kvcache_commit(kvcache_manager* manager,
                                             uint64_t plan_id);
KVCACHE_EXPORT kvcache_status kvcache_abort(kvcache_manager* manager,
                                            uint64_t plan_id);
KVCACHE_EXPORT kvcache_status kvcache_fork(kvcache_manager* manager,
                                           int64_t parent, int64_t child);
KVCACHE_EXPORT kvcache_status kvcache_free(kvcache_manager* manager,
                                           int64_t sequence);

/* Copies the sequence's block ids into `blocks` (capacity elements);
 * *num_blocks gets the table's length, also when the capacity is too small,
 * which is KVCACHE_OUT_OF_RANGE (nothing copied). blocks NULL with capacity 0
 * is a size query: KVCACHE_OK with *num_blocks set. */
KVCACHE_EXPORT kvcache_status kvcache_block_table(kvcache_manager* manager,
                                                  int64_t sequence,
                                                  int32_t* blocks,
                                                  int64_t capacity,
                                                  int64_t* num_blocks);
KVCACHE_EXPORT kvcache_status kvcache_sequence_length(kvcache_manager* manager,
                                                      int64_t sequence,
                                                      int64_t* length);
/* *loaded = 1 once the sequence's prefix has landed on the device, 0 while a
 * host-tier onboard copy that fills one of its blocks is still running (a
 * step with the sequence would wait for it on its stream; an engine may run
 * other sequences meanwhile). Always 1 without a host tier. */
KVCACHE_EXPORT kvcache_status kvcache_prefix_loaded(kvcache_manager* manager,
                                                    int64_t sequence,
                                                    int* loaded);
KVCACHE_EXPORT kvcache_status kvcache_batch_block_table(
    kvcache_manager* manager, const int64_t* sequences, int64_t num_sequences,
    void* stream, kvcache_block_table_view* view);
KVCACHE_EXPORT kvcache_status kvcache_get_layer_view(kvcache_manager* manager,
                                                     int32_t layer,
                                                     kvcache_layer_view* view);
/* Layer groups (README "Layer groups"). A sequence has one block table per
 * table of the paging (1 without groups); layer l reads and writes table
 * kvcache_layer_block_table(l). Entries of blocks released from a sliding
 * window are -1 (kNullBlock): kernels must not read them. With more than one
 * table, kvcache_block_table and kvcache_batch_block_table are
 * INVALID_ARGUMENT: use the _group twins. A K-only group (head_size_v 0)
 * takes value NULL in kvcache_append and value_out NULL in kvcache_gather
 * (a value is INVALID_ARGUMENT). */
KVCACHE_EXPORT kvcache_status kvcache_num_block_tables(kvcache_manager* manager,
                                                       int32_t* num_tables);
KVCACHE_EXPORT kvcache_status kvcache_layer_block_table(
    kvcache_manager* manager, int32_t layer, int32_t* table);
/* kvcache_block_table of table `table` (same size query and capacity
 * rules). */
KVCACHE_EXPORT kvcache_status kvcache_group_block_table(
    kvcache_manager* manager, int64_t sequence, int32_t table, int32_t* blocks,
    int64_t capacity, int64_t* num_blocks);
KVCACHE_EXPORT kvcache_status kvcache_group_batch_block_table(
    kvcache_manager* manager, int32_t table, const int64_t* sequences,
    int64_t num_sequences, void* stream, kvcache_block_table_view* view);
/* Pages held by live sequences in `table` (a page two sequences share counts
 * twice; without groups, table 0: blocks in use). */
KVCACHE_EXPORT kvcache_status kvcache_held_blocks(kvcache_manager* manager,
                                                  int32_t table,
                                                  int64_t* blocks);
KVCACHE_EXPORT kvcache_status kvcache_gather(
    kvcache_manager* manager, int64_t sequence, int32_t layer,
    int64_t token_begin, int64_t num_tokens, const kvcache_tensor* key_out,
    const kvcache_tensor* value_out, void* stream);
/* kvcache_gather into DLPack tensors (float32/float16/bfloat16, [T, H, D],
 * unit last stride, in the backend's memory; byte_offset applied). */
KVCACHE_EXPORT kvcache_status kvcache_gather_dlpack(
    kvcache_manager* manager, int64_t sequence, int32_t layer,
    int64_t token_begin, int64_t num_tokens, const DLTensor* key_out,
    const DLTensor* value_out, void* stream);
KVCACHE_EXPORT kvcache_status kvcache_tokens_that_fit(kvcache_manager* manager,
                                                      int64_t sequence,
                                                      int64_t* tokens);
KVCACHE_EXPORT kvcache_status kvcache_get_metrics(kvcache_manager* manager,
                                                  kvcache_metrics* metrics);
/* Options of kvcache_attention (KVCacheManager::Attention's AttentionOptions):
 * softmax_scale > 0, soft_cap 0 = off, window 0 = off, and 1 to 8 query
 * tokens per sequence (its last committed tokens). Set struct_size with
 * KVCACHE_STRUCT_INIT. */
typedef struct kvcache_attention_options {
  size_t struct_size;
  float softmax_scale;
  float soft_cap;
  int32_t window;
  int32_t num_query_tokens_per_sequence;
} kvcache_attention_options;
/* Decode attention over `layer`'s cache for `num_sequences` sequences:
 * q [num_sequences * n, num_q_heads, head_size] (bf16/fp16) -> out [same rows,
 * num_q_heads, head_size_v] in q's dtype. Needs config.num_q_heads > 0. */
KVCACHE_EXPORT kvcache_status kvcache_attention(
    kvcache_manager* manager, const int64_t* sequences, int64_t num_sequences,
    int32_t layer, const kvcache_tensor* q, const kvcache_tensor* out,
    const kvcache_attention_options* options, void* stream);
/* Writes the Prometheus text (NUL-terminated, truncated to capacity) and
 * returns its full length without the NUL (so a buffer of the returned
 * length + 1 holds it); buffer NULL with capacity 0 returns the length only.
 * Returns 0 on a NULL handle. */
KVCACHE_EXPORT size_t kvcache_metrics_text(kvcache_manager* manager,
                                           char* buffer, size_t capacity);
KVCACHE_EXPORT kvcache_status kvcache_validate(kvcache_manager* manager);

/* ---- Speculative decoding and scheduling ----
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
KVCACHE_EXPORT int32_t kvcache_last_shortfall(kvcache_shortfall* shortfall);

/* Commit keeping accepted[i] of sequence i's reserved tokens (batch order,
 * num_accepted = the plan's batch size); the rest are rolled back. */
KVCACHE_EXPORT kvcache_status kvcache_commit_accepted(kvcache_manager* manager,
                                                      uint64_t plan_id,
                                                      const int64_t* accepted,
                                                      int64_t num_accepted);
/* Takes one sequence out of a plan in flight; its rows of the plan's slot
 * mapping become -1 (padding), rewritten on `stream`. */
KVCACHE_EXPORT kvcache_status kvcache_remove_from_plan(kvcache_manager* manager,
                                                       uint64_t plan_id,
                                                       int64_t sequence,
                                                       void* stream);
/* Rewinds a sequence to its first new_length committed tokens. */
KVCACHE_EXPORT kvcache_status kvcache_truncate(kvcache_manager* manager,
                                               int64_t sequence,
                                               int64_t new_length);
/* The prompt tokens kvcache_add_sequence would find computed now, with no
 * pin and no metric change. The extra key as for kvcache_add_sequence. */
KVCACHE_EXPORT kvcache_status
kvcache_peek_prefix(kvcache_manager* manager, const int32_t* prompt,
                    int64_t prompt_len, int64_t adapter_id, const uint8_t* salt,
                    size_t salt_len, int64_t* cached_tokens);
/* The layout of a plan in flight, per sequence in batch order: its id, its
 * first row in the slot mapping, its token count (0 once removed) and the
 * position of its first token. Fills up to `capacity` entries of each
 * non-NULL array; *num_sequences gets the plan's batch size.
 * KVCACHE_OUT_OF_RANGE (nothing written) when capacity is too small. */
KVCACHE_EXPORT kvcache_status kvcache_plan_layout(
    kvcache_manager* manager, uint64_t plan_id, int64_t capacity,
    int64_t* sequences, int64_t* slot_offsets, int64_t* num_tokens,
    int64_t* first_positions, int64_t* num_sequences);

/* ---- KV events (README "KV events"; kv_cache_manager.h TakeEvents) ----
 *
 * kvcache_take_events hands the caller the batches made since the last call
 * (oldest first) as one owned, flat result that the caller releases with
 * kvcache_events_free; every pointer in it stays valid until then, and no
 * other call (not even kvcache_destroy) invalidates it:
 *
 *   kvcache_events ev = KVCACHE_STRUCT_INIT(kvcache_events);
 *   if (kvcache_take_events(m, &ev) == KVCACHE_OK) {
 *     for (int64_t b = 0; b < ev.num_batches; ++b) ... ev.batches[b] ...
 *     kvcache_events_free(&ev);
 *   }
 *
 * ABI: kvcache_event and kvcache_event_batch are only written by the library
 * and only ever change together with kvcache_events, so its struct_size check
 * covers all three. */

typedef enum kvcache_event_type {
  KVCACHE_EVENT_BLOCK_STORED = 0,
  KVCACHE_EVENT_BLOCK_REMOVED = 1,
  KVCACHE_EVENT_ALL_BLOCKS_CLEARED = 2
} kvcache_event_type;

typedef enum kvcache_event_medium {
  KVCACHE_MEDIUM_DEVICE = 0, /* the cache's own pool */
  KVCACHE_MEDIUM_HOST = 1    /* the host-memory tier */
} kvcache_event_medium;

/* One event (kvcache::KVEvent). Hashes are the 64-bit external form. */
typedef struct kvcache_event {
  int32_t type;   /* kvcache_event_type */
  int32_t medium; /* kvcache_event_medium (stored and removed) */
  /* Stored: a chain, each block the parent of the next; removed: the blocks
   * removed. NULL when num_block_hashes is 0. */
  const uint64_t* block_hashes;
  int64_t num_block_hashes;
  int32_t has_parent;         /* stored: 1 when parent_block_hash is set */
  uint64_t parent_block_hash; /* stored: the first block's parent */
  const int32_t* token_ids;   /* stored: block_size per block */
  int64_t num_token_ids;
  int32_t block_size;
  int64_t adapter_id; /* stored: 0 = none */
} kvcache_event;

typedef struct kvcache_event_batch {
  uint64_t sequence; /* from 0 per manager; a gap means dropped batches */
  double timestamp;  /* seconds since the Unix epoch */
  const kvcache_event* events;
  int64_t num_events;
} kvcache_event_batch;

typedef struct kvcache_events {
  size_t struct_size; /* sizeof(kvcache_events) */
  const kvcache_event_batch* batches;
  int64_t num_batches;
  /* The library's allocation behind the arrays; NULL when there is none.
   * Must be NULL when passed to kvcache_take_events (a result not yet freed
   * is refused, so it cannot leak). */
  void* owner;
} kvcache_events;

/* Drains the manager's event queue into *events (empty, KVCACHE_OK, when
 * events are off). KVCACHE_INVALID_ARGUMENT for a NULL or mis-sized struct
 * or a non-NULL owner. KVCACHE_RESOURCE_EXHAUSTED when the result cannot be
 * allocated: the queue is kept when the C++ copy fails, lost (its sequence
 * numbers show the gap) when the flat C copy fails. */
KVCACHE_EXPORT kvcache_status kvcache_take_events(kvcache_manager* manager,
                                                  kvcache_events* events);
/* Releases what kvcache_take_events handed out and zeroes the arrays and the
 * owner (a second call does nothing). NULL, or a struct of another
 * struct_size, is ignored. */
KVCACHE_EXPORT void kvcache_events_free(kvcache_events* events);
/* KVCacheManager::ResetPrefixCache: drops every prefix-cache registration and
 * emits AllBlocksCleared; KVCACHE_FAILED_PRECONDITION while any plan is in
 * flight. */
KVCACHE_EXPORT kvcache_status
kvcache_reset_prefix_cache(kvcache_manager* manager);
/* ---- The decode step in a CUDA graph, and lookups of a step ----
 *
 * Lengths of a sequence (kvcache_sequence_length, kvcache_known_length):
 *
 *   computed  tokens written in every layer and committed
 *   reserved  tokens of its plan in flight (0 when none)
 *   known     tokens whose ids the manager holds: committed + reserved +
 *             token ids given but not yet reserved
 *
 *   computed + reserved <= known tokens, always.
 *
 * Which lengths a kernel gets: kvcache_batch_block_table's seq_lens and
 * kvcache_attention use the computed (committed) length; the graph step's
 * seq_lens include the step's own tokens (computed + reserved), for attention
 * inside the captured forward after that layer's append.
 *
 * A graph step, once per padded size P (kvcache_graph_step tells the sizes
 * allowed before any capture):
 *
 *   kvcache_reserve_graph_step(m, batch, n, P, stream, &plan)
 *   capture on `stream`: kvcache_append(m, plan.id, layer, K[P], V[P], stream)
 *     for every layer (inputs at fixed addresses), then launch the graph once
 *   kvcache_commit(m, plan.id)
 *
 * and each later step of at most P tokens: kvcache_reserve_graph_step(...,
 * P, ...), write the step's K/V inputs, launch the graph on `stream`,
 * kvcache_commit. Copy-on-write copies run in kvcache_reserve_graph_step, on
 * `stream`, before the replay. See README "Decode in a CUDA graph". */

/* The graph step's fixed-address inputs (kvcache::GraphStepInputs), in the
 * backend's memory, rewritten by each kvcache_reserve_graph_step:
 * slot_mapping int64 [max_tokens] (the step's slots, then -1), positions
 * int64 [max_tokens] (then 0), seq_lens int32 [max_sequences] (computed +
 * this step's tokens, then 0), block_table int32 [max_sequences, row_stride]
 * (each row's blocks, then zeros). */
typedef struct kvcache_graph_step_inputs {
  size_t struct_size; /* sizeof(kvcache_graph_step_inputs) */
  const int64_t* slot_mapping;
  const int64_t* positions;
  const int32_t* seq_lens;
  const int32_t* block_table;
  int64_t max_tokens; /* Padded sizes 1..max_tokens may be captured. */
  int32_t max_sequences;
  int32_t row_stride;
} kvcache_graph_step_inputs;
/* KVCACHE_FAILED_PRECONDITION when config.graph_max_tokens is 0;
 * KVCACHE_INVALID_ARGUMENT with more than one block table (layer groups:
 * use kvcache_group_graph_step). */
KVCACHE_EXPORT kvcache_status
kvcache_graph_step(kvcache_manager* manager, kvcache_graph_step_inputs* inputs);
/* Layer groups (KVCacheManager::GroupGraphStep): block table `table`'s
 * graph-step inputs, its own slot_mapping and block_table (entries released
 * from a sliding window are -1), with the positions and seq_lens all tables
 * share. The graph step's append to layer l reads the slot_mapping of table
 * kvcache_layer_block_table(l). The tables' rows interleave in one buffer:
 * row_stride is kvcache_num_block_tables() x the columns of a row
 * (max_blocks_per_sequence). Without groups table 0 is kvcache_graph_step.
 * KVCACHE_INVALID_ARGUMENT for a table out of range. */
KVCACHE_EXPORT kvcache_status kvcache_group_graph_step(
    kvcache_manager* manager, int32_t table, kvcache_graph_step_inputs* inputs);
/* kvcache_reserve for a graph step padded to graph_tokens tokens
 * (KVCacheManager::ReserveGraphStep): every append of the plan takes K/V of
 * exactly graph_tokens tokens. One graph step is in flight at a time. */
KVCACHE_EXPORT kvcache_status kvcache_reserve_graph_step(
    kvcache_manager* manager, const kvcache_reserve_request* batch,
    int64_t batch_size, int64_t graph_tokens, void* stream, kvcache_plan* plan);
/* Known tokens of a sequence (committed + reserved + pending token ids). */
KVCACHE_EXPORT kvcache_status kvcache_known_length(kvcache_manager* manager,
                                                   int64_t sequence,
                                                   int64_t* length);

/* One sequence's range of a batched gather. */
typedef struct kvcache_gather_request {
  size_t struct_size; /* sizeof(kvcache_gather_request), in every element */
  int64_t sequence;
  int64_t token_begin;
  int64_t num_tokens; /* 0: nothing */
} kvcache_gather_request;
/* kvcache_gather without waiting for the work on `stream`;
 * include_in_flight != 0 lets the range reach into the tokens this layer
 * already holds of the sequence's plan in flight. num_tokens 0 is an empty
 * success. */
KVCACHE_EXPORT kvcache_status kvcache_gather_async(
    kvcache_manager* manager, int64_t sequence, int32_t layer,
    int64_t token_begin, int64_t num_tokens, const kvcache_tensor* key_out,
    const kvcache_tensor* value_out, int32_t include_in_flight, void* stream);
/* Batched kvcache_gather_async: request i's tokens go to the next num_tokens
 * rows of key_out / value_out, in order; the outputs hold the sum. */
KVCACHE_EXPORT kvcache_status kvcache_gather_batch(
    kvcache_manager* manager, const kvcache_gather_request* requests,
    int64_t num_requests, int32_t layer, const kvcache_tensor* key_out,
    const kvcache_tensor* value_out, int32_t include_in_flight, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVCACHE_API_KVCACHE_C_H_ */
