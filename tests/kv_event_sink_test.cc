// KVEventSink on its own, driven through the BlockObserver interface as the
// allocator and a host tier drive it: chains grouped into BlockStored events
// (split at a chain's start, a parent mismatch, another adapter or medium),
// host-medium stores and removals, sequence numbers shared by the queue and
// the publisher, and the drop-oldest overflow.

#include "events/kv_event_sink.h"

#include <memory>
#include <vector>

#include "allocator/block_hash.h"
#include "allocator/block_observer.h"
#include "events/external_hash.h"
#include "gtest/gtest.h"

namespace kvcache::internal {
namespace {

constexpr int32_t kBs = 2;

class Recorder : public KVEventPublisher {
 public:
  explicit Recorder(std::vector<KVEventBatch>* out) : out_(out) {}
  void Publish(const KVEventBatch& batch) override { out_->push_back(batch); }
  uint64_t dropped() const override { return 0; }

 private:
  std::vector<KVEventBatch>* out_;
};

BlockHash H(uint64_t low) { return BlockHash{low, ~low}; }

StoredBlock Block(uint64_t hash, uint64_t parent, bool first,
                  const std::vector<TokenId>& tokens, BlockMedium medium,
                  int64_t adapter = 0) {
  StoredBlock b;
  b.hash = H(hash);
  b.parent_hash = first ? BlockHash{} : H(parent);
  b.first_in_chain = first;
  b.medium = medium;
  b.adapter_id = adapter;
  b.tokens = tokens;
  return b;
}

TEST(KvEventSinkTest, GroupsChainsPerMediumAndAdapter) {
  std::vector<KVEventBatch> published;
  KVEventSink::Options o;
  o.block_size = kBs;
  o.publisher = std::make_unique<Recorder>(&published);
  KVEventSink sink(std::move(o));
  const std::vector<TokenId> t1 = {1, 2}, t2 = {3, 4}, t3 = {5, 6}, t4 = {7, 8},
                             t5 = {9, 10};
  const StoredBlock blocks[] = {
      Block(10, 0, true, t1, BlockMedium::kDevice),     // chain A starts
      Block(11, 10, false, t2, BlockMedium::kDevice),   // A goes on
      Block(20, 99, false, t3, BlockMedium::kDevice),   // B: parent 99 (a hit)
      Block(21, 20, false, t4, BlockMedium::kHost),     // other medium
      Block(22, 21, false, t5, BlockMedium::kHost, 3),  // other adapter
  };
  sink.OnBlocksStored(blocks);
  const BlockHash removed[] = {H(21), H(22)};
  sink.OnBlocksRemoved(removed, BlockMedium::kHost);
  sink.OnBlocksRemoved({}, BlockMedium::kDevice);  // Nothing: no batch.
  sink.OnAllBlocksCleared();

  const std::vector<KVEventBatch> taken = sink.Take();
  ASSERT_EQ(taken.size(), 3u);
  ASSERT_EQ(published.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(taken[i].sequence, i);
    EXPECT_EQ(published[i].sequence, i);
  }
  const std::vector<KVEvent>& s = taken[0].events;
  ASSERT_EQ(s.size(), 4u);
  EXPECT_EQ(s[0].block_hashes, (std::vector<uint64_t>{10, 11}));
  EXPECT_FALSE(s[0].has_parent);
  EXPECT_EQ(s[0].token_ids, (std::vector<TokenId>{1, 2, 3, 4}));
  EXPECT_EQ(s[0].medium, KVEventMedium::kDevice);
  EXPECT_EQ(s[1].block_hashes, std::vector<uint64_t>{20});
  EXPECT_TRUE(s[1].has_parent);
  EXPECT_EQ(s[1].parent_block_hash, ExternalBlockHash(H(99)));
  EXPECT_EQ(s[2].block_hashes, std::vector<uint64_t>{21});
  EXPECT_EQ(s[2].medium, KVEventMedium::kHost);
  EXPECT_EQ(s[2].parent_block_hash, 20u);
  EXPECT_EQ(s[3].adapter_id, 3);
  EXPECT_EQ(s[3].medium, KVEventMedium::kHost);
  EXPECT_EQ(s[3].token_ids, (std::vector<TokenId>{9, 10}));
  for (const KVEvent& e : s) EXPECT_EQ(e.block_size, kBs);

  ASSERT_EQ(taken[1].events.size(), 1u);
  EXPECT_EQ(taken[1].events[0].type, KVEventType::kBlockRemoved);
  EXPECT_EQ(taken[1].events[0].medium, KVEventMedium::kHost);
  EXPECT_EQ(taken[1].events[0].block_hashes, (std::vector<uint64_t>{21, 22}));
  EXPECT_EQ(taken[2].events[0].type, KVEventType::kAllBlocksCleared);
  EXPECT_TRUE(sink.Take().empty());
  EXPECT_EQ(sink.batches(), 3u);
  EXPECT_EQ(sink.dropped(), 0u);
}

TEST(KvEventSinkTest, OverflowDropsTheOldestButPublishesAll) {
  std::vector<KVEventBatch> published;
  KVEventSink::Options o;
  o.block_size = kBs;
  o.queue_capacity = 3;
  o.publisher = std::make_unique<Recorder>(&published);
  KVEventSink sink(std::move(o));
  for (int i = 0; i < 10; ++i) sink.OnAllBlocksCleared();
  const std::vector<KVEventBatch> taken = sink.Take();
  ASSERT_EQ(taken.size(), 3u);
  EXPECT_EQ(taken[0].sequence, 7u);
  EXPECT_EQ(taken[2].sequence, 9u);
  EXPECT_EQ(sink.dropped(), 7u);
  EXPECT_EQ(published.size(), 10u);  // Its own queue is the publisher's.
}

}  // namespace
}  // namespace kvcache::internal
