// Allocation-failure injection. Device allocations (Allocate, AllocateStaging,
// CreateEvent) fail in turn through a FailingDevice handed to
// KVCacheManagerTestPeer::CreateWithDevice; host allocations (operator new,
// i.e. every std container and string) fail in turn through a replacement of
// the global operator new in this test binary that throws std::bad_alloc at an
// armed allocation. Each failure must come back as a status (never an
// exception or a crash), leave the manager as it was (Validate() holds and the
// sequences, block tables and metrics are unchanged) and usable, and leak
// nothing (run under --config=asan: the replacement allocates with malloc, so
// LeakSanitizer still sees every block).

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "api/kvcache_c.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/kv_reference.h"

// ---- Host allocation failure: a replacement global operator new ----

namespace {

// Allocations left before the armed one fails; < 0 when disarmed.
std::atomic<int64_t> g_countdown{-1};
std::atomic<bool> g_fired{false};

void* Allocate(std::size_t size) {
  if (g_countdown.load(std::memory_order_relaxed) >= 0 &&
      g_countdown.fetch_sub(1) == 0) {
    g_fired = true;
    throw std::bad_alloc();
  }
  void* p = std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

// Fails the k-th host allocation (0-based) from now on, once.
void ArmHost(int64_t k) {
  g_fired = false;
  g_countdown = k;
}
// Disarms; true when the armed allocation failed.
bool DisarmHost() {
  g_countdown = -1;
  return g_fired.exchange(false);
}

}  // namespace

void* operator new(std::size_t size) { return Allocate(size); }
void* operator new[](std::size_t size) { return Allocate(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace kvcache {
namespace {

using testing::ExtendPrefixHash;
using testing::FloatToBf16;
using testing::QuantizeDequantizeHead;
using testing::SyntheticRow;

// ---- Device allocation failure ----

// Forwards to the CPU device; fails the fail_at-th allocation point
// (Allocate, AllocateStaging or CreateEvent; 0-based) and counts them all.
class FailingDevice final : public Device {
 public:
  FailingDevice(int64_t fail_at, int64_t* count)
      : inner_(CreateCpuDevice()), fail_at_(fail_at), count_(count) {}

  DeviceKind kind() const override { return inner_->kind(); }
  int ordinal() const override { return inner_->ordinal(); }
  absl::StatusOr<Buffer> Allocate(size_t bytes) override {
    if (Fail()) return absl::ResourceExhaustedError("injected: Allocate");
    return inner_->Allocate(bytes);
  }
  absl::StatusOr<Buffer> AllocateStaging(size_t bytes) override {
    if (Fail()) {
      return absl::ResourceExhaustedError("injected: AllocateStaging");
    }
    return inner_->AllocateStaging(bytes);
  }
  absl::StatusOr<Event> CreateEvent() override {
    if (Fail()) return absl::InternalError("injected: CreateEvent");
    return inner_->CreateEvent();
  }
  absl::StatusOr<Event> CreateTimingEvent() override {
    if (Fail()) return absl::InternalError("injected: CreateTimingEvent");
    return inner_->CreateTimingEvent();
  }
  absl::StatusOr<float> ElapsedMs(const Event& start,
                                  const Event& end) override {
    return inner_->ElapsedMs(start, end);
  }
  absl::Status Zero(void* dst, size_t bytes) override {
    return inner_->Zero(dst, bytes);
  }
  absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes,
                                 void* stream) override {
    return inner_->CopyToDeviceAsync(dst, src, bytes, stream);
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    return inner_->CopyToHost(dst, src, bytes);
  }
  absl::Status RecordEvent(const Event& e, void* stream) override {
    return inner_->RecordEvent(e, stream);
  }
  absl::Status StreamWaitEvent(void* stream, const Event& e) override {
    return inner_->StreamWaitEvent(stream, e);
  }
  absl::Status SynchronizeEvent(const Event& e) override {
    return inner_->SynchronizeEvent(e);
  }
  absl::Status SynchronizeStream(void* stream) override {
    return inner_->SynchronizeStream(stream);
  }
  absl::Status MemoryInfo(size_t* free_bytes, size_t* total_bytes) override {
    return inner_->MemoryInfo(free_bytes, total_bytes);
  }

 private:
  bool Fail() { return (*count_)++ == fail_at_; }

  std::unique_ptr<Device> inner_;
  const int64_t fail_at_;
  int64_t* const count_;
};

KVCacheConfig SmallConfig() {
  KVCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_size = 16;
  c.block_size = 4;
  c.cache_dtype = DType::kInt8;
  c.input_dtype = DType::kBFloat16;
  c.num_blocks = 12;
  c.max_tokens_per_step = 64;
  c.max_sequences_per_step = 4;
  c.max_inflight_plans = 3;
  return c;
}

// Creates a manager on a FailingDevice; with `host_fail_at` >= 0, the
// host_fail_at-th host allocation inside Create fails (*host_fired tells
// whether it was reached).
absl::StatusOr<std::unique_ptr<KVCacheManager>> CreateOn(
    int64_t fail_at, int64_t* count, int64_t host_fail_at = -1,
    bool* host_fired = nullptr) {
  const KVCacheConfig config = SmallConfig();
  auto device = std::make_unique<FailingDevice>(fail_at, count);
  if (host_fail_at >= 0) ArmHost(host_fail_at);
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
      KVCacheManagerTestPeer::CreateWithDevice(config, std::move(device));
  const bool fired = DisarmHost();
  if (host_fired != nullptr) *host_fired = fired;
  return m;
}

TEST(AllocationFailureTest, EveryDeviceAllocationOfCreate) {
  int64_t points = 0;
  ASSERT_TRUE(CreateOn(-1, &points).ok());
  // 2 layer caches, 3 plan slots x (staging, device, 3 events), block table
  // 2 x (staging + event) + device, 2 gather ranges x (staging, event,
  // device, event).
  EXPECT_EQ(points, 2 + 3 * 5 + 5 + 2 * 4);
  for (int64_t i = 0; i < points; ++i) {
    int64_t count = 0;
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m = CreateOn(i, &count);
    ASSERT_FALSE(m.ok()) << "allocation point " << i << " failed unnoticed";
    EXPECT_TRUE(absl::IsResourceExhausted(m.status()) ||
                absl::IsInternal(m.status()))
        << m.status();
    EXPECT_NE(m.status().message().find("injected"), std::string::npos)
        << m.status();
  }
  std::printf("device allocation points of Create: %lld, each failed once\n",
              static_cast<long long>(points));
}

TEST(AllocationFailureTest, EveryHostAllocationOfCreate) {
  int64_t failed = 0, absorbed = 0, k = 0;
  for (;; ++k) {
    int64_t count = 0;
    bool fired = false;
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        CreateOn(-1, &count, k, &fired);
    if (!fired) {
      ASSERT_TRUE(m.ok()) << m.status();
      break;
    }
    if (m.ok()) {
      // Only the capacity log line may absorb a failure (spdlog catches
      // its own exceptions); the manager must be complete.
      ++absorbed;
      EXPECT_TRUE((*m)->Validate().ok());
    } else {
      ++failed;
      EXPECT_TRUE(absl::IsResourceExhausted(m.status())) << m.status();
    }
  }
  std::printf(
      "host allocations of Create: %lld (%lld returned a status, "
      "%lld absorbed by logging)\n",
      static_cast<long long>(k), static_cast<long long>(failed),
      static_cast<long long>(absorbed));
  EXPECT_GT(failed, 0);
}

// ---- Failures during operation ----

struct RefSeq {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> hash;
  int64_t computed = 0;
  void Push(int32_t t) {
    tokens.push_back(t);
    hash.push_back(ExtendPrefixHash(hash.empty() ? 0 : hash.back(), t));
  }
};

struct Snapshot {
  MetricsSnapshot m;
  std::map<int64_t, std::pair<int64_t, std::vector<BlockId>>> seqs;
  bool operator==(const Snapshot& o) const {
    const MetricsSnapshot& a = m;
    const MetricsSnapshot& b = o.m;
    return a.blocks_free == b.blocks_free &&
           a.blocks_cached == b.blocks_cached &&
           a.blocks_in_use == b.blocks_in_use && a.sequences == b.sequences &&
           a.plans_in_flight == b.plans_in_flight &&
           a.prefix_queries == b.prefix_queries &&
           a.prefix_hit_tokens == b.prefix_hit_tokens &&
           a.evictions == b.evictions &&
           a.tokens_appended == b.tokens_appended &&
           a.tokens_committed == b.tokens_committed &&
           a.kernel_launches == b.kernel_launches &&
           a.block_copies == b.block_copies && seqs == o.seqs;
  }
};

class OperationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        CreateOn(-1, &device_points_);
    ASSERT_TRUE(m.ok()) << m.status();
    m_ = *std::move(m);
    created_points_ = device_points_;
  }

  Snapshot Take() {
    Snapshot s;
    s.m = m_->Metrics();
    for (const auto& [id, seq] : seqs_) {
      s.seqs[id] = {*m_->SequenceLength(id), *m_->BlockTable(id)};
    }
    return s;
  }

  // Runs `op` with the k-th host allocation failing, for k = 0, 1, ... until
  // it runs without reaching the armed allocation; every failed attempt must
  // return ResourceExhausted and change nothing. Returns the final status.
  absl::Status Inject(const std::string& name,
                      const std::function<absl::Status()>& op) {
    for (int64_t k = 0;; ++k) {
      const Snapshot before = Take();
      ArmHost(k);
      absl::Status s = op();
      const bool fired = DisarmHost();
      if (!fired) {
        points_[name] += k;
        return s;
      }
      EXPECT_TRUE(absl::IsResourceExhausted(s))
          << name << " with host allocation " << k << " failing: " << s;
      EXPECT_TRUE(m_->Validate().ok()) << name << " k=" << k;
      EXPECT_TRUE(before == Take()) << name << " with host allocation " << k
                                    << " failing changed the manager";
      if (::testing::Test::HasFailure()) return absl::InternalError("failed");
    }
  }

  absl::Status Add(int64_t id, std::vector<int32_t> tokens) {
    RefSeq seq;
    for (int32_t t : tokens) seq.Push(t);
    absl::StatusOr<int64_t> computed = absl::UnknownError("");
    absl::Status s = Inject("AddSequence", [&] {
      computed = m_->AddSequence(id, seq.tokens);
      return computed.status();
    });
    if (!s.ok()) return s;
    seq.computed = *computed;
    seqs_[id] = seq;
    return absl::OkStatus();
  }

  // One step of `ids` (each: its pending tokens, or one new token).
  absl::Status Step(const std::vector<int64_t>& ids) {
    std::vector<ReserveRequest> batch;
    for (int64_t id : ids) {
      RefSeq& seq = seqs_[id];
      ReserveRequest r;
      r.sequence = id;
      r.num_tokens = static_cast<int64_t>(seq.tokens.size()) - seq.computed;
      if (r.num_tokens == 0) {
        r.new_token_ids = {static_cast<int32_t>(id * 7 + seq.computed)};
        r.num_tokens = 1;
      }
      batch.push_back(r);
    }
    absl::StatusOr<StepPlanInfo> plan = absl::UnknownError("");
    if (absl::Status s = Inject("Reserve",
                                [&] {
                                  plan = m_->Reserve(batch);
                                  return plan.status();
                                });
        !s.ok()) {
      return s;
    }
    std::vector<std::pair<int64_t, int64_t>> rows;
    for (const ReserveRequest& r : batch) {
      RefSeq& seq = seqs_[r.sequence];
      for (int32_t t : r.new_token_ids) seq.Push(t);
      for (int64_t i = 0; i < r.num_tokens; ++i) {
        rows.emplace_back(r.sequence, seq.computed + i);
      }
    }
    const int h = 2, d = 16;
    const int64_t n = static_cast<int64_t>(rows.size());
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<uint16_t> k(n * h * d), v(n * h * d);
      for (int64_t i = 0; i < n; ++i) {
        const uint64_t hash = seqs_[rows[i].first].hash[rows[i].second];
        std::vector<float> kr = SyntheticRow(1, layer, false, hash, h, d);
        std::vector<float> vr = SyntheticRow(1, layer, true, hash, h, d);
        for (int j = 0; j < h * d; ++j) {
          k[i * h * d + j] = FloatToBf16(kr[j]);
          v[i * h * d + j] = FloatToBf16(vr[j]);
        }
      }
      const TensorView kv =
          TensorView::Contiguous(k.data(), DType::kBFloat16, {n, h, d});
      const TensorView vv =
          TensorView::Contiguous(v.data(), DType::kBFloat16, {n, h, d});
      if (absl::Status s = Inject(
              "Append", [&] { return m_->Append(plan->id, layer, kv, vv); });
          !s.ok()) {
        return s;
      }
    }
    if (absl::Status s = Inject("Commit", [&] { return m_->Commit(plan->id); });
        !s.ok()) {
      return s;
    }
    for (const ReserveRequest& r : batch) {
      seqs_[r.sequence].computed += r.num_tokens;
    }
    return absl::OkStatus();
  }

  absl::Status Verify(int64_t id) {
    const RefSeq& seq = seqs_.at(id);
    const int h = 2, d = 16;
    const int64_t t = seq.computed;
    std::vector<float> k(t * h * d), v(t * h * d);
    for (int layer = 0; layer < 2; ++layer) {
      absl::Status s = Inject("Gather", [&] {
        return m_->Gather(
            id, layer, 0, t,
            TensorView::Contiguous(k.data(), DType::kFloat32, {t, h, d}),
            TensorView::Contiguous(v.data(), DType::kFloat32, {t, h, d}));
      });
      if (!s.ok()) return s;
      for (int64_t pos = 0; pos < t; ++pos) {
        for (bool is_value : {false, true}) {
          std::vector<float> row =
              SyntheticRow(1, layer, is_value, seq.hash[pos], h, d);
          for (int head = 0; head < h; ++head) {
            std::vector<float> q = QuantizeDequantizeHead(
                std::vector<float>(row.begin() + head * d,
                                   row.begin() + (head + 1) * d),
                DType::kInt8);
            const float* got =
                (is_value ? v.data() : k.data()) + (pos * h + head) * d;
            for (int j = 0; j < d; ++j) {
              if (got[j] != q[j]) {
                return absl::InternalError(
                    absl::StrCat("sequence ", id, " layer ", layer, " token ",
                                 pos, " differs"));
              }
            }
          }
        }
      }
    }
    return absl::OkStatus();
  }

  std::unique_ptr<KVCacheManager> m_;
  int64_t device_points_ = 0, created_points_ = 0;
  std::map<int64_t, RefSeq> seqs_;
  std::map<std::string, int64_t> points_;
};

TEST_F(OperationTest, EveryHostAllocationDuringOperation) {
  const std::vector<int32_t> prefix = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  ASSERT_TRUE(Add(1, prefix).ok());
  ASSERT_TRUE(Step({1}).ok());
  // Shares the first two blocks of sequence 1 (prefix cache).
  ASSERT_TRUE(Add(2, {1, 2, 3, 4, 5, 6, 7, 8, 20, 21}).ok());
  EXPECT_EQ(seqs_[2].computed, 8);
  ASSERT_TRUE(Step({1, 2}).ok());
  // Fork: the child shares a partial last block, copied on write.
  ASSERT_TRUE(Inject("Fork", [&] { return m_->Fork(1, 3); }).ok());
  seqs_[3] = seqs_[1];
  ASSERT_TRUE(Step({1, 3}).ok());
  ASSERT_TRUE(Step({2, 3}).ok());
  for (int64_t id : {1, 2, 3}) ASSERT_TRUE(Verify(id).ok());
  ASSERT_TRUE(
      Inject("BlockTable", [&] { return m_->BlockTable(2).status(); }).ok());
  ASSERT_TRUE(Inject("BatchBlockTable", [&] {
                return m_->BatchBlockTable({1, 2, 3}).status();
              }).ok());
  {
    // Arguments are built outside the injected call: only the manager's own
    // allocations may fail.
    std::vector<ReserveRequest> batch(1);
    batch[0].sequence = 2;
    batch[0].new_token_ids = {5};
    batch[0].num_tokens = 1;
    ASSERT_TRUE(
        Inject("CanReserve", [&] { return m_->CanReserve(batch); }).ok());
  }
  // Abort of a plan after a failing Reserve.
  {
    std::vector<ReserveRequest> batch(1);
    batch[0].sequence = 2;
    batch[0].new_token_ids = {9, 9};
    batch[0].num_tokens = 2;
    absl::StatusOr<StepPlanInfo> plan = absl::UnknownError("");
    ASSERT_TRUE(Inject("Reserve", [&] {
                  plan = m_->Reserve(batch);
                  return plan.status();
                }).ok());
    ASSERT_TRUE(Inject("Abort", [&] { return m_->Abort(plan->id); }).ok());
  }
  ASSERT_TRUE(Inject("Free", [&] { return m_->Free(1); }).ok());
  seqs_.erase(1);
  // Evicts cached blocks of sequence 1 to make room.
  ASSERT_TRUE(Add(4, {30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40}).ok());
  ASSERT_TRUE(Step({4}).ok());
  for (int64_t id : {2, 3, 4}) ASSERT_TRUE(Verify(id).ok());
  // MetricsText cannot return a status: on failure it is empty.
  ArmHost(0);
  const std::string text = m_->MetricsText();
  EXPECT_TRUE(DisarmHost());
  EXPECT_TRUE(text.empty());
  EXPECT_FALSE(m_->MetricsText().empty());
  EXPECT_TRUE(m_->Validate().ok());
  // By design, operation allocates nothing on the device (fixed buffers).
  EXPECT_EQ(device_points_, created_points_);
  int64_t total = 0;
  for (const auto& [name, n] : points_) {
    std::printf("%s: %lld host allocations failed in turn\n", name.c_str(),
                static_cast<long long>(n));
    total += n;
  }
  std::printf(
      "total: %lld injected host allocation failures during "
      "operation\n",
      static_cast<long long>(total));
  EXPECT_GT(points_["Reserve"], 0);
  EXPECT_GT(points_["Commit"], 0);
  EXPECT_GT(points_["AddSequence"], 0);
  EXPECT_GT(points_["Fork"], 0);
}

// ---- The C API: no std::bad_alloc unwinds into C ----

// Runs `call` with each of its host allocations failing in turn: an
// exception escaping would fail the test; every failure must be
// KVCACHE_RESOURCE_EXHAUSTED. Returns the number of allocations failed.
template <typename F>
int64_t FailEachHostAllocation(F call) {
  for (int64_t k = 0;; ++k) {
    ArmHost(k);
    const kvcache_status s = call();
    const bool fired = DisarmHost();
    if (!fired) {
      EXPECT_EQ(s, KVCACHE_OK);
      return k;
    }
    if (s != KVCACHE_OK) {
      EXPECT_EQ(s, KVCACHE_RESOURCE_EXHAUSTED) << k;
    }
  }
}

TEST(AllocationFailureTest, CApiReturnsResourceExhausted) {
  kvcache_config c;
  kvcache_config_init(&c);
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_size = 16;
  c.block_size = 4;
  c.num_blocks = 32;
  kvcache_manager* m = nullptr;
  const int64_t create_points = FailEachHostAllocation([&] {
    kvcache_destroy(m);
    m = nullptr;
    return kvcache_create(&c, &m);
  });
  ASSERT_NE(m, nullptr);
  int64_t next_id = 0, added = 0;
  const int32_t prompt[6] = {1, 2, 3, 4, 5, 6};
  const int64_t add_points = FailEachHostAllocation([&] {
    const kvcache_status s = kvcache_add_sequence(
        m, next_id, prompt, 6, 0, reinterpret_cast<const uint8_t*>("tenant"), 6,
        nullptr);
    if (s == KVCACHE_OK) ++added, ++next_id;
    return s;
  });
  EXPECT_EQ(added, 1);
  kvcache_plan plan = KVCACHE_STRUCT_INIT(kvcache_plan);
  const int32_t extra[1] = {7};
  kvcache_reserve_request r = {sizeof(kvcache_reserve_request), 0, 6, extra, 1};
  int64_t reserved = 0;
  const int64_t reserve_points = FailEachHostAllocation([&] {
    const kvcache_status s = kvcache_reserve(m, &r, 1, nullptr, &plan);
    if (s == KVCACHE_OK) ++reserved;
    return s;
  });
  EXPECT_EQ(reserved, 1);
  EXPECT_EQ(kvcache_abort(m, plan.id), KVCACHE_OK);
  EXPECT_EQ(kvcache_validate(m), KVCACHE_OK);
  kvcache_destroy(m);
  std::printf(
      "C API: %lld host allocations of kvcache_create, %lld of "
      "kvcache_add_sequence, %lld of kvcache_reserve failed in turn\n",
      static_cast<long long>(create_points), static_cast<long long>(add_points),
      static_cast<long long>(reserve_points));
  EXPECT_GT(create_points, 0);
  EXPECT_GT(reserve_points, 0);
}

}  // namespace
}  // namespace kvcache
