// KVEventPublisher: where KVEventSink hands each sealed batch besides its own
// queue (the ZeroMQ publisher, zmq_publisher.h; a test's recorder). Publish is
// called under the manager's lock, so it must be quick (copy and return) and
// must not call back into the manager. Implementations are thread-safe.

#ifndef KVCACHE_EVENTS_KV_EVENT_PUBLISHER_H_
#define KVCACHE_EVENTS_KV_EVENT_PUBLISHER_H_

#include <cstdint>

#include "core/kv_event.h"

namespace kvcache {
namespace internal {

class KVEventPublisher {
 public:
  virtual ~KVEventPublisher() = default;
  virtual void Publish(const KVEventBatch& batch) = 0;
  // Batches handed to Publish that were never sent (queue overflow, a failed
  // send).
  virtual uint64_t dropped() const = 0;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_EVENTS_KV_EVENT_PUBLISHER_H_
