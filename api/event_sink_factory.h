// CreateEventSink: the KV event sink (and its ZeroMQ publisher) a config asks
// for, shared by the uniform manager and the layer-groups manager. Defined in
// api/manager_events.cc. Internal to api/.

#ifndef KVCACHE_API_EVENT_SINK_FACTORY_H_
#define KVCACHE_API_EVENT_SINK_FACTORY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "api/kv_cache_config.h"
#include "events/kv_event_sink.h"

namespace kvcache::internal {

// Null when config.enable_kv_events is false; the publisher's errors (a bad
// endpoint, no libzmq) otherwise.
absl::StatusOr<std::unique_ptr<KVEventSink>> CreateEventSink(
    const KVCacheConfig& config);

}  // namespace kvcache::internal

#endif  // KVCACHE_API_EVENT_SINK_FACTORY_H_
