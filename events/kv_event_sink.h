// KVEventSink: the BlockObserver (allocator/block_observer.h) that turns the
// prefix cache's block-state changes into KV events (core/kv_event.h). Each
// observer call becomes one batch with the next sequence number and a
// timestamp; the batch goes to a bounded queue that Take drains
// (KVCacheManager::TakeEvents) and, when there is one, to a publisher.
//
// Overflow: the queue holds at most `queue_capacity` batches; a batch sealed
// while it is full pushes the oldest out, counted in dropped(). A batch that
// cannot be built for lack of memory is dropped and counted too. Either way
// its sequence number is used, so a consumer sees the gap. The allocator's
// state never depends on the sink.
//
// Both media are handled alike: the device cache's calls and the host tier's
// (BlockMedium::kHost) become events of their medium.
//
// Thread-compatible: the manager calls every method under its lock. Owns its
// publisher.

#ifndef KVCACHE_EVENTS_KV_EVENT_SINK_H_
#define KVCACHE_EVENTS_KV_EVENT_SINK_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/types/span.h"
#include "allocator/block_hash.h"
#include "allocator/block_observer.h"
#include "core/kv_event.h"
#include "events/kv_event_publisher.h"

namespace kvcache {
namespace internal {

class KVEventSink final : public BlockObserver {
 public:
  struct Options {
    int32_t block_size = 16;
    int64_t queue_capacity = 4096;                // >= 1.
    std::unique_ptr<KVEventPublisher> publisher;  // May be null.
  };
  explicit KVEventSink(Options options);
  KVEventSink(const KVEventSink&) = delete;
  KVEventSink& operator=(const KVEventSink&) = delete;

  void OnBlocksStored(absl::Span<const StoredBlock> blocks) override;
  void OnBlocksRemoved(absl::Span<const BlockHash> hashes,
                       BlockMedium medium) override;
  void OnAllBlocksCleared() override;

  // The queued batches, oldest first; the queue is then empty.
  std::vector<KVEventBatch> Take();

  uint64_t batches() const { return next_sequence_; }  // Sealed so far.
  uint64_t dropped() const { return dropped_; }        // Lost to TakeEvents.
  uint64_t unpublished() const {
    return publisher_ == nullptr ? 0 : publisher_->dropped();
  }

 private:
  // Numbers, stamps, queues and publishes one batch of `events`.
  void Seal(std::vector<KVEvent> events);
  // The sequence number is used up, nothing is queued.
  void Lose();

  const int32_t block_size_;
  const size_t queue_capacity_;
  std::unique_ptr<KVEventPublisher> publisher_;
  std::deque<KVEventBatch> queue_;
  uint64_t next_sequence_ = 0;
  uint64_t dropped_ = 0;
};

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_EVENTS_KV_EVENT_SINK_H_
