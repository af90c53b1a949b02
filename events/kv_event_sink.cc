#include "events/kv_event_sink.h"

#include <new>
#include <utility>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "events/external_hash.h"

namespace kvcache {
namespace internal {
namespace {

KVEventMedium ToEventMedium(BlockMedium medium) {
  return medium == BlockMedium::kHost ? KVEventMedium::kHost
                                      : KVEventMedium::kDevice;
}

// Whether `b` continues the chain of the event being built, whose last block
// is `prev`: same medium and adapter, and `prev` is its parent.
bool ContinuesChain(const StoredBlock& prev, const StoredBlock& b) {
  return !b.first_in_chain && b.parent_hash == prev.hash &&
         b.medium == prev.medium && b.adapter_id == prev.adapter_id;
}

}  // namespace

KVEventSink::KVEventSink(Options options)
    : block_size_(options.block_size),
      queue_capacity_(static_cast<size_t>(
          options.queue_capacity < 1 ? 1 : options.queue_capacity)),
      publisher_(std::move(options.publisher)) {}

void KVEventSink::OnBlocksStored(absl::Span<const StoredBlock> blocks) {
  if (blocks.empty()) return;
  try {
    std::vector<KVEvent> events;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const StoredBlock& b = blocks[i];
      if (i == 0 || !ContinuesChain(blocks[i - 1], b)) {
        KVEvent& e = events.emplace_back();
        e.type = KVEventType::kBlockStored;
        e.medium = ToEventMedium(b.medium);
        e.has_parent = !b.first_in_chain;
        e.parent_block_hash =
            b.first_in_chain ? 0 : ExternalBlockHash(b.parent_hash);
        e.block_size = block_size_;
        e.adapter_id = b.adapter_id;
      }
      KVEvent& e = events.back();
      e.block_hashes.push_back(ExternalBlockHash(b.hash));
      e.token_ids.insert(e.token_ids.end(), b.tokens.begin(), b.tokens.end());
    }
    Seal(std::move(events));
  } catch (const std::bad_alloc&) {
    Lose();
  }
}

void KVEventSink::OnBlocksRemoved(absl::Span<const BlockHash> hashes,
                                  BlockMedium medium) {
  if (hashes.empty()) return;
  try {
    std::vector<KVEvent> events(1);
    KVEvent& e = events[0];
    e.type = KVEventType::kBlockRemoved;
    e.medium = ToEventMedium(medium);
    e.block_hashes.reserve(hashes.size());
    for (const BlockHash& h : hashes) {
      e.block_hashes.push_back(ExternalBlockHash(h));
    }
    Seal(std::move(events));
  } catch (const std::bad_alloc&) {
    Lose();
  }
}

void KVEventSink::OnAllBlocksCleared() {
  try {
    std::vector<KVEvent> events(1);
    events[0].type = KVEventType::kAllBlocksCleared;
    Seal(std::move(events));
  } catch (const std::bad_alloc&) {
    Lose();
  }
}

void KVEventSink::Seal(std::vector<KVEvent> events) {
  KVEventBatch batch;
  batch.sequence = next_sequence_;
  batch.timestamp = absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch());
  batch.events = std::move(events);
  // The publisher copies first: if that throws, nothing was queued and the
  // number is lost (Lose), as for any batch that could not be built.
  if (publisher_ != nullptr) publisher_->Publish(batch);
  if (queue_.size() == queue_capacity_) {
    queue_.pop_front();
    ++dropped_;
  }
  queue_.push_back(std::move(batch));
  ++next_sequence_;
}

void KVEventSink::Lose() {
  ++next_sequence_;
  ++dropped_;
}

std::vector<KVEventBatch> KVEventSink::Take() {
  std::vector<KVEventBatch> out;
  out.reserve(queue_.size());  // If this throws, the queue is kept whole.
  for (KVEventBatch& batch : queue_) out.push_back(std::move(batch));
  queue_.clear();
  return out;
}

}  // namespace internal
}  // namespace kvcache
