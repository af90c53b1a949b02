// KVCacheConfig: the shape, dtypes, backend and capacity of one KV cache.
// Validated by KVCacheManager::Create. Plain value type.

#ifndef KVCACHE_API_KV_CACHE_CONFIG_H_
#define KVCACHE_API_KV_CACHE_CONFIG_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "core/layer_group.h"
#include "core/scale_placement.h"

namespace kvcache {

enum class Backend : int32_t {
  kCpu = 0,   // Host memory and CPU kernels; always available.
  kCuda = 1,  // One CUDA device (`device`); needs a CUDA build and a GPU.
};

// Severity of the library's log messages (the C API's kvcache_log_level).
enum class LogLevel : int32_t {
  kTrace = 1,
  kDebug = 2,
  kInfo = 3,  // Create's layout and capacity line.
  kWarning = 4,
  kError = 5,
  kOff = 6,
};

// Receives each message at or above KVCacheConfig::log_level, one call at a
// time per manager, on the thread that logs. Must not call into the manager.
using LogSink = std::function<void(LogLevel level, absl::string_view message)>;

// Limits on the config (ValidateConfig enforces them, so that no size the
// manager computes can overflow). README "Config limits" lists them.
inline constexpr int32_t kMaxNumLayers = 1024;
inline constexpr int32_t kMaxNumKvHeads = 1024;
// kMaxHeadSize (head_size and head_size_v): core/cache_layout.h.
inline constexpr int32_t kMaxBlockSize = 2048;
inline constexpr int32_t kMaxTokensPerStep = 1 << 20;
inline constexpr int32_t kMaxSequencesPerStep = 1 << 16;
inline constexpr int32_t kMaxBlocksPerSequence = 1 << 20;
inline constexpr int32_t kMaxInflightPlans = 64;
// All layers' caches and scales together (before alignment padding).
inline constexpr int64_t kMaxCacheBytes = int64_t{1} << 56;
inline constexpr int32_t kMaxCpuThreads = 1024;
// KV events: batches held for TakeEvents, and kept for replay.
inline constexpr int32_t kMaxKvEventBatches = 1 << 20;
inline constexpr int32_t kMaxSlidingWindow = 1 << 24;

struct KVCacheConfig {
  // Model shape.
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;    // Multiple of 8, at most 1024.
  int32_t head_size_v = 0;  // 0 means head_size.
  int32_t block_size = 16;  // Tokens per block.
  // Layer groups (core/layer_group.h, DESIGN.md "Layer groups"): empty = one
  // uniform group made of the shape fields above (exactly as before groups
  // existed). When set, the groups together list every layer in [0,
  // num_layers) exactly once and carry each layer's shape: num_kv_heads,
  // head_size, head_size_v and num_q_heads must then be 0 (cache_dtype is
  // not read), and input_dtype must equal the cache_dtype of every
  // unquantized group. Groups may differ in every field (kind, window, KV
  // heads, head sizes, dtype); scale_placement applies to the quantized
  // ones.
  std::vector<LayerGroup> layer_groups;
  // Query heads, for KVCacheManager::Attention (a multiple of num_kv_heads,
  // at most 16 per KV head); 0 = no attention (its buffers are not made).
  int32_t num_q_heads = 0;

  // int8 or fp8_e4m3 (quantized, with float32 scales), or bfloat16/float16
  // (stored as is, then input_dtype must equal cache_dtype).
  DType cache_dtype = DType::kInt8;
  // Where an int8/fp8 cache keeps its per-(token, head) scales (README "Scale
  // placement"): kSide, their own tensors, or kInline, each row's scale right
  // after its codes, the row padded to a multiple of 16 bytes. kInline with a
  // bf16/fp16 cache (with layer_groups: when no group is int8 or fp8) is
  // InvalidArgument.
  ScalePlacement scale_placement = ScalePlacement::kSide;
  // K/V handed to Append: float32, float16 or bfloat16.
  DType input_dtype = DType::kBFloat16;

  Backend backend = Backend::kCpu;
  int32_t device = 0;  // CUDA device ordinal.
  // CPU backend: threads that large kernel calls are split over, counting the
  // calling thread (0 = the machine's hardware concurrency, 1 = no worker
  // threads; at most kMaxCpuThreads). Workers are started once, by Create;
  // those the system refuses to start are done without (never an error).
  // Decode-sized calls always run on the calling thread.
  int32_t cpu_threads = 0;

  // Capacity: exactly one of these is set (> 0).
  int64_t num_blocks = 0;
  // All layers' caches and scales together.
  int64_t memory_budget_bytes = 0;
  // Of the device's free memory (host RAM on the CPU).
  double memory_fraction = 0.0;

  bool enable_prefix_caching = true;

