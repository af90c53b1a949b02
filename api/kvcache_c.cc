// The C API: each function checks and converts its arguments, calls the
// KVCacheManager and maps the status to a kvcache_status, recording the
// message as the calling thread's last error.

#include "api/kvcache_c.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/kvcache_c_internal.h"
#include "api/no_bad_alloc.h"
#include "api/tensor_view.h"

namespace {

using kvcache::KVCacheManager;

// The calling thread's last error (issue #12: a per-handle message was read
// by other threads).
thread_local std::string last_error;

kvcache_status ToCode(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return KVCACHE_OK;
    case absl::StatusCode::kInvalidArgument:
      return KVCACHE_INVALID_ARGUMENT;
    case absl::StatusCode::kNotFound:
      return KVCACHE_NOT_FOUND;
    case absl::StatusCode::kAlreadyExists:
      return KVCACHE_ALREADY_EXISTS;
    case absl::StatusCode::kResourceExhausted:
      return KVCACHE_RESOURCE_EXHAUSTED;
    case absl::StatusCode::kFailedPrecondition:
      return KVCACHE_FAILED_PRECONDITION;
    case absl::StatusCode::kOutOfRange:
      return KVCACHE_OUT_OF_RANGE;
    case absl::StatusCode::kInternal:
      return KVCACHE_INTERNAL;
    case absl::StatusCode::kUnimplemented:
      return KVCACHE_UNIMPLEMENTED;
    default:
      return KVCACHE_UNKNOWN;
  }
}

// Keeps a failed call's message as the thread's last error. Never throws: when
// the message cannot be copied (out of memory), the last error is left empty.
kvcache_status Record(const absl::Status& status) noexcept {
  if (!status.ok()) {
    kvcache::c_api::NoteShortfall(status);
    try {
      last_error.assign(status.message().data(), status.message().size());
    } catch (...) {
      last_error.clear();
    }
  }
  return ToCode(status);
}

// Runs an entry point's body under the C++ API's NoBadAlloc: no exception
// (std::bad_alloc converting arguments, in the manager, or building a message;
// or any other, as a last resort) unwinds into C.
template <typename F>
kvcache_status Guarded(const char* call, F&& body) noexcept {
  return Record(kvcache::internal::NoBadAlloc(call, std::forward<F>(body)));
}

// Drops a finished plan's host slot mapping (never allocates).
void ForgetPlan(kvcache_manager* m, uint64_t plan_id) {
  std::lock_guard<std::mutex> lock(m->mu);
  m->host_slots.erase(plan_id);
}

// The error of a call on a NULL handle.
kvcache_status NullHandle(const char* call) noexcept {
  return Record(kvcache::internal::NoBadAlloc(call, [&]() -> absl::Status {
    return absl::InvalidArgumentError(absl::StrCat(call, ": manager is NULL"));
  }));
}

// `count` (argument `name`) in [0, max], before anything it counts is read.
absl::Status CheckCount(const char* name, int64_t count, int64_t max) {
  if (count < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " ", count, " is negative"));
  }
  if (count > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " ", count, " exceeds ", max));
  }
  return absl::OkStatus();
}

absl::Status Null(const char* what) {
  return absl::InvalidArgumentError(absl::StrCat(what, " is NULL"));
}

// The ABI check of a struct passed by pointer: its struct_size must be this
// library's sizeof (the caller was compiled against another kvcache_c.h).
template <typename T>
absl::Status CheckSize(const T* p, const char* type, const char* name) {
  if (p == nullptr) return Null(name);
  if (p->struct_size != sizeof(T)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": ", type, ".struct_size is ", p->struct_size,
        " but this library's sizeof(", type, ") is ", sizeof(T),
        " (set it with KVCACHE_STRUCT_INIT or rebuild against this "
        "kvcache_c.h, version ",
        KVCACHE_VERSION_MAJOR, ".", KVCACHE_VERSION_MINOR, ".",
        KVCACHE_VERSION_PATCH, ")"));
  }
  return absl::OkStatus();
}

kvcache::TensorView ToView(const kvcache_tensor& t) {
  kvcache::TensorView v;
  v.data = t.data;
  v.dtype = static_cast<kvcache::DType>(t.dtype);
  v.ndim = std::clamp(t.ndim, 0, kvcache::TensorView::kMaxDims);
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = t.shape[d];
    v.strides[d] = t.strides[d];
  }
  v.memory = t.memory == KVCACHE_DEVICE ? kvcache::MemoryKind::kCuda
                                        : kvcache::MemoryKind::kHost;
  v.device = t.device;
  return v;
}

absl::Status CheckTensor(const kvcache_tensor* t, const char* name) {
  if (absl::Status s = CheckSize(t, "kvcache_tensor", name); !s.ok()) {
    return s;
  }
  if (!kvcache::IsValidDType(static_cast<kvcache::DType>(t->dtype))) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " dtype ", t->dtype, " is not a kvcache_dtype"));
  }
  if (t->ndim < 0 || t->ndim > kvcache::TensorView::kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " ndim ", t->ndim, " is not in [0, 4]"));
  }
  if (t->memory != KVCACHE_HOST && t->memory != KVCACHE_DEVICE) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " memory ", t->memory, " is not a kvcache_memory"));
  }
  return absl::OkStatus();
}

