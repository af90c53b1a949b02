// StepBuffers (api/step_buffers.h) on the CPU device: FindFree, num_busy and
// num_slots follow the slots' busy flags, and FindFree hands the slots out in
// turn after Take; Upload writes exactly a random slot
// mapping and random (src, dst) pairs into the slot's device buffer and nothing
// else (neither the rest of that slot nor any other slot); a step larger than
// the buffers is InvalidArgument naming the sizes and changes nothing; readers
// on the stream that wrote a slot need no event, and a write from another
// stream records one on the readers' stream and waits for it.
// KVCACHE_TEST_SEED=<n> reruns one seed.

#include "api/step_buffers.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/test_seed.h"

namespace kvcache::internal {
namespace {

constexpr int64_t kSentinel = 0x5A5A5A5A5A5A5A5A;

class StepBuffersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const uint64_t seed = kvcache::testing::TestSeed();
    rng_.seed(seed);
    RecordProperty("seed", std::to_string(seed));
    seed_trace_ = std::make_unique<::testing::ScopedTrace>(
        __FILE__, __LINE__,
        absl::StrCat("seed ", seed, " (rerun with KVCACHE_TEST_SEED=", seed,
                     ")"));
  }

  void Make(int num_slots, int64_t max_tokens, int64_t max_copies) {
    max_tokens_ = max_tokens;
    max_copies_ = max_copies;
    absl::StatusOr<std::unique_ptr<StepBuffers>> b =
        StepBuffers::Create(device_.get(), num_slots, max_tokens, max_copies);
    ASSERT_TRUE(b.ok()) << b.status();
    buffers_ = *std::move(b);
    // Every word of every device buffer starts as the sentinel, so a write
    // outside what Upload was given shows.
    for (int i = 0; i < buffers_->num_slots(); ++i) {
      int64_t* words = buffers_->slot(i).device.as<int64_t>();
      ASSERT_NE(words, nullptr);
      ASSERT_EQ(
          buffers_->slot(i).device.size(),
          static_cast<size_t>(max_tokens + 2 * max_copies) * sizeof(int64_t));
      std::fill(words, words + max_tokens + 2 * max_copies, kSentinel);
    }
  }

  int64_t Rand(int64_t lo, int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }

  // A slot's whole device buffer, read back through the device.
  std::vector<int64_t> ReadBack(int index) {
    std::vector<int64_t> words(max_tokens_ + 2 * max_copies_);
    EXPECT_TRUE(device_
                    ->CopyToHost(words.data(), buffers_->device_slots(index),
                                 words.size() * sizeof(int64_t))
                    .ok());
    return words;
  }

  std::mt19937_64 rng_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  std::unique_ptr<Device> device_ = CreateCpuDevice();
  std::unique_ptr<StepBuffers> buffers_;
  int64_t max_tokens_ = 0;
  int64_t max_copies_ = 0;
};

TEST_F(StepBuffersTest, FindFreeAndCountsFollowBusyFlags) {
  const int n = static_cast<int>(Rand(1, 12));
  Make(n, 4, 2);
  ASSERT_EQ(buffers_->num_slots(), n);
  EXPECT_EQ(buffers_->num_busy(), 0);
  EXPECT_EQ(buffers_->FindFree(), 0);

  // A model of the busy flags, changed at random; FindFree is the lowest free
  // slot (or -1), num_busy the count.
  std::vector<bool> busy(n, false);
  for (int step = 0; step < 200; ++step) {
    const int i = static_cast<int>(Rand(0, n - 1));
    busy[i] = !busy[i];
    buffers_->slot(i).busy = busy[i];
    int expected_free = -1, expected_busy = 0;
    for (int j = n - 1; j >= 0; --j) {
      if (busy[j]) {
        ++expected_busy;
      } else {
        expected_free = j;
      }
    }
    ASSERT_EQ(buffers_->num_busy(), expected_busy) << "step " << step;
    ASSERT_EQ(buffers_->FindFree(), expected_free) << "step " << step;
    ASSERT_EQ(buffers_->num_slots(), n);
  }

  // All busy: -1; freeing one slot makes it the answer.
  for (int i = 0; i < n; ++i) buffers_->slot(i).busy = true;
  EXPECT_EQ(buffers_->FindFree(), -1);
  EXPECT_EQ(buffers_->num_busy(), n);
  const int freed = static_cast<int>(Rand(0, n - 1));
  buffers_->slot(freed).busy = false;
  EXPECT_EQ(buffers_->FindFree(), freed);
  EXPECT_EQ(buffers_->num_busy(), n - 1);
}

