// KV events of KVCacheManager::Impl (and of the layer-groups manager): the
// sink that config.enable_kv_events asks for, with its ZeroMQ publisher when
// config.kv_events_endpoint is set (events/), and TakeEvents.

#include <memory>
#include <utility>
#include <vector>

#include "api/event_sink_factory.h"
#include "api/manager_impl.h"
#include "core/status_macros.h"
#include "events/kv_event_sink.h"
#include "events/zmq_publisher.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<internal::KVEventSink>>
KVCacheManager::Impl::CreateEvents(const KVCacheConfig& config) {
  return internal::CreateEventSink(config);
}

absl::StatusOr<std::unique_ptr<internal::KVEventSink>>
internal::CreateEventSink(const KVCacheConfig& config) {
  if (!config.enable_kv_events) return nullptr;
  internal::KVEventSink::Options options;
  options.block_size = config.block_size;
  options.queue_capacity = config.kv_events_queue_capacity;
  if (!config.kv_events_endpoint.empty()) {
    internal::ZmqPublisher::Options z;
    z.endpoint = config.kv_events_endpoint;
    z.replay_endpoint = config.kv_events_replay_endpoint;
    z.topic = config.kv_events_topic;
    z.replay_batches = config.kv_events_replay_batches;
    z.queue_capacity = config.kv_events_queue_capacity;
    z.data_parallel_rank = config.kv_events_data_parallel_rank;
    KVCACHE_ASSIGN_OR_RETURN(options.publisher,
                             internal::ZmqPublisher::Create(std::move(z)));
  }
  return std::make_unique<internal::KVEventSink>(std::move(options));
}

std::vector<KVEventBatch> KVCacheManager::Impl::TakeEvents() {
  if (events_ == nullptr) return {};
  return events_->Take();
}

}  // namespace kvcache