  // Host tier (DESIGN.md section 11; README "Host tier"): bytes of host
  // memory (pinned on CUDA; a second host pool on the CPU backend) that
  // hashed blocks evicted from the cache are copied to, and prefix hits are
  // brought back from. 0 = off. Needs enable_prefix_caching; at least one
  // block of all layers, at most kMaxCacheBytes.
  int64_t host_tier_bytes = 0;
  // The tier's offload policy (README "Host tier"): which evicted blocks are
  // copied to it, and how many bytes of copies may be in flight.
  //   tier_offload_min_hits              an evicted block is offloaded only
  //        if it was a prefix hit at least this often while on the device
  //        (a block brought back from the tier counts one); 0 = every
  //        evicted block. 0..255.
  //   tier_offload_max_in_flight_bytes   while this many bytes of tier
  //        copies are still running, evicted blocks are dropped instead of
  //        offloaded; 0 = no bound. 0..kMaxCacheBytes.
  //   tier_hold_offloads   an offloaded device block is held, unused, until
  //        its copy is done, and the call evicts the next oldest block for
  //        its need instead, so no step waits for an offload (as long as the
  //        call has blocks to spare; else the block is reused at once and
  //        its next write waits: tier_offloads_waited). false: every
  //        offloaded block is reused at once, its writes waiting for the
  //        copy.
  int32_t tier_offload_min_hits = 1;
  int64_t tier_offload_max_in_flight_bytes = int64_t{4} << 30;
  bool tier_hold_offloads = true;
  //   tier_offload_ahead_blocks   offload ahead: up to this many cached
  //        blocks next in line for eviction (those the selection would
  //        offload) are copied to the tier in the background while they stay
  //        cached, so that their eviction needs no copy and no step waits
  //        for one; a copy ahead of a block that is hit again before its
  //        eviction stays good (its content cannot change). -1 = 1/16 of the
  //        cache's blocks (at least 16); 0 = off; at most half the tier's
  //        blocks are used so. -1..INT32_MAX.
  int64_t tier_offload_ahead_blocks = -1;
  // CUDA: thread blocks of each tier copy kernel (README "Host tier"). Few
  // keep the copies from crowding the caller's work off the PCIe link and
  // the multiprocessors (the whole trace replay on an H200 ran 72 s with 4,
  // 82 s with 16-32, 63 s without a tier); more copy a batch faster (16 carry
  // an offload at ~88 % of the link). 0: no copy kernel crosses the link,
  // the copy engines do (cudaMemcpyBatchAsync of whole slots through a
  // 32 MiB staging buffer per copy lane in device memory, beyond the cache
  // and made at the lane's first copy: a cache sized by memory_fraction
  // must leave that room, or those copies fail (ResourceExhausted: the
  // blocks are dropped, and an AddSequence that onboards fails as it does
  // for any failed onboard);
  // offload and onboard at 72-78 % of the link, slowing the caller's
  // kernels 2-5 % while they run against 2-11 % with 4 thread blocks).
  // 0..1024; ignored on the CPU.
  int32_t tier_copy_thread_blocks = 4;

  // Fixed-capacity step and lookup buffers (allocated once, so steps allocate
  // nothing and block tables can be captured in a CUDA graph):
  //   max_tokens_per_step      tokens in one Reserve
  //   max_sequences_per_step   sequences in one Reserve or BatchBlockTable
  //   max_blocks_per_sequence  block-table columns; 0 = enough for all blocks
  //   max_inflight_plans       reserved, not yet committed or aborted plans
  int32_t max_tokens_per_step = 8192;
  int32_t max_sequences_per_step = 1024;
  int32_t max_blocks_per_sequence = 0;
  int32_t max_inflight_plans = 4;
  // Graph-capturable step (KVCacheManager::ReserveGraphStep, GraphStep):
  // the most tokens one captured step may be padded to, at most
  // max_tokens_per_step; 0 = no graph step (its buffers are not made).
  int32_t graph_max_tokens = 0;

  // Logging. The library never touches spdlog's default logger, registry or
  // global level; it logs through one of (at most one may be set):
  //   log_sink     a logger of its own that forwards each message to the sink;
  //   logger_name  the spdlog logger the engine registered under this name
  //                (its level and sinks are the engine's; an unknown name is
  //                InvalidArgument);
  //   neither      a logger of its own that writes to stderr.
  // log_level filters the library's own loggers (default: warnings and errors
  // only, so Create's info-level layout line is not shown).
  LogLevel log_level = LogLevel::kWarning;
  LogSink log_sink;
  std::string logger_name;

  // KV events (README "KV events"): the prefix cache's BlockStored,
  // BlockRemoved and AllBlocksCleared, in numbered batches, drained by
  // TakeEvents and optionally published over ZeroMQ. Off by default.
  bool enable_kv_events = false;
  // Batches TakeEvents can hold, in [1, kMaxKvEventBatches]; when full the
  // oldest is dropped (MetricsSnapshot::kv_event_batches_dropped counts it,
  // and its sequence number is missing from what TakeEvents returns). Also
  // bounds the publisher's send queue.
  int32_t kv_events_queue_capacity = 4096;
  // ZeroMQ PUB endpoint the manager binds (e.g. "tcp://*:5557"); "" = no
  // publishing. Needs enable_kv_events and libzmq.so.5 at run time.
  std::string kv_events_endpoint;
  // ZeroMQ ROUTER endpoint serving recent batches to late subscribers; "" =
  // none. Needs kv_events_endpoint.
  std::string kv_events_replay_endpoint;
  // The first frame of every published message (subscribers filter on it).
  std::string kv_events_topic = "kv-events";
  // Batches kept for replay, in [0, kMaxKvEventBatches].
  int32_t kv_events_replay_batches = 4096;
  // Sent in every batch (data_parallel_rank), >= 0.
  int32_t kv_events_data_parallel_rank = 0;
};

// InvalidArgument naming the first bad field and its limit (e.g. "head_size
// 100 is not a multiple of 8", "block_size 4096 exceeds 2048").
absl::Status ValidateConfig(const KVCacheConfig& config);

// The paging of config.layer_groups (core/layer_group.h). REQUIRES: the
// config passed ValidateConfig and has layer groups.
GroupPaging ConfigPaging(const KVCacheConfig& config);

// Bytes of one block in all layers (K, V and scales; with layer groups, one
// page: layers_per_page slots of slot_bytes), computed without overflow: InvalidArgument when it exceeds kMaxCacheBytes. REQUIRES: the
// shape fields passed ValidateConfig.
absl::StatusOr<int64_t> BlockBytesAllLayers(const KVCacheConfig& config);

}  // namespace kvcache

#endif  // KVCACHE_API_KV_CACHE_CONFIG_H_