// Checks every count of the batch, then copies it (issue #12: a hostile count
// threw std::length_error from the copy, or wrapped the pointer).
absl::StatusOr<std::vector<kvcache::ReserveRequest>> ToRequests(
    const kvcache_reserve_request* batch, int64_t n) {
  if (absl::Status s = CheckCount("batch_size", n, KVCACHE_MAX_BATCH);
      !s.ok()) {
    return s;
  }
  if (batch == nullptr && n > 0) return Null("batch");
  for (int64_t i = 0; i < n; ++i) {
    const kvcache_reserve_request& r = batch[i];
    // Element 0 first: only a matching size makes batch[1...] addressable.
    if (absl::Status s = CheckSize(&r, "kvcache_reserve_request",
                                   i == 0 ? "batch[0]" : "batch[i]");
        !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch[", i, "]: ", s.message()));
    }
    if (absl::Status s = CheckCount("num_new_token_ids", r.num_new_token_ids,
                                    KVCACHE_MAX_TOKENS);
        !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch[", i, "]: ", s.message()));
    }
    if (r.num_new_token_ids > 0 && r.new_token_ids == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch[", i, "]: new_token_ids is NULL but num_new_token_ids is ",
          r.num_new_token_ids));
    }
  }
  std::vector<kvcache::ReserveRequest> requests(n);
  for (int64_t i = 0; i < n; ++i) {
    const kvcache_reserve_request& r = batch[i];
    requests[i].sequence = r.sequence;
    requests[i].num_tokens = r.num_tokens;
    if (r.num_new_token_ids > 0) {
      requests[i].new_token_ids.assign(r.new_token_ids,
                                       r.new_token_ids + r.num_new_token_ids);
    }
  }
  return requests;
}

// kvcache_create's body; the handle is made before *out is set.
// The C config's log fields: 0 means the default level, and a sink becomes a
// LogSink calling it with the user data.
void SetLogging(const kvcache_config& c, kvcache::KVCacheConfig& config) {
  if (c.log_level != KVCACHE_LOG_DEFAULT) {
    config.log_level = static_cast<kvcache::LogLevel>(c.log_level);
  }
  if (c.log_sink != nullptr) {
    kvcache_log_sink sink = c.log_sink;
    void* user_data = c.log_sink_user_data;
    config.log_sink = [sink, user_data](kvcache::LogLevel level,
                                        absl::string_view message) {
      const std::string text(message);  // NUL-terminated for C.
      sink(static_cast<int32_t>(level), text.c_str(), user_data);
    };
  }
}

// The C config's layer groups, each count and pointer checked before it is
// read.
absl::Status ToGroups(const kvcache_config& c, kvcache::KVCacheConfig& config) {
  if (absl::Status s = CheckCount("num_layer_groups", c.num_layer_groups,
                                  kvcache::kMaxNumLayers);
      !s.ok()) {
    return s;
  }
  if (c.num_layer_groups > 0 && c.layer_groups == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer_groups is NULL but num_layer_groups is ", c.num_layer_groups));
  }
  for (int32_t i = 0; i < c.num_layer_groups; ++i) {
    const kvcache_layer_group& g = c.layer_groups[i];
    // Element 0 first: only a matching size makes the rest addressable.
    if (absl::Status s =
            CheckSize(&g, "kvcache_layer_group",
                      i == 0 ? "layer_groups[0]" : "layer_groups[i]");
        !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer_groups[", i, "]: ", s.message()));
    }
    if (absl::Status s =
            CheckCount("num_layers", g.num_layers, kvcache::kMaxNumLayers);
        !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer_groups[", i, "]: ", s.message()));
    }
    if (g.num_layers > 0 && g.layers == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer_groups[", i,
                       "]: layers is NULL but num_layers is ", g.num_layers));
    }
    kvcache::LayerGroup& out = config.layer_groups.emplace_back();
    if (g.num_layers > 0) out.layers.assign(g.layers, g.layers + g.num_layers);
    out.kind = static_cast<kvcache::AttentionKind>(g.kind);
    out.sliding_window = g.sliding_window;
    out.num_kv_heads = g.num_kv_heads;
    out.head_size = g.head_size;
    out.head_size_v = g.head_size_v;
    out.cache_dtype = static_cast<kvcache::DType>(g.cache_dtype);
  }
  return absl::OkStatus();
}

// A config string: NULL keeps `out` as it is; longer than
// KVCACHE_MAX_CONFIG_STRING (or unterminated within it) is refused.
absl::Status CopyConfigString(const char* s, const char* field,
                              std::string& out) {
  if (s == nullptr) return absl::OkStatus();
  const size_t n = strnlen(s, KVCACHE_MAX_CONFIG_STRING + 1);
  if (n > KVCACHE_MAX_CONFIG_STRING) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is longer than ", KVCACHE_MAX_CONFIG_STRING,
                     " bytes (or not NUL-terminated)"));
  }
  out.assign(s, n);
  return absl::OkStatus();
}

