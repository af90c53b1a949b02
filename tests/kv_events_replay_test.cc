// The KV events publisher's sockets, from a C++ client (cppzmq over Debian's
// libzmq): a subscriber's live messages [topic, sequence, payload] with
// contiguous sequence numbers; the ROUTER's replay of the last
// kv_events_replay_batches batches from a start, byte-identical to what was
// published, ending with the -1 marker; and hostile requests (wrong frame
// counts, a wrong-sized start, a non-empty delimiter, a long frame), each
// ignored without an answer while the next valid request is served.

#include <chrono>
#include <cstdint>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "tests/event_test_util.h"
#include "zmq.hpp"
#include "zmq_addon.hpp"

namespace kvcache {
namespace {

using testing::RunStep;
using testing::SmallEventConfig;

constexpr int kKept = 5;
constexpr int kBatches = 8;

std::string Seq(int64_t v) {
  std::string s(8, '\0');
  for (int i = 7; i >= 0; --i) {
    s[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
  return s;
}

uint64_t FromSeq(const zmq::message_t& m) {
  uint64_t v = 0;
  for (size_t i = 0; i < m.size(); ++i) {
    v = (v << 8) | static_cast<const uint8_t*>(m.data())[i];
  }
  return v;
}

class KvEventsReplayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(std::random_device{}());
    KVCacheConfig c = SmallEventConfig(64, 4);
    c.kv_events_topic = "t";
    c.kv_events_replay_batches = kKept;
    for (int attempt = 0; attempt < 50 && manager_ == nullptr; ++attempt) {
      const int port = 20000 + static_cast<int>(rng() % 40000);
      c.kv_events_endpoint = absl::StrCat("tcp://127.0.0.1:", port);
      c.kv_events_replay_endpoint = absl::StrCat("tcp://127.0.0.1:", port + 1);
      absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
          KVCacheManager::Create(c);
      if (m.ok()) manager_ = *std::move(m);
    }
    ASSERT_NE(manager_, nullptr);
    config_ = c;
  }

  // Sends `frames` on a fresh DEALER socket and returns the replies until the
  // end marker, or none if nothing came within `wait`.
  std::vector<std::vector<zmq::message_t>> Ask(
      const std::vector<std::string>& frames,
      std::chrono::milliseconds wait = std::chrono::milliseconds(3000)) {
    zmq::socket_t dealer(ctx_, zmq::socket_type::dealer);
    dealer.set(zmq::sockopt::linger, 0);
    dealer.connect(config_.kv_events_replay_endpoint);
    for (size_t i = 0; i < frames.size(); ++i) {
      dealer.send(zmq::buffer(frames[i]), i + 1 < frames.size()
                                              ? zmq::send_flags::sndmore
                                              : zmq::send_flags::none);
    }
    std::vector<std::vector<zmq::message_t>> replies;
    zmq::pollitem_t item{dealer.handle(), 0, ZMQ_POLLIN, 0};
    while (zmq::poll(&item, 1, wait) > 0) {
      std::vector<zmq::message_t> reply;
      (void)zmq::recv_multipart(dealer, std::back_inserter(reply));
      const bool end = reply.size() == 3 && reply[1].size() == 8 &&
                       FromSeq(reply[1]) == ~uint64_t{0};
      replies.push_back(std::move(reply));
      if (end) break;
    }
    return replies;
  }

  zmq::context_t ctx_;
  KVCacheConfig config_;
  std::unique_ptr<KVCacheManager> manager_;
};

TEST_F(KvEventsReplayTest, LiveStreamReplayAndHostileRequests) {
  zmq::socket_t sub(ctx_, zmq::socket_type::sub);
  sub.set(zmq::sockopt::subscribe, "t");
  sub.connect(config_.kv_events_endpoint);
  // A subscription takes effect asynchronously: wait until a probe batch (a
  // reset) arrives, retrying it.
  std::map<uint64_t, std::string> live;
  uint64_t next = 0;
  for (int attempt = 0; attempt < 100 && live.empty(); ++attempt) {
    ASSERT_TRUE(manager_->ResetPrefixCache().ok());
    ++next;
    zmq::pollitem_t item{sub.handle(), 0, ZMQ_POLLIN, 0};
    while (zmq::poll(&item, 1, std::chrono::milliseconds(50)) > 0) {
      std::vector<zmq::message_t> m;
      (void)zmq::recv_multipart(sub, std::back_inserter(m));
      ASSERT_EQ(m.size(), 3u);
      live[FromSeq(m[1])] = m[2].to_string();
    }
  }
  ASSERT_FALSE(live.empty());
  const uint64_t first = live.begin()->first;
  std::mt19937_64 rng(std::random_device{}());
  for (int i = 0; i < kBatches; ++i) {
    std::vector<TokenId> prompt(5);
    for (TokenId& t : prompt) t = static_cast<TokenId>(rng() % 1000);
    ASSERT_TRUE(manager_->AddSequence(i, prompt).ok());
    ASSERT_TRUE(RunStep(*manager_, i, 5).ok());  // One stored block each.
  }
  const uint64_t last = next + kBatches - 1;
  zmq::pollitem_t item{sub.handle(), 0, ZMQ_POLLIN, 0};
  while (live.rbegin()->first < last &&
         zmq::poll(&item, 1, std::chrono::milliseconds(3000)) > 0) {
    std::vector<zmq::message_t> m;
    (void)zmq::recv_multipart(sub, std::back_inserter(m));
    ASSERT_EQ(m.size(), 3u);
    EXPECT_EQ(m[0].to_string(), "t");
    live[FromSeq(m[1])] = m[2].to_string();
  }
  // Contiguous from the first message received to the last batch.
  ASSERT_EQ(live.size(), last - first + 1);
  EXPECT_EQ(live.rbegin()->first, last);

  // Hostile requests: ignored, no answer.
  const std::string big(4000, 'x');
  for (const std::vector<std::string>& junk :
       std::vector<std::vector<std::string>>{{""},
                                             {"", "abc"},
                                             {"", Seq(0), "extra"},
                                             {"nonempty", Seq(0)},
                                             {big, "", Seq(0)},
                                             {"", big}}) {
    EXPECT_TRUE(Ask(junk, std::chrono::milliseconds(200)).empty());
  }
  // The last kKept batches, byte-identical to the live ones, then the end.
  auto replies = Ask({"", Seq(0)});
  ASSERT_EQ(replies.size(), static_cast<size_t>(kKept + 1));
  for (int i = 0; i < kKept; ++i) {
    ASSERT_EQ(replies[i].size(), 3u);
    EXPECT_EQ(replies[i][0].size(), 0u);
    const uint64_t seq = FromSeq(replies[i][1]);
    EXPECT_EQ(seq, last - kKept + 1 + i);
    EXPECT_EQ(replies[i][2].to_string(), live[seq]);
  }
  EXPECT_EQ(replies.back()[2].size(), 0u);  // The end marker's payload.
  replies = Ask({"", Seq(static_cast<int64_t>(last))});
  ASSERT_EQ(replies.size(), 2u);
  EXPECT_EQ(FromSeq(replies[0][1]), last);
  replies = Ask({"", Seq(static_cast<int64_t>(last) + 1000)});
  ASSERT_EQ(replies.size(), 1u);  // Only the end marker.
  EXPECT_EQ(manager_->Metrics().kv_event_batches_unpublished, 0);
}

}  // namespace
}  // namespace kvcache