TEST_F(StepBuffersTest, TakeMakesFindFreeHandTheSlotsOutInTurn) {
  const int n = static_cast<int>(Rand(2, 12));
  Make(n, 4, 2);
  // A model: the turn starts after the last slot taken; FindFree is the
  // first free slot from there on, cyclically (or -1). Random takes of the
  // slot FindFree names, and random frees.
  std::vector<bool> busy(n, false);
  int turn = 0;
  for (int step = 0; step < 400; ++step) {
    int expected = -1;
    for (int k = 0; k < n && expected < 0; ++k) {
      if (!busy[(turn + k) % n]) expected = (turn + k) % n;
    }
    const int found = buffers_->FindFree();
    ASSERT_EQ(found, expected) << "step " << step << ", turn " << turn;
    if (found >= 0 && Rand(0, 2) != 0) {
      buffers_->Take(found);
      busy[found] = true;
      turn = (found + 1) % n;
      ASSERT_TRUE(buffers_->slot(found).busy);
    } else {
      const int i = static_cast<int>(Rand(0, n - 1));
      busy[i] = false;
      buffers_->slot(i).busy = false;
    }
    int expected_busy = 0;
    for (bool b : busy) expected_busy += b;
    ASSERT_EQ(buffers_->num_busy(), expected_busy) << "step " << step;
  }

  // One plan at a time (taken, then freed, as a plan committed before the
  // next Reserve): every slot in turn, so a slot is rewritten only every n
  // plans.
  for (int i = 0; i < n; ++i) buffers_->slot(i).busy = false;
  const int first = buffers_->FindFree();
  ASSERT_GE(first, 0);
  for (int k = 0; k < 3 * n; ++k) {
    const int slot = buffers_->FindFree();
    ASSERT_EQ(slot, (first + k) % n) << "plan " << k;
    buffers_->Take(slot);
    buffers_->slot(slot).busy = false;
  }
}

TEST_F(StepBuffersTest, UploadWritesExactlyTheSlotsAndPairs) {
  const int n = static_cast<int>(Rand(2, 6));
  Make(n, Rand(1, 64), Rand(1, 16));
  // Each slot's expected device contents.
  std::vector<std::vector<int64_t>> expected(
      n, std::vector<int64_t>(max_tokens_ + 2 * max_copies_, kSentinel));
  for (int round = 0; round < 40; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const int index = static_cast<int>(Rand(0, n - 1));
    std::vector<int64_t> slots(Rand(0, max_tokens_));
    for (int64_t& s : slots) s = Rand(-1, int64_t{1} << 40);
    std::vector<BlockCopy> copies(Rand(0, max_copies_));
    for (BlockCopy& c : copies) {
      c.src = static_cast<BlockId>(Rand(0, INT32_MAX));
      c.dst = static_cast<BlockId>(Rand(0, INT32_MAX));
    }
    ASSERT_TRUE(
        buffers_->Upload(index, slots, copies, /*stream=*/nullptr).ok());
    EXPECT_FALSE(buffers_->slot(index).busy) << "Upload does not take a slot";
    std::copy(slots.begin(), slots.end(), expected[index].begin());
    for (size_t i = 0; i < copies.size(); ++i) {
      expected[index][max_tokens_ + 2 * i] = copies[i].src;
      expected[index][max_tokens_ + 2 * i + 1] = copies[i].dst;
    }
    for (int i = 0; i < n; ++i) {
      ASSERT_EQ(ReadBack(i), expected[i]) << "slot " << i;
    }
    // The accessors point at the two parts of the slot's device buffer.
    EXPECT_EQ(buffers_->device_slots(index),
              buffers_->slot(index).device.as<int64_t>());
    EXPECT_EQ(buffers_->device_pairs(index),
              buffers_->slot(index).device.as<int64_t>() + max_tokens_);
    // Read the uploaded data back through the accessors too.
    std::vector<int64_t> got_slots(slots.size());
    std::vector<int64_t> got_pairs(2 * copies.size());
    ASSERT_TRUE(device_
                    ->CopyToHost(got_slots.data(),
                                 buffers_->device_slots(index),
                                 got_slots.size() * sizeof(int64_t))
                    .ok());
    ASSERT_TRUE(device_
                    ->CopyToHost(got_pairs.data(),
                                 buffers_->device_pairs(index),
                                 got_pairs.size() * sizeof(int64_t))
                    .ok());
    EXPECT_EQ(got_slots, slots);
    for (size_t i = 0; i < copies.size(); ++i) {
      EXPECT_EQ(got_pairs[2 * i], copies[i].src) << "pair " << i;
      EXPECT_EQ(got_pairs[2 * i + 1], copies[i].dst) << "pair " << i;
    }
  }
}