absl::Status SetKvEvents(const kvcache_config& c,
                         kvcache::KVCacheConfig& config) {
  config.enable_kv_events = c.enable_kv_events != 0;
  config.kv_events_queue_capacity = c.kv_events_queue_capacity;
  config.kv_events_replay_batches = c.kv_events_replay_batches;
  config.kv_events_data_parallel_rank = c.kv_events_data_parallel_rank;
  for (absl::Status s :
       {CopyConfigString(c.kv_events_endpoint, "kv_events_endpoint",
                         config.kv_events_endpoint),
        CopyConfigString(c.kv_events_replay_endpoint,
                         "kv_events_replay_endpoint",
                         config.kv_events_replay_endpoint),
        CopyConfigString(c.kv_events_topic, "kv_events_topic",
                         config.kv_events_topic)}) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// The C++ config of a C one (everything but the log sink).
absl::StatusOr<kvcache::KVCacheConfig> ToConfig(const kvcache_config* c) {
  if (absl::Status s = CheckSize(c, "kvcache_config", "config"); !s.ok()) {
    return s;
  }
  kvcache::KVCacheConfig config;
  config.num_layers = c->num_layers;
  config.num_kv_heads = c->num_kv_heads;
  config.head_size = c->head_size;
  config.head_size_v = c->head_size_v;
  config.block_size = c->block_size;
  config.cache_dtype = static_cast<kvcache::DType>(c->cache_dtype);
  config.input_dtype = static_cast<kvcache::DType>(c->input_dtype);
  config.backend = static_cast<kvcache::Backend>(c->backend);
  config.device = c->device;
  config.num_blocks = c->num_blocks;
  config.memory_budget_bytes = c->memory_budget_bytes;
  config.memory_fraction = c->memory_fraction;
  config.enable_prefix_caching = c->enable_prefix_caching != 0;
  config.max_tokens_per_step = c->max_tokens_per_step;
  config.max_sequences_per_step = c->max_sequences_per_step;
  config.max_blocks_per_sequence = c->max_blocks_per_sequence;
  config.max_inflight_plans = c->max_inflight_plans;
  config.num_q_heads = c->num_q_heads;
  config.scale_placement =
      static_cast<kvcache::ScalePlacement>(c->scale_placement);
  config.graph_max_tokens = c->graph_max_tokens;
  config.host_tier_bytes = c->host_tier_bytes;
  config.tier_offload_min_hits = c->tier_offload_min_hits;
  config.tier_offload_max_in_flight_bytes = c->tier_offload_max_in_flight_bytes;
  config.tier_hold_offloads = c->tier_hold_offloads != 0;
  config.tier_offload_ahead_blocks = c->tier_offload_ahead_blocks;
  config.tier_copy_thread_blocks = c->tier_copy_thread_blocks;
  if (absl::Status s = SetKvEvents(*c, config); !s.ok()) return s;
  if (absl::Status s = ToGroups(*c, config); !s.ok()) return s;
  return config;
}

absl::Status Create(const kvcache_config* c, kvcache_manager** out) {
  if (out == nullptr) return Null("out");
  if (absl::Status s = CheckSize(c, "kvcache_config", "config"); !s.ok()) {
    return s;
  }
  *out = nullptr;
  absl::StatusOr<kvcache::KVCacheConfig> config = ToConfig(c);
  if (!config.ok()) return config.status();
  SetLogging(*c, *config);
  absl::StatusOr<std::unique_ptr<KVCacheManager>> manager =
      KVCacheManager::Create(*config);
  if (!manager.ok()) return manager.status();
  auto handle = std::make_unique<kvcache_manager>();
  handle->impl = *std::move(manager);
  *out = handle.release();
  return absl::OkStatus();
}

}  // namespace

kvcache_status kvcache::c_api::RecordStatus(
    const absl::Status& status) noexcept {
  return Record(status);
}

