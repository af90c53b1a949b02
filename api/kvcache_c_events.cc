// The C API's KV-event calls (kvcache_c.h): kvcache_take_events hands out one
// owned result (an EventsOwner behind kvcache_events::owner) that
// kvcache_events_free releases; kvcache_reset_prefix_cache.

#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/kvcache_c.h"
#include "api/kvcache_c_internal.h"
#include "api/no_bad_alloc.h"
#include "core/kv_event.h"

namespace {

// Everything a kvcache_events points into.
struct EventsOwner {
  std::vector<kvcache::KVEventBatch> batches;  // The C++ events.
  std::vector<kvcache_event> events;           // Flat, all batches.
  std::vector<kvcache_event_batch> c_batches;
};

template <typename F>
kvcache_status Guarded(const char* call, F&& body) noexcept {
  return kvcache::c_api::RecordStatus(
      kvcache::internal::NoBadAlloc(call, std::forward<F>(body)));
}

kvcache_status NullHandle(const char* call) noexcept {
  return Guarded(call, [&]() -> absl::Status {
    return absl::InvalidArgumentError(absl::StrCat(call, ": manager is NULL"));
  });
}

absl::Status CheckEvents(const kvcache_events* events) {
  if (events == nullptr) return absl::InvalidArgumentError("events is NULL");
  if (events->struct_size != sizeof(kvcache_events)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "events: kvcache_events.struct_size is ", events->struct_size,
        " but this library's sizeof(kvcache_events) is ",
        sizeof(kvcache_events),
        " (set it with KVCACHE_STRUCT_INIT or rebuild against this "
        "kvcache_c.h)"));
  }
  if (events->owner != nullptr) {
    return absl::InvalidArgumentError(
        "events.owner is not NULL: release the previous result with "
        "kvcache_events_free (or zero the struct with KVCACHE_STRUCT_INIT)");
  }
  return absl::OkStatus();
}

kvcache_event ToC(const kvcache::KVEvent& e) {
  kvcache_event c{};
  c.type = static_cast<int32_t>(e.type);
  c.medium = static_cast<int32_t>(e.medium);
  c.block_hashes = e.block_hashes.empty() ? nullptr : e.block_hashes.data();
  c.num_block_hashes = static_cast<int64_t>(e.block_hashes.size());
  c.has_parent = e.has_parent ? 1 : 0;
  c.parent_block_hash = e.parent_block_hash;
  c.token_ids = e.token_ids.empty() ? nullptr : e.token_ids.data();
  c.num_token_ids = static_cast<int64_t>(e.token_ids.size());
  c.block_size = e.block_size;
  c.adapter_id = e.adapter_id;
  return c;
}

absl::Status TakeEvents(kvcache::KVCacheManager& manager, kvcache_events* out) {
  if (absl::Status s = CheckEvents(out); !s.ok()) return s;
  auto owner = std::make_unique<EventsOwner>();
  absl::StatusOr<std::vector<kvcache::KVEventBatch>> taken =
      manager.TakeEvents();
  if (!taken.ok()) return taken.status();
  owner->batches = *std::move(taken);
  size_t num_events = 0;
  for (const kvcache::KVEventBatch& b : owner->batches) {
    num_events += b.events.size();
  }
  owner->events.reserve(num_events);
  owner->c_batches.reserve(owner->batches.size());
  for (const kvcache::KVEventBatch& b : owner->batches) {
    kvcache_event_batch c{};
    c.sequence = b.sequence;
    c.timestamp = b.timestamp;
    c.num_events = static_cast<int64_t>(b.events.size());
    // Reserved above: these pointers stay put.
    c.events = b.events.empty() ? nullptr
                                : owner->events.data() + owner->events.size();
    for (const kvcache::KVEvent& e : b.events) owner->events.push_back(ToC(e));
    owner->c_batches.push_back(c);
  }
  if (owner->c_batches.empty()) {  // Nothing to own.
    out->batches = nullptr;
    out->num_batches = 0;
    return absl::OkStatus();
  }
  out->batches = owner->c_batches.data();
  out->num_batches = static_cast<int64_t>(owner->c_batches.size());
  out->owner = owner.release();
  return absl::OkStatus();
}

}  // namespace

extern "C" {

kvcache_status kvcache_take_events(kvcache_manager* m, kvcache_events* events) {
  if (m == nullptr) return NullHandle(__func__);
  return Guarded(
      __func__, [&]() -> absl::Status { return TakeEvents(*m->impl, events); });
}

void kvcache_events_free(kvcache_events* events) {
  if (events == nullptr || events->struct_size != sizeof(kvcache_events)) {
    return;
  }
  delete static_cast<EventsOwner*>(events->owner);
  events->owner = nullptr;
  events->batches = nullptr;
  events->num_batches = 0;
}

kvcache_status kvcache_reset_prefix_cache(kvcache_manager* m) {
  if (m == nullptr) return NullHandle(__func__);
  return Guarded(__func__,
                 [&]() -> absl::Status { return m->impl->ResetPrefixCache(); });
}

}  // extern "C"