TEST_F(StepBuffersTest, UploadAtCapacityFillsTheWholeSlot) {
  Make(1, Rand(1, 32), Rand(1, 8));
  std::vector<int64_t> slots(max_tokens_);
  for (int64_t& s : slots) s = Rand(INT64_MIN, INT64_MAX);
  std::vector<BlockCopy> copies(max_copies_);
  for (BlockCopy& c : copies) {
    c.src = static_cast<BlockId>(Rand(INT32_MIN, INT32_MAX));
    c.dst = static_cast<BlockId>(Rand(INT32_MIN, INT32_MAX));
  }
  ASSERT_TRUE(buffers_->Upload(0, slots, copies, nullptr).ok());
  std::vector<int64_t> expected = slots;
  for (const BlockCopy& c : copies) {
    expected.push_back(c.src);
    expected.push_back(c.dst);
  }
  EXPECT_EQ(ReadBack(0), expected);
}

TEST_F(StepBuffersTest, UploadRefusesMoreThanTheCapacityAndChangesNothing) {
  const int n = static_cast<int>(Rand(1, 4));
  Make(n, Rand(1, 32), Rand(1, 8));
  const int index = static_cast<int>(Rand(0, n - 1));
  // A valid upload first, so the slot holds data of its own.
  std::vector<int64_t> slots(max_tokens_);
  for (int64_t& s : slots) s = Rand(0, 1 << 20);
  std::vector<BlockCopy> copies(max_copies_);
  for (BlockCopy& c : copies) {
    c.src = static_cast<BlockId>(Rand(0, 1 << 20));
    c.dst = static_cast<BlockId>(Rand(0, 1 << 20));
  }
  ASSERT_TRUE(buffers_->Upload(index, slots, copies, nullptr).ok());
  std::vector<std::vector<int64_t>> before;
  std::vector<std::vector<int64_t>> staging_before;
  for (int i = 0; i < n; ++i) {
    before.push_back(ReadBack(i));
    const int64_t* staged = buffers_->slot(i).staging.as<int64_t>();
    staging_before.emplace_back(staged, staged + max_tokens_ + 2 * max_copies_);
  }

  struct Case {
    int64_t tokens, copies;
  };
  const int64_t extra_tokens = Rand(1, 8), extra_copies = Rand(1, 8);
  for (const Case& c :
       {Case{max_tokens_ + extra_tokens, 0},
        Case{0, max_copies_ + extra_copies},
        Case{max_tokens_ + extra_tokens, max_copies_},
        Case{max_tokens_, max_copies_ + extra_copies},
        Case{max_tokens_ + extra_tokens, max_copies_ + extra_copies}}) {
    SCOPED_TRACE(absl::StrCat(c.tokens, " tokens, ", c.copies, " copies"));
    std::vector<int64_t> big_slots(c.tokens);
    for (int64_t& s : big_slots) s = Rand(0, 1 << 20);
    std::vector<BlockCopy> big_copies(c.copies);
    for (BlockCopy& p : big_copies) {
      p.src = static_cast<BlockId>(Rand(0, 1 << 20));
      p.dst = static_cast<BlockId>(Rand(0, 1 << 20));
    }
    const absl::Status s =
        buffers_->Upload(index, big_slots, big_copies, nullptr);
    ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    const std::string msg(s.message());
    EXPECT_NE(msg.find(absl::StrCat(c.tokens, " tokens")), std::string::npos)
        << msg;
    EXPECT_NE(msg.find(absl::StrCat(c.copies, " block copies")),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find(absl::StrCat("(", max_tokens_, " tokens, ", max_copies_,
                                    " copies)")),
              std::string::npos)
        << msg;
    EXPECT_FALSE(buffers_->slot(index).busy);
    for (int i = 0; i < n; ++i) {
      EXPECT_EQ(ReadBack(i), before[i]) << "device buffer of slot " << i;
      const int64_t* staged = buffers_->slot(i).staging.as<int64_t>();
      EXPECT_EQ(
          std::vector<int64_t>(staged, staged + max_tokens_ + 2 * max_copies_),
          staging_before[i])
          << "staging buffer of slot " << i;
    }
  }
}