extern "C" {

const char* kvcache_version(void) {
#define KVCACHE_STR2(x) #x
#define KVCACHE_STR(x) KVCACHE_STR2(x)
  return KVCACHE_STR(KVCACHE_VERSION_MAJOR) "." KVCACHE_STR(
      KVCACHE_VERSION_MINOR) "." KVCACHE_STR(KVCACHE_VERSION_PATCH);
#undef KVCACHE_STR
#undef KVCACHE_STR2
}

void kvcache_config_init(kvcache_config* c) {
  if (c == nullptr) return;
  const kvcache::KVCacheConfig d;
  std::memset(c, 0, sizeof(*c));
  c->struct_size = sizeof(*c);
  c->log_level = static_cast<int32_t>(d.log_level);
  c->head_size_v = d.head_size_v;
  c->block_size = d.block_size;
  c->cache_dtype = static_cast<int32_t>(d.cache_dtype);
  c->input_dtype = static_cast<int32_t>(d.input_dtype);
  c->backend = KVCACHE_CPU;
  c->enable_prefix_caching = d.enable_prefix_caching ? 1 : 0;
  c->max_tokens_per_step = d.max_tokens_per_step;
  c->max_sequences_per_step = d.max_sequences_per_step;
  c->max_blocks_per_sequence = d.max_blocks_per_sequence;
  c->max_inflight_plans = d.max_inflight_plans;
  c->num_q_heads = d.num_q_heads;
  c->enable_kv_events = d.enable_kv_events ? 1 : 0;
  c->kv_events_queue_capacity = d.kv_events_queue_capacity;
  c->kv_events_replay_batches = d.kv_events_replay_batches;
  c->kv_events_data_parallel_rank = d.kv_events_data_parallel_rank;
  c->scale_placement = static_cast<int32_t>(d.scale_placement);
  c->graph_max_tokens = d.graph_max_tokens;
  c->host_tier_bytes = d.host_tier_bytes;
  c->tier_offload_min_hits = d.tier_offload_min_hits;
  c->tier_offload_max_in_flight_bytes = d.tier_offload_max_in_flight_bytes;
  c->tier_hold_offloads = d.tier_hold_offloads ? 1 : 0;
  c->tier_offload_ahead_blocks = d.tier_offload_ahead_blocks;
  c->tier_copy_thread_blocks = d.tier_copy_thread_blocks;
}

const char* kvcache_status_name(kvcache_status status) {
  switch (status) {
    case KVCACHE_OK:
      return "OK";
    case KVCACHE_INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case KVCACHE_NOT_FOUND:
      return "NOT_FOUND";
    case KVCACHE_ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case KVCACHE_RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case KVCACHE_FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case KVCACHE_OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case KVCACHE_INTERNAL:
      return "INTERNAL";
    default:
      return "UNKNOWN";
  }
}

kvcache_status kvcache_config_block_bytes(const kvcache_config* c,
                                          int64_t* bytes) {
  return Guarded("kvcache_config_block_bytes", [&]() -> absl::Status {
    if (bytes == nullptr) return Null("bytes");
    absl::StatusOr<kvcache::KVCacheConfig> config = ToConfig(c);
    if (!config.ok()) return config.status();
    if (absl::Status s = kvcache::ValidateConfig(*config); !s.ok()) return s;
    absl::StatusOr<int64_t> block = kvcache::BlockBytesAllLayers(*config);
    if (!block.ok()) return block.status();
    *bytes = *block;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_create(const kvcache_config* c, kvcache_manager** out) {
  return Guarded("kvcache_create",
                 [&]() -> absl::Status { return Create(c, out); });
}

const char* kvcache_last_create_error(void) { return last_error.c_str(); }

void kvcache_destroy(kvcache_manager* m) { delete m; }

const char* kvcache_last_error(kvcache_manager* /*manager*/) {
  return last_error.c_str();
}

// A NULL handle fails with a message (kvcache_last_error(NULL)).
#define KVCACHE_C_REQUIRE(m)                         \
  do {                                               \
    if ((m) == nullptr) return NullHandle(__func__); \
  } while (0)

namespace {

// kvcache_add_sequence and kvcache_add_sequence_hits (`hits` may be null).
kvcache_status AddSequenceC(const char* name, kvcache_manager* m,
                            int64_t sequence, const int32_t* prompt,
                            int64_t prompt_len, int64_t adapter_id,
                            const uint8_t* salt, size_t salt_len,
                            int64_t* computed_tokens,
                            kvcache_prefix_hits* hits) {
  return Guarded(name, [&]() -> absl::Status {
    if (hits != nullptr) {
      if (absl::Status s = CheckSize(hits, "kvcache_prefix_hits", "hits");
          !s.ok()) {
        return s;
      }
    }
    if (absl::Status s =
            CheckCount("prompt_len", prompt_len, KVCACHE_MAX_TOKENS);
        !s.ok()) {
      return s;
    }
    if (prompt == nullptr && prompt_len > 0) return Null("prompt");
    if (salt_len > KVCACHE_MAX_SALT_BYTES) {
      return absl::InvalidArgumentError(absl::StrCat(
          "salt_len ", salt_len, " exceeds ", KVCACHE_MAX_SALT_BYTES));
    }
    if (salt == nullptr && salt_len > 0) return Null("salt");
    kvcache::ExtraKey extra;
    extra.adapter_id = adapter_id;
    // Bytes with a length (issue #12: NUL-terminated salts made "\0Alice"
    // and "\0Bob" one tenant).
    if (salt_len > 0) {
      extra.salt.assign(reinterpret_cast<const char*>(salt), salt_len);
    }
    kvcache::PrefixHits split;
    absl::StatusOr<int64_t> computed = m->impl->AddSequence(
        sequence, absl::MakeConstSpan(prompt, prompt_len), extra, &split);
    if (!computed.ok()) return computed.status();
    if (computed_tokens != nullptr) *computed_tokens = *computed;
    if (hits != nullptr) {
      hits->device_tokens = split.device_tokens;
      hits->host_tokens = split.host_tokens;
    }
    return absl::OkStatus();
  });
}

}  // namespace

kvcache_status kvcache_add_sequence(kvcache_manager* m, int64_t sequence,
                                    const int32_t* prompt, int64_t prompt_len,
                                    int64_t adapter_id, const uint8_t* salt,
                                    size_t salt_len, int64_t* computed_tokens) {
  KVCACHE_C_REQUIRE(m);
  return AddSequenceC("kvcache_add_sequence", m, sequence, prompt, prompt_len,
                      adapter_id, salt, salt_len, computed_tokens, nullptr);
}

kvcache_status kvcache_add_sequence_hits(kvcache_manager* m, int64_t sequence,
                                         const int32_t* prompt,
                                         int64_t prompt_len, int64_t adapter_id,
                                         const uint8_t* salt, size_t salt_len,
                                         int64_t* computed_tokens,
                                         kvcache_prefix_hits* hits) {
  KVCACHE_C_REQUIRE(m);
  return AddSequenceC("kvcache_add_sequence_hits", m, sequence, prompt,
                      prompt_len, adapter_id, salt, salt_len, computed_tokens,
                      hits);
}

namespace {

// kvcache_reserve and kvcache_reserve_graph_step (graph_tokens > 0).
kvcache_status ReserveC(kvcache_manager* m, const char* name,
                        const kvcache_reserve_request* batch,
                        int64_t batch_size, int64_t graph_tokens, void* stream,
                        kvcache_plan* plan) {
  return Guarded(name, [&]() -> absl::Status {
    if (absl::Status s = CheckSize(plan, "kvcache_plan", "plan"); !s.ok()) {
      return s;
    }
    absl::StatusOr<std::vector<kvcache::ReserveRequest>> requests =
        ToRequests(batch, batch_size);
    if (!requests.ok()) return requests.status();
    // The map node for the host slots, made before anything changes.
    std::map<uint64_t, std::vector<int64_t>> scratch;
    auto node = scratch.extract(scratch.try_emplace(0).first);
    absl::StatusOr<kvcache::StepPlanInfo> info =
        graph_tokens > 0
            ? m->impl->ReserveGraphStep(*requests, graph_tokens, stream)
            : m->impl->Reserve(*requests, stream);
    if (!info.ok()) return info.status();
    node.key() = info->id;
    node.mapped() = std::move(info->host_slot_mapping);
    const int64_t* host = node.mapped().data();
    {
      std::lock_guard<std::mutex> lock(m->mu);
      m->host_slots.insert(std::move(node));
    }
    plan->id = info->id;
    plan->num_tokens = info->num_tokens;
    plan->slot_mapping = info->slot_mapping;
    plan->host_slot_mapping = host;
    plan->num_block_copies = info->num_block_copies;
    plan->graph_tokens = info->graph_tokens;
    return absl::OkStatus();
  });
}

}  // namespace

kvcache_status kvcache_reserve(kvcache_manager* m,
                               const kvcache_reserve_request* batch,
                               int64_t batch_size, void* stream,
                               kvcache_plan* plan) {
  KVCACHE_C_REQUIRE(m);
  return ReserveC(m, "kvcache_reserve", batch, batch_size, 0, stream, plan);
}

kvcache_status kvcache_reserve_graph_step(kvcache_manager* m,
                                          const kvcache_reserve_request* batch,
                                          int64_t batch_size,
                                          int64_t graph_tokens, void* stream,
                                          kvcache_plan* plan) {
  KVCACHE_C_REQUIRE(m);
  if (graph_tokens <= 0) {
    return Guarded("kvcache_reserve_graph_step", [&]() -> absl::Status {
      return absl::InvalidArgumentError(
          absl::StrCat("graph_tokens ", graph_tokens, " must be >= 1"));
    });
  }
  return ReserveC(m, "kvcache_reserve_graph_step", batch, batch_size,
                  graph_tokens, stream, plan);
}

namespace {

// kvcache_graph_step (table -1) and kvcache_group_graph_step.
kvcache_status GraphStepC(kvcache_manager* m, const char* name, int32_t table,
                          kvcache_graph_step_inputs* inputs) {
  return Guarded(name, [&]() -> absl::Status {
    if (absl::Status s =
            CheckSize(inputs, "kvcache_graph_step_inputs", "inputs");
        !s.ok()) {
      return s;
    }
    absl::StatusOr<kvcache::GraphStepInputs> in =
        table < 0 ? m->impl->GraphStep() : m->impl->GroupGraphStep(table);
    if (!in.ok()) return in.status();
    inputs->slot_mapping = in->slot_mapping;
    inputs->positions = in->positions;
    inputs->seq_lens = in->seq_lens;
    inputs->block_table = in->block_table;
    inputs->max_tokens = in->max_tokens;
    inputs->max_sequences = in->max_sequences;
    inputs->row_stride = in->row_stride;
    return absl::OkStatus();
  });
}

}  // namespace

kvcache_status kvcache_graph_step(kvcache_manager* m,
                                  kvcache_graph_step_inputs* inputs) {
  KVCACHE_C_REQUIRE(m);
  return GraphStepC(m, "kvcache_graph_step", -1, inputs);
}

kvcache_status kvcache_group_graph_step(kvcache_manager* m, int32_t table,
                                        kvcache_graph_step_inputs* inputs) {
  KVCACHE_C_REQUIRE(m);
  if (table < 0) {
    return Guarded("kvcache_group_graph_step", [&]() -> absl::Status {
      return absl::InvalidArgumentError(
          absl::StrCat("block table ", table, " must be >= 0"));
    });
  }
  return GraphStepC(m, "kvcache_group_graph_step", table, inputs);
}

kvcache_status kvcache_known_length(kvcache_manager* m, int64_t sequence,
                                    int64_t* length) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_known_length", [&]() -> absl::Status {
    if (length == nullptr) return Null("length");
    absl::StatusOr<int64_t> n = m->impl->KnownLength(sequence);
    if (!n.ok()) return n.status();
    *length = *n;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_gather_async(kvcache_manager* m, int64_t sequence,
                                    int32_t layer, int64_t token_begin,
                                    int64_t num_tokens,
                                    const kvcache_tensor* key_out,
                                    const kvcache_tensor* value_out,
                                    int32_t include_in_flight, void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_gather_async", [&]() -> absl::Status {
    if (absl::Status s = CheckTensor(key_out, "key_out"); !s.ok()) return s;
    if (absl::Status s = CheckTensor(value_out, "value_out"); !s.ok()) {
      return s;
    }
    kvcache::GatherOptions options;
    options.include_in_flight = include_in_flight != 0;
    return m->impl->GatherAsync(sequence, layer, token_begin, num_tokens,
                                ToView(*key_out), ToView(*value_out), options,
                                stream);
  });
}

kvcache_status kvcache_gather_batch(kvcache_manager* m,
                                    const kvcache_gather_request* requests,
                                    int64_t num_requests, int32_t layer,
                                    const kvcache_tensor* key_out,
                                    const kvcache_tensor* value_out,
                                    int32_t include_in_flight, void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_gather_batch", [&]() -> absl::Status {
    if (absl::Status s =
            CheckCount("num_requests", num_requests, KVCACHE_MAX_BATCH);
        !s.ok()) {
      return s;
    }
    if (requests == nullptr && num_requests > 0) return Null("requests");
    if (absl::Status s = CheckTensor(key_out, "key_out"); !s.ok()) return s;
    if (absl::Status s = CheckTensor(value_out, "value_out"); !s.ok()) {
      return s;
    }
    std::vector<kvcache::GatherRequest> batch(num_requests);
    for (int64_t i = 0; i < num_requests; ++i) {
      if (requests[i].struct_size != sizeof(kvcache_gather_request)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "requests[", i, "].struct_size is ", requests[i].struct_size,
            " but this library's sizeof(kvcache_gather_request) is ",
            sizeof(kvcache_gather_request)));
      }
      batch[i] =
          kvcache::GatherRequest{requests[i].sequence, requests[i].token_begin,
                                 requests[i].num_tokens};
    }
    kvcache::GatherOptions options;
    options.include_in_flight = include_in_flight != 0;
    return m->impl->GatherBatch(batch, layer, ToView(*key_out),
                                ToView(*value_out), options, stream);
  });
}

