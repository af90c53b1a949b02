// KV events over ZeroMQ, end to end: the manager (with a host tier)
// publishes while 10,000 random operations (with evictions, tier moves and
// two resets) run; a real subscriber
// process (tests/kv_events_subscriber.py: Debian's pyzmq and msgpack) joins
// late, catches up by replay, follows the live stream, and rebuilds the set
// of cached block hashes per medium from the events alone, which must equal
// the manager's own. A second subscriber that joins after the last
// operation gets everything by replay. No payload may contain the salt.

#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "tests/event_test_util.h"

namespace kvcache {
namespace {

using testing::ManagerHashes;
using testing::RandomCacheOps;
using testing::SmallEventConfig;

constexpr int32_t kBs = 4;
constexpr char kTopic[] = "kv-test";

struct Rebuilt {
  std::map<std::string, std::set<uint64_t>> hashes;
  std::map<std::string, int64_t> stats;
};

// The subscriber process: started with popen, told the last sequence number
// on its stdin, and its findings read from `out` once it exits.
class SubscriberProcess {
 public:
  SubscriberProcess(const KVCacheConfig& c, const std::string& salt_hex,
                    std::string out)
      : out_(std::move(out)) {
    const std::string cmd = absl::StrCat(
        "python3 tests/kv_events_subscriber.py --pub ", c.kv_events_endpoint,
        " --replay ", c.kv_events_replay_endpoint, " --topic ", kTopic,
        " --salt_hex ", salt_hex, " --block_size ", c.block_size, " --rank ",
        c.kv_events_data_parallel_rank, " --out ", out_);
    pipe_ = popen(cmd.c_str(), "w");
  }
  ~SubscriberProcess() {
    if (pipe_ != nullptr) pclose(pipe_);
  }
  bool started() const { return pipe_ != nullptr; }

  // Tells it the last batch and waits for it: its exit status.
  int Finish(uint64_t last) {
    std::fprintf(pipe_, "%" PRIu64 "\n", last);
    std::fflush(pipe_);
    const int status = pclose(pipe_);
    pipe_ = nullptr;
    return status;
  }

  Rebuilt Read() const {
    Rebuilt r;
    std::ifstream in(out_);
    std::string kind, name;
    while (in >> kind) {
      if (kind == "stat") {
        int64_t v;
        in >> name >> v;
        r.stats[name] = v;
      } else {
        uint64_t h;
        in >> h;
        r.hashes[kind].insert(h);
      }
    }
    return r;
  }

 private:
  std::string out_;
  FILE* pipe_ = nullptr;
};

std::string Hex(const std::string& bytes) {
  std::string out;
  for (unsigned char c : bytes) absl::StrAppendFormat(&out, "%02x", c);
  return out;
}

std::string TempDir() {
  const char* d = std::getenv("TEST_TMPDIR");
  return d != nullptr ? d : "/tmp";
}

// A manager publishing on two free loopback ports (retrying when taken).
std::unique_ptr<KVCacheManager> MakePublishing(KVCacheConfig& c,
                                               std::mt19937_64& rng) {
  for (int attempt = 0; attempt < 50; ++attempt) {
    const int port = 20000 + static_cast<int>(rng() % 40000);
    c.kv_events_endpoint = absl::StrCat("tcp://127.0.0.1:", port);
    c.kv_events_replay_endpoint = absl::StrCat("tcp://127.0.0.1:", port + 1);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    if (m.ok()) return *std::move(m);
    EXPECT_TRUE(absl::IsInvalidArgument(m.status())) << m.status();
  }
  return nullptr;
}

TEST(KvEventsZmqTest, SubscriberRebuildsTheCachedSetFromEventsAlone) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  KVCacheConfig c = SmallEventConfig(48, kBs, /*host_tier_blocks=*/16);
  c.kv_events_topic = kTopic;
  c.kv_events_queue_capacity = 1 << 20;
  c.kv_events_replay_batches = 1 << 20;  // Everything, for the late joiner.
  c.kv_events_data_parallel_rank = 1 + static_cast<int32_t>(rng() % 7);
  std::unique_ptr<KVCacheManager> m = MakePublishing(c, rng);
  ASSERT_NE(m, nullptr);
  std::string salt(16, '\0');
  for (char& ch : salt) ch = static_cast<char>(rng());
  RandomCacheOps ops(*m, seed, salt);

  const std::string tmp = TempDir();
  std::unique_ptr<SubscriberProcess> late;
  // 10,000 operations, and up to 20,000 more while the tier has onboarded
  // 10 blocks or fewer (how many depends on when the background copies
  // finish), so that its moves both ways are exercised whatever the draws.
  for (int i = 0; i < 10000 || (m->Metrics().tier_onboards <= 10 && i < 30000);
       ++i) {
    const absl::Status s = ops.Op();
    ASSERT_TRUE(s.ok()) << "op " << i << ": " << s;
    if (i == 2500 || i == 7500) {
      ASSERT_TRUE(m->ResetPrefixCache().ok());
    }
    if (i == 4000) {  // Joins late: 4,000 operations' batches by replay.
      late = std::make_unique<SubscriberProcess>(
          c, Hex(salt), absl::StrCat(tmp, "/late.txt"));
      ASSERT_TRUE(late->started());
    }
    // Now and then a pause, so that the subscriber is on the live stream.
    if (i > 4000 && i % 1000 == 0) usleep(200 * 1000);
  }
  const MetricsSnapshot metrics = m->Metrics();
  ASSERT_GT(metrics.kv_event_batches, 0);
  const uint64_t last = static_cast<uint64_t>(metrics.kv_event_batches - 1);
  EXPECT_EQ(metrics.kv_event_batches_unpublished, 0);
  EXPECT_GT(metrics.evictions, 100);
  EXPECT_GT(metrics.tier_offloads, 100);  // Tier moves both ways.
  EXPECT_GT(metrics.tier_onboards, 10);

  const std::set<uint64_t> device = ManagerHashes(*m, KVEventMedium::kDevice);
  const std::set<uint64_t> host = ManagerHashes(*m, KVEventMedium::kHost);
  ASSERT_EQ(late->Finish(last), 0) << "the subscriber failed (its stderr)";
  const Rebuilt r = late->Read();
  EXPECT_EQ(r.stats.at("batches"), metrics.kv_event_batches);
  EXPECT_EQ(r.stats.at("salt_hits"), 0);
  EXPECT_GT(r.stats.at("replayed"), 0);  // It caught up by replay...
  EXPECT_GT(r.stats.at("live"), 0);      // ...and followed the live stream.
  EXPECT_FALSE(device.empty());
  EXPECT_FALSE(host.empty());
  EXPECT_EQ(
      r.hashes.count("device") ? r.hashes.at("device") : std::set<uint64_t>{},
      device);
  EXPECT_EQ(r.hashes.count("host") ? r.hashes.at("host") : std::set<uint64_t>{},
            host);

  // After the last operation: everything comes by replay.
  SubscriberProcess after(c, Hex(salt), absl::StrCat(tmp, "/after.txt"));
  ASSERT_TRUE(after.started());
  ASSERT_EQ(after.Finish(last), 0);
  const Rebuilt a = after.Read();
  EXPECT_EQ(a.stats.at("live"), 0);
  EXPECT_EQ(a.stats.at("replayed"), metrics.kv_event_batches);
  EXPECT_EQ(
      a.hashes.count("device") ? a.hashes.at("device") : std::set<uint64_t>{},
      device);
  EXPECT_EQ(a.hashes.count("host") ? a.hashes.at("host") : std::set<uint64_t>{},
            host);
}

}  // namespace
}  // namespace kvcache