// A CPU device that logs the stream of every event record and wait.
class LoggingDevice : public Device {
 public:
  explicit LoggingDevice(std::unique_ptr<Device> base)
      : base_(std::move(base)) {}
  DeviceKind kind() const override { return base_->kind(); }
  int ordinal() const override { return 0; }
  absl::StatusOr<Buffer> Allocate(size_t bytes) override {
    return base_->Allocate(bytes);
  }
  absl::StatusOr<Buffer> AllocateStaging(size_t bytes) override {
    return base_->AllocateStaging(bytes);
  }
  absl::Status Zero(void* dst, size_t bytes) override {
    return base_->Zero(dst, bytes);
  }
  absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes,
                                 void* stream) override {
    return base_->CopyToDeviceAsync(dst, src, bytes, stream);
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    return base_->CopyToHost(dst, src, bytes);
  }
  absl::StatusOr<Event> CreateEvent() override { return base_->CreateEvent(); }
  absl::Status RecordEvent(const Event& event, void* stream) override {
    log.push_back(absl::StrCat("record on ", Name(stream)));
    return base_->RecordEvent(event, stream);
  }
  absl::Status StreamWaitEvent(void* stream, const Event& event) override {
    log.push_back(absl::StrCat("wait on ", Name(stream)));
    return base_->StreamWaitEvent(stream, event);
  }
  absl::Status SynchronizeEvent(const Event& event) override {
    return base_->SynchronizeEvent(event);
  }
  absl::Status SynchronizeStream(void* stream) override {
    return base_->SynchronizeStream(stream);
  }
  absl::StatusOr<Event> CreateTimingEvent() override {
    return base_->CreateTimingEvent();
  }
  absl::StatusOr<float> ElapsedMs(const Event& a, const Event& b) override {
    return base_->ElapsedMs(a, b);
  }
  absl::Status MemoryInfo(size_t* free_bytes, size_t* total_bytes) override {
    return base_->MemoryInfo(free_bytes, total_bytes);
  }
  static std::string Name(void* stream) {
    return stream == nullptr ? "default" : static_cast<const char*>(stream);
  }
  std::vector<std::string> log;

 private:
  std::unique_ptr<Device> base_;
};

// Readers on the stream that uploaded a slot need no event; the next write
// from another stream records one on the readers' stream and waits for it.
TEST(StepBuffersStreamsTest, SameStreamReadersAreOrderedWithoutEvents) {
  static char a[] = "A", b[] = "B";
  LoggingDevice device(CreateCpuDevice());
  auto buffers = StepBuffers::Create(&device, 1, 8, 2);
  ASSERT_TRUE(buffers.ok()) << buffers.status();
  StepBuffers& sb = **buffers;
  const std::vector<int64_t> slots = {1, 2, 3};
  ASSERT_TRUE(sb.Upload(0, slots, {}, a).ok());
  EXPECT_TRUE(sb.SameStreamAsWrite(0, a));
  EXPECT_FALSE(sb.SameStreamAsWrite(0, b));
  sb.NoteReader(0, a);
  // Another upload on A: stream order covers A's readers.
  device.log.clear();
  ASSERT_TRUE(sb.Upload(0, slots, {}, a).ok());
  EXPECT_EQ(device.log, (std::vector<std::string>{"wait on A", "record on A"}));
  sb.NoteReader(0, a);
  // An upload on B must wait for A's unrecorded readers.
  device.log.clear();
  ASSERT_TRUE(sb.Upload(0, slots, {}, b).ok());
  EXPECT_EQ(device.log, (std::vector<std::string>{"wait on B", "record on A",
                                                  "wait on B", "record on B"}));
  EXPECT_TRUE(sb.SameStreamAsWrite(0, b));
  EXPECT_FALSE(sb.SameStreamAsWrite(0, a));
  // A reader on A now (not the writer's stream): the full protocol, and a
  // later same-stream reader on B does not hide it.
  sb.NoteReader(0, b);
  EXPECT_FALSE(sb.SameStreamAsWrite(0, a));
  // Pad from A after B's unrecorded readers: records on B, waits on A.
  device.log.clear();
  ASSERT_TRUE(sb.Pad(0, 1, 1, a).ok());
  EXPECT_EQ(device.log,
            (std::vector<std::string>{"wait on A", "record on B", "wait on A",
                                      "wait on A", "record on A"}));
  EXPECT_TRUE(sb.SameStreamAsWrite(0, a));
}

}  // namespace
}  // namespace kvcache::internal