kvcache_status kvcache_can_reserve(kvcache_manager* m,
                                   const kvcache_reserve_request* batch,
                                   int64_t batch_size) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_can_reserve", [&]() -> absl::Status {
    absl::StatusOr<std::vector<kvcache::ReserveRequest>> requests =
        ToRequests(batch, batch_size);
    if (!requests.ok()) return requests.status();
    return m->impl->CanReserve(*requests);
  });
}

kvcache_status kvcache_append(kvcache_manager* m, uint64_t plan_id,
                              int32_t layer, const kvcache_tensor* key,
                              const kvcache_tensor* value, void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_append", [&]() -> absl::Status {
    if (absl::Status s = CheckTensor(key, "key"); !s.ok()) return s;
    // NULL value: none (a K-only group; refused by name otherwise).
    if (value == nullptr) {
      return m->impl->Append(plan_id, layer, ToView(*key),
                             kvcache::TensorView(), stream);
    }
    if (absl::Status s = CheckTensor(value, "value"); !s.ok()) {
      return s;
    }
    return m->impl->Append(plan_id, layer, ToView(*key), ToView(*value),
                           stream);
  });
}

kvcache_status kvcache_append_dlpack(kvcache_manager* m, uint64_t plan_id,
                                     int32_t layer, const DLTensor* key,
                                     const DLTensor* value, void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_append_dlpack", [&]() -> absl::Status {
    if (key == nullptr) return Null("key");
    if (value == nullptr) return Null("value");
    return m->impl->Append(plan_id, layer, *key, *value, stream);
  });
}

kvcache_status kvcache_commit(kvcache_manager* m, uint64_t plan_id) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_commit", [&]() -> absl::Status {
    absl::Status s = m->impl->Commit(plan_id);
    if (s.ok()) ForgetPlan(m, plan_id);
    return s;
  });
}

kvcache_status kvcache_abort(kvcache_manager* m, uint64_t plan_id) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_abort", [&]() -> absl::Status {
    absl::Status s = m->impl->Abort(plan_id);
    if (s.ok()) ForgetPlan(m, plan_id);
    return s;
  });
}

kvcache_status kvcache_fork(kvcache_manager* m, int64_t parent, int64_t child) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_fork", [&]() -> absl::Status {
    return m->impl->Fork(parent, child);
  });
}

kvcache_status kvcache_free(kvcache_manager* m, int64_t sequence) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_free",
                 [&]() -> absl::Status { return m->impl->Free(sequence); });
}

kvcache_status kvcache_block_table(kvcache_manager* m, int64_t sequence,
                                   int32_t* blocks, int64_t capacity,
                                   int64_t* num_blocks) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_block_table", [&]() -> absl::Status {
    if (num_blocks == nullptr) return Null("num_blocks");
    absl::StatusOr<std::vector<kvcache::BlockId>> table =
        m->impl->BlockTable(sequence);
    if (!table.ok()) return table.status();
    const int64_t n = static_cast<int64_t>(table->size());
    *num_blocks = n;  // The size needed, whatever the capacity.
    if (blocks == nullptr && capacity == 0) return absl::OkStatus();
    if (blocks == nullptr) return Null("blocks");
    if (n > capacity) {
      return absl::OutOfRangeError(
          absl::StrCat("block table of sequence ", sequence, " has ", n,
                       " blocks; capacity is ", capacity));
    }
    std::copy(table->begin(), table->end(), blocks);
    return absl::OkStatus();
  });
}

kvcache_status kvcache_sequence_length(kvcache_manager* m, int64_t sequence,
                                       int64_t* length) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_sequence_length", [&]() -> absl::Status {
    if (length == nullptr) return Null("length");
    absl::StatusOr<int64_t> n = m->impl->SequenceLength(sequence);
    if (!n.ok()) return n.status();
    *length = *n;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_prefix_loaded(kvcache_manager* m, int64_t sequence,
                                     int* loaded) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_prefix_loaded", [&]() -> absl::Status {
    if (loaded == nullptr) return Null("loaded");
    absl::StatusOr<bool> done = m->impl->PrefixLoaded(sequence);
    if (!done.ok()) return done.status();
    *loaded = *done ? 1 : 0;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_batch_block_table(kvcache_manager* m,
                                         const int64_t* sequences,
                                         int64_t num_sequences, void* stream,
                                         kvcache_block_table_view* view) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_batch_block_table", [&]() -> absl::Status {
    if (absl::Status s = CheckSize(view, "kvcache_block_table_view", "view");
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            CheckCount("num_sequences", num_sequences, KVCACHE_MAX_BATCH);
        !s.ok()) {
      return s;
    }
    if (sequences == nullptr && num_sequences > 0) return Null("sequences");
    absl::StatusOr<kvcache::BlockTableView> table = m->impl->BatchBlockTable(
        absl::MakeConstSpan(sequences, num_sequences), stream);
    if (!table.ok()) return table.status();
    view->block_table = table->block_table;
    view->seq_lens = table->seq_lens;
    view->num_sequences = table->num_sequences;
    view->max_blocks = table->max_blocks;
    view->row_stride = table->row_stride;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_num_block_tables(kvcache_manager* m,
                                        int32_t* num_tables) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_num_block_tables", [&]() -> absl::Status {
    if (num_tables == nullptr) return Null("num_tables");
    *num_tables = m->impl->NumBlockTables();
    return absl::OkStatus();
  });
}

kvcache_status kvcache_layer_block_table(kvcache_manager* m, int32_t layer,
                                         int32_t* table) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_layer_block_table", [&]() -> absl::Status {
    if (table == nullptr) return Null("table");
    absl::StatusOr<int32_t> t = m->impl->LayerBlockTable(layer);
    if (!t.ok()) return t.status();
    *table = *t;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_group_block_table(kvcache_manager* m, int64_t sequence,
                                         int32_t table, int32_t* blocks,
                                         int64_t capacity,
                                         int64_t* num_blocks) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_group_block_table", [&]() -> absl::Status {
    if (num_blocks == nullptr) return Null("num_blocks");
    absl::StatusOr<std::vector<kvcache::BlockId>> t =
        m->impl->GroupBlockTable(sequence, table);
    if (!t.ok()) return t.status();
    const int64_t n = static_cast<int64_t>(t->size());
    *num_blocks = n;
    if (blocks == nullptr && capacity == 0) return absl::OkStatus();
    if (blocks == nullptr) return Null("blocks");
    if (n > capacity) {
      return absl::OutOfRangeError(
          absl::StrCat("block table ", table, " of sequence ", sequence,
                       " has ", n, " blocks; capacity is ", capacity));
    }
    std::copy(t->begin(), t->end(), blocks);
    return absl::OkStatus();
  });
}

kvcache_status kvcache_group_batch_block_table(
    kvcache_manager* m, int32_t table, const int64_t* sequences,
    int64_t num_sequences, void* stream, kvcache_block_table_view* view) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_group_batch_block_table", [&]() -> absl::Status {
    if (absl::Status s = CheckSize(view, "kvcache_block_table_view", "view");
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            CheckCount("num_sequences", num_sequences, KVCACHE_MAX_BATCH);
        !s.ok()) {
      return s;
    }
    if (sequences == nullptr && num_sequences > 0) return Null("sequences");
    absl::StatusOr<kvcache::BlockTableView> t = m->impl->GroupBatchBlockTable(
        absl::MakeConstSpan(sequences, num_sequences), table, stream);
    if (!t.ok()) return t.status();
    view->block_table = t->block_table;
    view->seq_lens = t->seq_lens;
    view->num_sequences = t->num_sequences;
    view->max_blocks = t->max_blocks;
    view->row_stride = t->row_stride;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_held_blocks(kvcache_manager* m, int32_t table,
                                   int64_t* blocks) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_held_blocks", [&]() -> absl::Status {
    if (blocks == nullptr) return Null("blocks");
    if (table < 0 || table >= m->impl->NumBlockTables()) {
      return absl::InvalidArgumentError(
          absl::StrCat("block table ", table, " out of range [0, ",
                       m->impl->NumBlockTables(), ")"));
    }
    *blocks = m->impl->HeldBlocks(table);
    return absl::OkStatus();
  });
}

kvcache_status kvcache_get_layer_view(kvcache_manager* m, int32_t layer,
                                      kvcache_layer_view* view) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_get_layer_view", [&]() -> absl::Status {
    if (absl::Status s = CheckSize(view, "kvcache_layer_view", "view");
        !s.ok()) {
      return s;
    }
    absl::StatusOr<kvcache::LayerView> v = m->impl->GetLayerView(layer);
    if (!v.ok()) return v.status();
    view->key_cache = v->key_cache;
    view->value_cache = v->value_cache;
    view->key_scale = v->key_scale;
    view->value_scale = v->value_scale;
    view->cache_dtype = static_cast<int32_t>(v->cache_dtype);
    view->memory =
        v->memory == kvcache::MemoryKind::kCuda ? KVCACHE_DEVICE : KVCACHE_HOST;
    view->device = v->device;
    view->num_blocks = v->num_blocks;
    view->block_size = v->block_size;
    view->num_kv_heads = v->num_kv_heads;
    view->head_size = v->head_size;
    view->head_size_v = v->head_size_v;
    std::copy_n(v->key_strides, 4, view->key_strides);
    std::copy_n(v->value_strides, 4, view->value_strides);
    std::copy_n(v->scale_strides, 3, view->scale_strides);
    view->scale_placement = static_cast<int32_t>(v->scale_placement);
    view->key_row_pitch_bytes = v->key_row_pitch_bytes;
    view->value_row_pitch_bytes = v->value_row_pitch_bytes;
    view->scale_byte_offset = v->scale_byte_offset;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_gather(kvcache_manager* m, int64_t sequence,
                              int32_t layer, int64_t token_begin,
                              int64_t num_tokens, const kvcache_tensor* key_out,
                              const kvcache_tensor* value_out, void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_gather", [&]() -> absl::Status {
    if (absl::Status s = CheckTensor(key_out, "key_out"); !s.ok()) {
      return s;
    }
    // NULL value_out: none (a K-only group; refused by name otherwise).
    if (value_out == nullptr) {
      return m->impl->Gather(sequence, layer, token_begin, num_tokens,
                             ToView(*key_out), kvcache::TensorView(), stream);
    }
    if (absl::Status s = CheckTensor(value_out, "value_out"); !s.ok()) {
      return s;
    }
    return m->impl->Gather(sequence, layer, token_begin, num_tokens,
                           ToView(*key_out), ToView(*value_out), stream);
  });
}

kvcache_status kvcache_gather_dlpack(kvcache_manager* m, int64_t sequence,
                                     int32_t layer, int64_t token_begin,
                                     int64_t num_tokens,
                                     const DLTensor* key_out,
                                     const DLTensor* value_out, void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_gather_dlpack", [&]() -> absl::Status {
    if (key_out == nullptr) return Null("key_out");
    if (value_out == nullptr) return Null("value_out");
    absl::StatusOr<kvcache::TensorView> key = kvcache::FromDLPack(*key_out);
    if (!key.ok()) {
      return absl::Status(key.status().code(),
                          absl::StrCat("key_out: ", key.status().message()));
    }
    absl::StatusOr<kvcache::TensorView> value = kvcache::FromDLPack(*value_out);
    if (!value.ok()) {
      return absl::Status(
          value.status().code(),
          absl::StrCat("value_out: ", value.status().message()));
    }
    return m->impl->Gather(sequence, layer, token_begin, num_tokens, *key,
                           *value, stream);
  });
}

kvcache_status kvcache_attention(kvcache_manager* m, const int64_t* sequences,
                                 int64_t num_sequences, int32_t layer,
                                 const kvcache_tensor* q,
                                 const kvcache_tensor* out,
                                 const kvcache_attention_options* options,
                                 void* stream) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_attention", [&]() -> absl::Status {
    if (absl::Status s =
            CheckSize(options, "kvcache_attention_options", "options");
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            CheckCount("num_sequences", num_sequences, KVCACHE_MAX_BATCH);
        !s.ok()) {
      return s;
    }
    if (sequences == nullptr && num_sequences > 0) return Null("sequences");
    if (absl::Status s = CheckTensor(q, "q"); !s.ok()) return s;
    if (absl::Status s = CheckTensor(out, "out"); !s.ok()) return s;
    kvcache::AttentionOptions o;
    o.softmax_scale = options->softmax_scale;
    o.soft_cap = options->soft_cap;
    o.window = options->window;
    o.num_query_tokens_per_sequence = options->num_query_tokens_per_sequence;
    return m->impl->Attention(absl::MakeConstSpan(sequences, num_sequences),
                              layer, ToView(*q), ToView(*out), o, stream);
  });
}

kvcache_status kvcache_tokens_that_fit(kvcache_manager* m, int64_t sequence,
                                       int64_t* tokens) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_tokens_that_fit", [&]() -> absl::Status {
    if (tokens == nullptr) return Null("tokens");
    absl::StatusOr<int64_t> n = m->impl->TokensThatFit(sequence);
    if (!n.ok()) return n.status();
    *tokens = *n;
    return absl::OkStatus();
  });
}

kvcache_status kvcache_get_metrics(kvcache_manager* m, kvcache_metrics* out) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_get_metrics", [&]() -> absl::Status {
    if (absl::Status s = CheckSize(out, "kvcache_metrics", "metrics");
        !s.ok()) {
      return s;
    }
    const kvcache::MetricsSnapshot s = m->impl->Metrics();
    out->blocks_total = s.blocks_total;
    out->blocks_free = s.blocks_free;
    out->blocks_cached = s.blocks_cached;
    out->blocks_in_use = s.blocks_in_use;
    out->usage = s.usage;
    out->sequences = s.sequences;
    out->plans_in_flight = s.plans_in_flight;
    out->prefix_queries = s.prefix_queries;
    out->prefix_query_tokens = s.prefix_query_tokens;
    out->prefix_hit_tokens = s.prefix_hit_tokens;
    out->evictions = s.evictions;
    out->tokens_appended = s.tokens_appended;
    out->tokens_committed = s.tokens_committed;
    out->kernel_launches = s.kernel_launches;
    out->reserve_failures = s.reserve_failures;
    out->block_copies = s.block_copies;
    out->kv_event_batches = s.kv_event_batches;
    out->kv_event_batches_dropped = s.kv_event_batches_dropped;
    out->kv_event_batches_unpublished = s.kv_event_batches_unpublished;
    out->host_tier_blocks_total = s.host_tier_blocks_total;
    out->host_tier_blocks_stored = s.host_tier_blocks_stored;
    out->prefix_hit_tokens_device = s.prefix_hit_tokens_device;
    out->prefix_hit_tokens_host = s.prefix_hit_tokens_host;
    out->host_tier_evictions = s.host_tier_evictions;
    out->tier_offloads = s.tier_offloads;
    out->tier_onboards = s.tier_onboards;
    out->tier_offload_bytes = s.tier_offload_bytes;
    out->tier_onboard_bytes = s.tier_onboard_bytes;
    out->tier_copy_failures = s.tier_copy_failures;
    out->tier_offloads_skipped = s.tier_offloads_skipped;
    out->tier_offloads_unselected = s.tier_offloads_unselected;
    out->tier_offloads_waited = s.tier_offloads_waited;
    out->tier_offload_ahead_copies = s.tier_offload_ahead_copies;
    out->tier_offloads_ahead = s.tier_offloads_ahead;
    out->tier_offloads_kept = s.tier_offloads_kept;
    out->tier_evictions_deferred = s.tier_evictions_deferred;
    return absl::OkStatus();
  });
}

size_t kvcache_metrics_text(kvcache_manager* m, char* buffer, size_t capacity) {
  if (m == nullptr) {
    NullHandle(__func__);
    return 0;
  }
  const std::string text = m->impl->MetricsText();  // "" when out of memory.
  if (buffer != nullptr && capacity > 0) {
    const size_t n = std::min(capacity - 1, text.size());
    std::memcpy(buffer, text.data(), n);
    buffer[n] = '\0';
  }
  return text.size();
}

kvcache_status kvcache_validate(kvcache_manager* m) {
  KVCACHE_C_REQUIRE(m);
  return Guarded("kvcache_validate",
                 [&]() -> absl::Status { return m->impl->Validate(); });
}

}  // extern "C"
