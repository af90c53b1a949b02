// libFuzzer target: decodes its input into a tiny KVCacheManager (CPU backend)
// and a sequence of manager calls with valid and hostile arguments. After every
// call: Validate() holds; a failed call left the manager as it was (metrics
// except reserve_failures, sequence lengths and block tables); the sequences
// the call touched read back exactly the reference quantization of what was
// appended (testing/kv_reference.h); the KV events, drained every few calls
// from a queue small enough to overflow, have contiguous sequence numbers
// except where the drop counter says batches were dropped, and (while no
// batch is missing since the last AllBlocksCleared) rebuild exactly the
// manager's cached hashes per medium (device, host tier). Any violation
// aborts (a crash for libFuzzer). Built with clang
// -fsanitize=fuzzer,address,undefined under --config=fuzz, and as a plain
// library replayed by fuzz/replay_main.cc in the normal build. An input whose
// first byte is kGroupInputTag drives layer groups' allocator instead
// (fuzz/group_harness.h), and one whose first byte is kGroupManagerInputTag
// a KVCacheManager with layer groups (fuzz/group_manager_harness.h).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "dlpack/dlpack.h"
#include "fuzz/group_harness.h"
#include "fuzz/group_manager_harness.h"
#include "spdlog/sinks/null_sink.h"
#include "spdlog/spdlog.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

using testing::ExtendPrefixHash;
using testing::FloatToBf16;
using testing::QuantizeDequantizeHead;
using testing::SyntheticRow;

constexpr uint64_t kDataSeed = 7;
constexpr int kMaxOps = 64;
constexpr int64_t kHuge = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

// KVCACHE_FUZZ_TRACE=1 prints every call and its status (for triage).
bool Tracing() {
  static const bool on = std::getenv("KVCACHE_FUZZ_TRACE") != nullptr;
  return on;
}

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "manager_fuzzer: %s\n", what.c_str());
  std::abort();
}

class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  int Range(int n) { return Byte() % n; }  // [0, n)

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// The tenants' salts: none, one zero byte, and salts that differ only after a
// zero byte (a C string would make them equal).
const std::string& Salt(int i) {
  static const std::string salts[] = {
      "", std::string(1, '\0'), std::string("\0A", 2), std::string("\0B", 2),
      std::string("\0A\0", 3)};
  return salts[i];
}
constexpr int kNumSalts = 5;

struct RefSequence {
  int salt = 0;  // Index into Salt(): the reference data depends on it.
  std::vector<int32_t> tokens;
  std::vector<uint64_t> prefix_hash;
  int64_t computed = 0;
  uint64_t plan = 0;
};

// The sequence of a plan's row whose sequence was removed from the plan: the
// row is padding (zeros are appended for it).
constexpr int64_t kRemovedRow = std::numeric_limits<int64_t>::min() + 1;

struct RefPlan {
  std::vector<std::pair<int64_t, int64_t>> rows;  // (sequence, position)
  // Per request, in batch order: sequence, tokens reserved, first position,
  // and whether it was removed from the plan.
  std::vector<int64_t> batch, reserved, first;
  std::vector<bool> removed;
  std::vector<int64_t> appended;            // per layer
  std::map<int64_t, size_t> tokens_before;  // Abort drops new tokens.
};

struct Snapshot {
  MetricsSnapshot m;
  std::map<int64_t, std::pair<int64_t, std::vector<BlockId>>> seqs;
};

class Harness {
 public:
  Harness(Input& in) : in_(in) {}

  bool Init() {
    const uint8_t a = in_.Byte(), b = in_.Byte();
    config_.num_layers = 2;
    config_.num_kv_heads = 1 + (a & 1);
    config_.head_size = (a & 2) ? 16 : 8;
    config_.head_size_v = (a & 4) ? 8 : 0;
    config_.block_size = 1 + ((a >> 3) & 3);
    config_.num_blocks = 8 + (b % 25);
    const DType dtypes[] = {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16};
    config_.cache_dtype = dtypes[(a >> 5) % 3];
    config_.input_dtype = DType::kBFloat16;
    // Inline scales for int8/fp8 when a >> 5 is 3, 4, 6 or 7; side otherwise.
    const bool quantized = IsQuantized(config_.cache_dtype);
    config_.scale_placement = quantized && (a >> 5) >= 3
                                  ? ScalePlacement::kInline
                                  : ScalePlacement::kSide;
    config_.enable_prefix_caching = (b & 0x80) == 0;
    // A host tier of 1-7 blocks behind the cache (with prefix caching).
    if ((b & 0xc0) == 0x40) {
      CheckHostileTier(a);
      config_.host_tier_bytes = (1 + b % 7) * *BlockBytesAllLayers(config_);
      // The offload policy: selection by hits (0-2), holding, and a budget
      // of one block or none.
      const int policy = (b >> 3) & 7;
      config_.tier_offload_min_hits = policy % 3;
      config_.tier_hold_offloads = (policy & 4) != 0;
      config_.tier_offload_max_in_flight_bytes =
          (policy & 1) != 0 ? *BlockBytesAllLayers(config_) : 0;
      // Offload ahead: the default (1/16 of the pool, at least 16: capped
      // at half the tier), off, or one or two blocks.
      config_.tier_offload_ahead_blocks = (a >> 1) % 4 - 1;
      // Copy thread blocks (CUDA only; range-checked everywhere): the copy
      // engines, one, the default, the most.
      const int32_t copy_blocks[] = {0, 1, 4, 1024};
      config_.tier_copy_thread_blocks = copy_blocks[(a >> 3) % 4];
    }
    config_.max_tokens_per_step = 48;
    config_.max_sequences_per_step = 4;
    config_.max_inflight_plans = 2;
    // KV events always (they change nothing else), in a queue of 1 to 3
    // batches drained every third call, so that it overflows.
    config_.enable_kv_events = true;
    config_.kv_events_queue_capacity = 1 + static_cast<int32_t>(b % 3);
    config_.graph_max_tokens = (b & 0x40) ? 8 : 0;
    // A logger that drops everything: Create's layout line on every input
    // would otherwise cost more than the input itself.
    config_.logger_name = "manager_fuzzer";
    if (spdlog::get(config_.logger_name) == nullptr) {
      spdlog::null_logger_mt(config_.logger_name);
    }
    hv_ = config_.head_size_v != 0 ? config_.head_size_v : config_.head_size;
    if (b & 0x40) CheckHostilePlacement(b);
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(config_);
    if (!m.ok()) Fail("Create: " + m.status().ToString());
    manager_ = *std::move(m);
    return true;
  }

  // Hostile host_tier_bytes and tier_copy_thread_blocks are refused by
  // name, never a crash.
  void CheckHostileTier(uint8_t a) {
    KVCacheConfig bad = config_;
    const int64_t hostile[] = {-1, 1, kMin, kHuge};
    bad.host_tier_bytes = hostile[a % 4];
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(bad);
    if (m.ok() || !absl::IsInvalidArgument(m.status()) ||
        m.status().message().find("host_tier_bytes") == std::string::npos) {
      Fail("hostile host_tier_bytes: " + m.status().ToString());
    }
    bad = config_;
    bad.host_tier_bytes = 4 * *BlockBytesAllLayers(config_);
    const int32_t hostile_blocks[] = {-1, 1025, INT32_MIN, INT32_MAX};
    bad.tier_copy_thread_blocks = hostile_blocks[(a >> 2) % 4];
    m = KVCacheManager::Create(bad);
    if (m.ok() || !absl::IsInvalidArgument(m.status()) ||
        m.status().message().find("tier_copy_thread_blocks") ==
            std::string::npos) {
      Fail("hostile tier_copy_thread_blocks: " + m.status().ToString());
    }
  }

  // A placement out of range, or inline with a bf16 cache, is refused by
  // name (and creates nothing).
  void CheckHostilePlacement(uint8_t b) const {
    KVCacheConfig bad = config_;
    if (IsQuantized(bad.cache_dtype)) {
      bad.scale_placement = static_cast<ScalePlacement>(
          (b & 1) ? 2 + (b & 0x3F) : -1 - (b & 0x3F));
    } else {
      bad.scale_placement = ScalePlacement::kInline;
    }
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(bad);
    if (m.ok() || !absl::IsInvalidArgument(m.status()) ||
        m.status().message().find("scale_placement") ==
            absl::string_view::npos) {
      Fail("Create with scale_placement " +
           std::to_string(static_cast<int32_t>(bad.scale_placement)) + ": " +
           m.status().ToString());
    }
  }

  void Run() {
    for (int op = 0; op < kMaxOps && !in_.empty(); ++op) {
      Step();
      if (op % 3 == 2) DrainEvents();
    }
    DrainEvents();
    for (const auto& [id, seq] : seqs_) Verify(id);
  }

 private:
  // A sequence id: mostly the small known range, sometimes hostile.
  int64_t Id() {
    const uint8_t b = in_.Byte();
    if (b < 240) return b % 6;
    const int64_t hostile[] = {-1, kHuge, std::numeric_limits<int64_t>::min(),
                               1000};
    return hostile[b % 4];
  }
  uint64_t PlanId() {
    const uint8_t b = in_.Byte();
    if (b < 200 && !plans_.empty()) {
      auto it = plans_.begin();
      std::advance(it, b % plans_.size());
      return it->first;
    }
    return b % 2 == 0 ? last_closed_plan_ : static_cast<uint64_t>(b) << 40;
  }

  Snapshot Take() const {
    Snapshot s;
    s.m = manager_->Metrics();
    for (int64_t id = 0; id < 6; ++id) {
      absl::StatusOr<int64_t> len = manager_->SequenceLength(id);
      absl::StatusOr<std::vector<BlockId>> table = manager_->BlockTable(id);
      if (len.ok() != table.ok()) Fail("lookups disagree");
      if (len.ok()) s.seqs[id] = {*len, *table};
    }
    return s;
  }
  static void Same(const Snapshot& a, const Snapshot& b, const char* call,
                   const absl::Status& status) {
    const MetricsSnapshot &x = a.m, &y = b.m;
    const bool same =
        x.blocks_free == y.blocks_free && x.blocks_cached == y.blocks_cached &&
        x.blocks_in_use == y.blocks_in_use && x.sequences == y.sequences &&
        x.plans_in_flight == y.plans_in_flight &&
        x.prefix_queries == y.prefix_queries &&
        x.prefix_query_tokens == y.prefix_query_tokens &&
        x.prefix_hit_tokens == y.prefix_hit_tokens &&
        x.evictions == y.evictions && x.tokens_appended == y.tokens_appended &&
        x.tokens_committed == y.tokens_committed &&
        x.kernel_launches == y.kernel_launches &&
        x.block_copies == y.block_copies &&
        x.kv_event_batches == y.kv_event_batches && a.seqs == b.seqs;
    if (!same) {
      Fail(std::string(call) + " failed (" + status.ToString() +
           ") but changed the manager");
    }
  }
  void Check(const char* call, const absl::Status& status,
             const Snapshot& before) {
    if (absl::Status v = manager_->Validate(); !v.ok()) {
      Fail(std::string("Validate after ") + call + ": " + v.ToString());
    }
    if (!status.ok()) Same(before, Take(), call, status);
  }

  void Push(RefSequence& s, int32_t token) {
    // Each salt starts its own chain, so tokens of different tenants carry
    // different data: a block shared across salts reads back wrong.
    const uint64_t parent =
        s.prefix_hash.empty()
            ? (s.salt == 0 ? 0 : testing::Mix(0x5a17 + s.salt))
            : s.prefix_hash.back();
    s.tokens.push_back(token);
    s.prefix_hash.push_back(ExtendPrefixHash(parent, token));
  }

  void Step() {
    const int op = in_.Range(14);
    const Snapshot before = Take();
    absl::Status status;
    const char* call = "?";
    switch (op) {
      case 0:
      case 1:
        call = "AddSequence";
        status = Add();
        break;
      case 2:
      case 3:
        call = "Reserve";
        status = Reserve();
        break;
      case 4:
        call = "Append";
        status = Append();
        break;
      case 5:
        call = "Append(hostile)";
        status = HostileAppend();
        break;
      case 6: {
        call = "Commit/Abort";
        const bool commit = in_.Byte() & 1;
        const uint64_t plan = PlanId();
        status = commit ? manager_->Commit(plan) : manager_->Abort(plan);
        if (Tracing()) {
          std::fprintf(stderr, "  %s plan %llu\n", commit ? "commit" : "abort",
                       static_cast<unsigned long long>(plan));
        }
        if (status.ok()) ClosePlan(plan, commit);
        break;
      }
      case 7: {
        call = "Fork";
        const int64_t parent = Id(), child = Id();
        status = manager_->Fork(parent, child);
        if (Tracing()) {
          std::fprintf(stderr, "  fork %lld -> %lld\n",
                       static_cast<long long>(parent),
                       static_cast<long long>(child));
        }
        if (status.ok()) {
          if (!seqs_.count(parent) || seqs_.count(child)) Fail("bad fork ok");
          seqs_[child] = seqs_[parent];
          Verify(child);
        }
        break;
      }
      case 8: {
        call = "Free";
        const int64_t id = Id();
        status = manager_->Free(id);
        if (Tracing()) {
          std::fprintf(stderr, "  free %lld\n", static_cast<long long>(id));
        }
        if (status.ok() && seqs_.erase(id) != 1) Fail("Free of unknown ok");
        break;
      }
      case 9:
        call = "Gather";
        status = Gather();
        break;
      case 10:
        call = "BatchBlockTable(read)";
        status = TableRead();
        break;
      case 11:
        call = "Append(DLPack)";
        status = DLPackAppend();
        break;
      case 12:
        call = "Append(overflow)";
        status = OverflowAppend();
        break;
      default:  // One byte picks a lookup or a call of speculative decoding.
        switch (in_.Range(8)) {
          case 5:
            call = "GraphStep";
            status = GraphStep();
            break;
          case 6:
            call = "GatherBatch";
            status = GatherBatch();
            break;
          case 7:
            call = "KnownLength";
            status = KnownLength();
            break;
          case 0:
            call = "lookup";
            status = Lookup();
            break;
          case 1:
            call = "Commit(accepted)";
            status = CommitAccepted();
            break;
          case 2:
            call = "RemoveFromPlan";
            status = RemoveFromPlan();
            break;
          case 3:
            call = "Truncate";
            status = Truncate();
            break;
          default:
            call = "PeekPrefix";
            status = PeekPrefix(before);
            break;
        }
        break;
    }
    if (Tracing()) {
      std::fprintf(stderr, "op %s -> %s\n", call, status.ToString().c_str());
    }
    Check(call, status, before);
  }

  absl::Status Add() {
    const int64_t id = Id();
    const int len = in_.Range(14);  // 0 = an empty prompt (hostile).
    RefSequence s;
    s.salt = in_.Range(kNumSalts);
    for (int i = 0; i < len; ++i) Push(s, in_.Range(3));
    ExtraKey extra;
    extra.salt = Salt(s.salt);
    // Odd lengths also ask where the hit came from (host tier or device).
    PrefixHits hits;
    absl::StatusOr<int64_t> computed =
        len % 2 == 1 ? manager_->AddSequence(id, s.tokens, extra, &hits)
                     : manager_->AddSequence(id, s.tokens, extra);
    if (!computed.ok()) return computed.status();
    if (len % 2 == 1 && (hits.device_tokens + hits.host_tokens != *computed ||
                         (config_.host_tier_bytes == 0 && hits.host_tokens))) {
      Fail("PrefixHits do not add up to the computed length");
    }
    if (seqs_.count(id) || len == 0) Fail("bad AddSequence succeeded");
    if (*computed < 0 || *computed >= len) Fail("bad computed length");
    s.computed = *computed;
    if (Tracing()) {
      std::fprintf(stderr, "  add %lld len %d computed %lld\n",
                   static_cast<long long>(id), len,
                   static_cast<long long>(s.computed));
    }
    seqs_[id] = s;
    Verify(id);
    return absl::OkStatus();
  }

  absl::Status Reserve() {
    const int n = 1 + in_.Range(3);
    std::vector<ReserveRequest> batch(n);
    for (ReserveRequest& r : batch) {
      r.sequence = Id();
      const uint8_t kind = in_.Byte();
      auto it = seqs_.find(r.sequence);
      const int64_t pending =
          it == seqs_.end() ? 1
                            : static_cast<int64_t>(it->second.tokens.size()) -
                                  it->second.computed;
      if (kind < 200) {
        if (pending > 0) {
          r.num_tokens = 1 + kind % pending;
        } else {
          r.new_token_ids.push_back(in_.Range(3));
          r.num_tokens = 1;
        }
      } else {
        const int64_t hostile[] = {0,     kMin,   pending + 1, kHuge,
                                   kHuge, -kHuge, 1 << 20,     kHuge / 2};
        r.num_tokens = hostile[kind % 8];
        if (kind & 8) r.new_token_ids.push_back(in_.Range(3));
      }
    }
    absl::StatusOr<StepPlanInfo> plan = manager_->Reserve(batch);
    if (!plan.ok()) return plan.status();
    RefPlan ref;
    ref.appended.assign(config_.num_layers, 0);
    for (const ReserveRequest& r : batch) {
      auto it = seqs_.find(r.sequence);
      if (it == seqs_.end() || it->second.plan != 0) Fail("bad Reserve ok");
      RefSequence& s = it->second;
      ref.tokens_before[r.sequence] = s.tokens.size();
      ref.batch.push_back(r.sequence);
      ref.reserved.push_back(r.num_tokens);
      ref.first.push_back(s.computed);
      ref.removed.push_back(false);
      for (int32_t t : r.new_token_ids) Push(s, t);
      for (int64_t k = 0; k < r.num_tokens; ++k) {
        ref.rows.emplace_back(r.sequence, s.computed + k);
      }
      s.plan = plan->id;
      if (Tracing()) {
        std::fprintf(
            stderr, "  reserve seq %lld tokens %lld new %zu plan %llu\n",
            static_cast<long long>(r.sequence),
            static_cast<long long>(r.num_tokens), r.new_token_ids.size(),
            static_cast<unsigned long long>(plan->id));
      }
    }
    if (static_cast<int64_t>(ref.rows.size()) != plan->num_tokens) {
      Fail("Reserve: token count");
    }
    plans_[plan->id] = std::move(ref);
    return absl::OkStatus();
  }

  void ClosePlan(uint64_t id, bool commit) {
    auto it = plans_.find(id);
    if (it == plans_.end()) Fail("commit/abort of an unknown plan ok");
    std::set<int64_t> touched;
    for (const auto& [seq, pos] : it->second.rows) {
      auto s = seqs_.find(seq);
      if (s == seqs_.end()) continue;
      s->second.plan = 0;
      if (commit) s->second.computed = std::max(s->second.computed, pos + 1);
      touched.insert(seq);
    }
    if (!commit) {
      for (const auto& [seq, size] : it->second.tokens_before) {
        auto q = seqs_.find(seq);
        if (q == seqs_.end()) continue;
        q->second.tokens.resize(size);
        q->second.prefix_hash.resize(size);
      }
    }
    plans_.erase(it);
    last_closed_plan_ = id;
    for (int64_t seq : touched) Verify(seq);
  }

  // Commit with accepted counts: mostly valid (all, none, some), at times
  // hostile (more than reserved, negative, huge, a wrong count of entries).
  absl::Status CommitAccepted() {
    const uint64_t id = PlanId();
    auto it = plans_.find(id);
    std::vector<int64_t> accepted;
    bool valid = it != plans_.end();
    if (it != plans_.end()) {
      const RefPlan& plan = it->second;
      for (size_t i = 0; i < plan.batch.size(); ++i) {
        const uint8_t b = in_.Byte();
        int64_t a = b < 200 ? b % (plan.reserved[i] + 1) : plan.reserved[i];
        if (b >= 240) {
          const int64_t hostile[] = {-1, plan.reserved[i] + 1, kHuge, kMin};
          a = hostile[b % 4];
          if (!plan.removed[i]) valid = false;  // Removed: ignored.
        }
        accepted.push_back(a);
      }
      for (int64_t done : plan.appended) {
        if (done != static_cast<int64_t>(plan.rows.size())) valid = false;
      }
    }
    if (const uint8_t b = in_.Byte(); b >= 240) {  // A wrong count.
      if (b & 1 || accepted.empty()) {
        accepted.push_back(0);
      } else {
        accepted.pop_back();
      }
      valid = false;
    }
    const absl::Status status = manager_->Commit(id, accepted);
    if (Tracing()) {
      std::fprintf(stderr, "  commit plan %llu with %zu accepted counts\n",
                   static_cast<unsigned long long>(id), accepted.size());
    }
    if (status.ok() != valid) Fail("Commit(accepted): " + status.ToString());
    if (!status.ok()) return status;
    const RefPlan& plan = it->second;
    std::vector<int64_t> touched;
    for (size_t i = 0; i < plan.batch.size(); ++i) {
      if (plan.removed[i]) continue;
      RefSequence& s = seqs_.at(plan.batch[i]);
      s.plan = 0;
      s.computed = plan.first[i] + accepted[i];
      if (accepted[i] < plan.reserved[i]) {  // Known tokens end there.
        s.tokens.resize(s.computed);
        s.prefix_hash.resize(s.computed);
      }
      touched.push_back(plan.batch[i]);
    }
    plans_.erase(it);
    last_closed_plan_ = id;
    for (int64_t seq : touched) Verify(seq);
    return status;
  }

  absl::Status RemoveFromPlan() {
    const uint64_t id = PlanId();
    auto it = plans_.find(id);
    int64_t seq = Id();
    if (it != plans_.end() && in_.Byte() < 200) {
      seq = it->second
                .batch[in_.Range(static_cast<int>(it->second.batch.size()))];
    }
    const absl::Status status = manager_->RemoveFromPlan(id, seq);
    if (Tracing()) {
      std::fprintf(stderr, "  remove seq %lld from plan %llu\n",
                   static_cast<long long>(seq),
                   static_cast<unsigned long long>(id));
    }
    if (!status.ok()) return status;
    if (it == plans_.end()) Fail("RemoveFromPlan of an unknown plan ok");
    RefPlan& plan = it->second;
    auto pos = std::find(plan.batch.begin(), plan.batch.end(), seq);
    if (pos == plan.batch.end() || plan.removed[pos - plan.batch.begin()]) {
      Fail("RemoveFromPlan of a sequence not in the plan ok");
    }
    plan.removed[pos - plan.batch.begin()] = true;
    for (auto& row : plan.rows) {
      if (row.first == seq) row.first = kRemovedRow;
    }
    RefSequence& s = seqs_.at(seq);
    s.plan = 0;
    s.tokens.resize(plan.tokens_before.at(seq));
    s.prefix_hash.resize(plan.tokens_before.at(seq));
    plan.tokens_before.erase(seq);  // Abort of the plan no longer touches it.
    Verify(seq);
    return status;
  }

  absl::Status Truncate() {
    const int64_t id = Id();
    auto it = seqs_.find(id);
    const int64_t computed = it == seqs_.end() ? 0 : it->second.computed;
    const uint8_t b = in_.Byte();
    int64_t n = computed - b % 6;
    if (b >= 230) {
      const int64_t hostile[] = {-1, computed + 1, kHuge, kMin, computed};
      n = hostile[b % 5];
    }
    const absl::Status status = manager_->Truncate(id, n);
    if (Tracing()) {
      std::fprintf(stderr, "  truncate %lld to %lld\n",
                   static_cast<long long>(id), static_cast<long long>(n));
    }
    const bool valid =
        it != seqs_.end() && it->second.plan == 0 && n >= 0 && n <= computed;
    if (status.ok() != valid) Fail("Truncate: " + status.ToString());
    if (!status.ok()) return status;
    RefSequence& s = it->second;
    s.computed = n;
    s.tokens.resize(n);
    s.prefix_hash.resize(n);
    Verify(id);
    return status;
  }

  // PeekPrefix changes nothing, succeeded or not.
  absl::Status PeekPrefix(const Snapshot& before) {
    RefSequence s;
    s.salt = in_.Range(kNumSalts);
    const int len = in_.Range(14);
    for (int i = 0; i < len; ++i) Push(s, in_.Range(3));
    ExtraKey extra;
    extra.salt = Salt(s.salt);
    absl::StatusOr<int64_t> cached = manager_->PeekPrefix(s.tokens, extra);
    if (cached.ok() != (len > 0))
      Fail("PeekPrefix: " + cached.status().ToString());
    if (cached.ok() && (*cached < 0 || *cached >= len))
      Fail("PeekPrefix: bad count");
    Same(before, Take(), "PeekPrefix", cached.status());
    return cached.status();
  }

  // Reference K/V rows [begin, begin + count) of a plan in one layer, bf16,
  // K and V interleaved per token (a fused-QKV-like layout).
  std::vector<uint16_t> Rows(const RefPlan& plan, int layer, int64_t begin,
                             int64_t count, int64_t* stride) const {
    const int h = config_.num_kv_heads;
    const int64_t kr = int64_t{h} * config_.head_size, vr = int64_t{h} * hv_;
    *stride = kr + vr;
    std::vector<uint16_t> out(count * *stride);
    for (int64_t i = 0; i < count; ++i) {
      const auto& [seq, pos] = plan.rows[begin + i];
      if (seq == kRemovedRow) continue;  // Padding: zeros.
      const uint64_t hash = seqs_.at(seq).prefix_hash[pos];
      std::vector<float> k =
          SyntheticRow(kDataSeed, layer, false, hash, h, config_.head_size);
      std::vector<float> v = SyntheticRow(kDataSeed, layer, true, hash, h, hv_);
      for (int64_t j = 0; j < kr; ++j) out[i * *stride + j] = FloatToBf16(k[j]);
      for (int64_t j = 0; j < vr; ++j) {
        out[i * *stride + kr + j] = FloatToBf16(v[j]);
      }
    }
    return out;
  }

  absl::Status Append() {
    if (plans_.empty()) return HostileAppend();
    auto it = plans_.begin();
    std::advance(it, in_.Range(static_cast<int>(plans_.size())));
    RefPlan& plan = it->second;
    const int layer = in_.Range(config_.num_layers);
    const int64_t left =
        static_cast<int64_t>(plan.rows.size()) - plan.appended[layer];
    if (left == 0) return HostileAppend();
    const int64_t count = 1 + in_.Range(static_cast<int>(left));
    // Skip sequences freed since Reserve: their rows still need data.
    for (int64_t i = 0; i < count; ++i) {
      const int64_t seq = plan.rows[plan.appended[layer] + i].first;
      if (seq != kRemovedRow && !seqs_.count(seq)) return absl::OkStatus();
    }
    int64_t stride = 0;
    std::vector<uint16_t> data =
        Rows(plan, layer, plan.appended[layer], count, &stride);
    const int h = config_.num_kv_heads;
    TensorView k = TensorView::Contiguous(data.data(), DType::kBFloat16,
                                          {count, h, config_.head_size});
    TensorView v =
        TensorView::Contiguous(data.data() + int64_t{h} * config_.head_size,
                               DType::kBFloat16, {count, h, hv_});
    k.strides[0] = v.strides[0] = stride;
    absl::Status s = manager_->Append(it->first, layer, k, v);
    if (Tracing()) {
      std::fprintf(stderr, "  append plan %llu layer %d rows [%lld, +%lld)\n",
                   static_cast<unsigned long long>(it->first), layer,
                   static_cast<long long>(plan.appended[layer]),
                   static_cast<long long>(count));
    }
    if (s.ok()) plan.appended[layer] += count;
    return s;
  }

  // An Append that must fail: each variant breaks exactly one rule.
  absl::Status HostileAppend() {
    const int h = config_.num_kv_heads;
    std::vector<uint16_t> data(64 * 2 * h * 16, 0);
    const uint64_t plan = PlanId();
    int layer = in_.Range(config_.num_layers);
    int64_t tokens = 1;
    if (auto it = plans_.find(plan); it != plans_.end()) {
      tokens = static_cast<int64_t>(it->second.rows.size()) -
               it->second.appended[layer];
    }
    TensorView k = TensorView::Contiguous(data.data(), DType::kBFloat16,
                                          {1, h, config_.head_size});
    TensorView v = TensorView::Contiguous(data.data() + 32 * h * 16,
                                          DType::kBFloat16, {1, h, hv_});
    const int variant = in_.Range(12);
    switch (variant) {
      case 0:
        layer = in_.Byte() & 1 ? -1 : config_.num_layers;
        break;
      case 1:
        k.data = nullptr;
        break;
      case 2:
        v.ndim = 2;
        break;
      case 3:
        k.dtype = DType::kFloat32;
        break;
      case 4:
        v.shape[1] = h + 1;
        break;
      case 5:
        k.shape[2] = config_.head_size + 8;
        break;
      case 6:
        v.strides[2] = 2;
        break;
      case 7:
        k.strides[1] = -1;
        break;
      case 8:
        k.shape[0] = v.shape[0] = tokens + 1;
        break;   // too many
      case 9: {  // An untrusted ndim: never read past the arrays.
        const int32_t ndims[] = {1 << 30, 12, -1, INT32_MIN};
        (in_.Byte() & 1 ? k : v).ndim = ndims[in_.Range(4)];
        break;
      }
      case 10:  // Misaligned bf16 data.
        k.data = reinterpret_cast<char*>(data.data()) + 1;
        break;
      default:
        k.memory = MemoryKind::kCuda;
        break;
    }
    if (variant == 8 && tokens + 1 > 32) return absl::OkStatus();
    absl::Status s = manager_->Append(plan, layer, k, v);
    if (s.ok())
      Fail("hostile Append variant " + std::to_string(variant) + " ok");
    return s;
  }

  absl::Status Gather() {
    const int64_t id = Id();
    const int layer = in_.Byte() < 240 ? in_.Range(config_.num_layers) : 7;
    const uint8_t mode = in_.Byte();
    int64_t begin = in_.Range(8), count = 1 + in_.Range(8);
    if (mode >= 224) {
      const int64_t hostile[] = {-1, kHuge, kMin, 0, kHuge / 2, 1 << 30};
      begin = hostile[mode % 6];
      count = hostile[(mode / 6) % 6];
    }
    const int h = config_.num_kv_heads;
    const int64_t n =
        std::max<int64_t>(1, std::min<int64_t>(count, 64));  // buffer tokens
    std::vector<float> k_out(n * h * config_.head_size), v_out(n * h * hv_);
    // Contiguous views of the buffer's `n` tokens, then the (maybe hostile)
    // token count written in (TensorView::Contiguous multiplies the shape).
    TensorView k = TensorView::Contiguous(k_out.data(), DType::kFloat32,
                                          {n, h, config_.head_size});
    TensorView v =
        TensorView::Contiguous(v_out.data(), DType::kFloat32, {n, h, hv_});
    k.shape[0] = v.shape[0] = count;
    if (count > 64) k.data = v.data = nullptr;  // never a buffer too small
    if ((mode & 7) == 1 && mode < 224) v.shape[2] += 8;
    // key_out and value_out over the same memory (hostile).
    if ((mode & 7) == 2 && mode < 224) v.data = k.data;
    absl::Status s = manager_->Gather(id, layer, begin, count, k, v);
    auto it = seqs_.find(id);
    if (s.ok()) {
      // A count of 0 is an empty success (outputs unchecked).
      if (it == seqs_.end() || begin < 0 || count < 0 ||
          begin > it->second.computed || count > it->second.computed - begin ||
          (count > 0 && ((mode & 7) == 1 || ((mode & 7) == 2 && mode < 224)))) {
        Fail("bad Gather ok");
      }
    }
    return s;
  }

  // A plan's next tokens of one layer written as a partial append, then an
  // Append whose count overflows done + count (stride 0, never read).
  absl::Status OverflowAppend() {
    if (plans_.empty()) return HostileAppend();
    auto it = plans_.begin();
    std::advance(it, in_.Range(static_cast<int>(plans_.size())));
    const int layer = in_.Range(config_.num_layers);
    const int h = config_.num_kv_heads;
    std::vector<uint16_t> data(2 * h * 16, 0);
    TensorView k = TensorView::Contiguous(data.data(), DType::kBFloat16,
                                          {1, h, config_.head_size});
    TensorView v = TensorView::Contiguous(data.data() + h * 16,
                                          DType::kBFloat16, {1, h, hv_});
    const int64_t done = it->second.appended[layer];
    const int64_t counts[] = {
        kHuge, kHuge - done, kHuge - 1,
        static_cast<int64_t>(it->second.rows.size()) - done + 1};
    k.shape[0] = v.shape[0] = counts[in_.Range(4)];
    k.strides[0] = v.strides[0] = 0;
    if (k.shape[0] <= 0) return absl::OkStatus();
    absl::Status s = manager_->Append(it->first, layer, k, v);
    if (s.ok()) Fail("overflowing Append ok");
    return s;
  }

  // An Append through DLPack: the plan's next rows (row-major, null strides),
  // or a hostile DLTensor (null shape, huge ndim, overflowing extents).
  absl::Status DLPackAppend() {
    const uint8_t kind = in_.Byte();
    const int h = config_.num_kv_heads;
    int64_t k_shape[3] = {1, h, config_.head_size}, v_shape[3] = {1, h, hv_};
    std::vector<uint16_t> k_data(64 * h * 16), v_data(64 * h * 16);
    uint64_t plan_id = PlanId();
    int layer = in_.Range(config_.num_layers);
    RefPlan* plan = nullptr;
    int64_t count = 1;
    if (auto it = plans_.find(plan_id); it != plans_.end() && kind < 128) {
      plan = &it->second;
      const int64_t left =
          static_cast<int64_t>(plan->rows.size()) - plan->appended[layer];
      if (left == 0) return absl::OkStatus();
      count = 1 + in_.Range(static_cast<int>(std::min<int64_t>(left, 32)));
      for (int64_t i = 0; i < count; ++i) {
        const int64_t seq = plan->rows[plan->appended[layer] + i].first;
        if (seq != kRemovedRow && !seqs_.count(seq)) return absl::OkStatus();
      }
      int64_t stride = 0;
      std::vector<uint16_t> rows =
          Rows(*plan, layer, plan->appended[layer], count, &stride);
      const int64_t kr = int64_t{h} * config_.head_size;
      for (int64_t i = 0; i < count; ++i) {
        std::copy_n(&rows[i * stride], kr, &k_data[i * kr]);
        std::copy_n(&rows[i * stride + kr], stride - kr,
                    &v_data[i * (stride - kr)]);
      }
      k_shape[0] = v_shape[0] = count;
    }
    DLTensor k{};
    k.data = k_data.data();
    k.device = {kDLCPU, 0};
    k.ndim = 3;
    k.dtype = {kDLBfloat, 16, 1};
    k.shape = k_shape;
    DLTensor v = k;
    v.data = v_data.data();
    v.shape = v_shape;
    int64_t huge[3] = {1, int64_t{1} << 40, int64_t{1} << 40};
    if (plan == nullptr) {
      DLTensor& bad = kind & 1 ? k : v;
      switch (in_.Range(4)) {
        case 0:
          bad.shape = nullptr;
          break;
        case 1:
          bad.ndim = kind & 2 ? 1 << 30 : -1;
          break;
        case 2:
          bad.shape = huge;  // Row-major strides overflow.
          break;
        default:
          bad.byte_offset = UINT64_MAX - (kind & 15);
          break;
      }
    }
    absl::Status s = manager_->Append(plan_id, layer, k, v);
    if (Tracing()) {
      std::fprintf(stderr, "  dlpack append plan %llu layer %d %s\n",
                   static_cast<unsigned long long>(plan_id), layer,
                   plan != nullptr ? "valid" : "hostile");
    }
    if (plan == nullptr && s.ok()) Fail("hostile DLPack Append ok");
    if (plan != nullptr && !s.ok()) Fail("DLPack Append: " + s.ToString());
    if (plan != nullptr) plan->appended[layer] += count;
    return s;
  }

  // What an engine's attention kernel reads: every committed token of a batch
  // of sequences through BatchBlockTable and GetLayerView (including right
  // after a Reserve that copied a forked block), against the reference.
  absl::Status TableRead() {
    std::vector<SequenceId> ids;
    const int n = 1 + in_.Range(3);
    for (int i = 0; i < n; ++i) ids.push_back(Id());
    absl::StatusOr<BlockTableView> table = manager_->BatchBlockTable(ids);
    if (!table.ok()) return table.status();
    for (int i = 0; i < n; ++i) {
      auto it = seqs_.find(ids[i]);
      if (it == seqs_.end()) Fail("BatchBlockTable of an unknown sequence ok");
      if (table->seq_lens[i] != it->second.computed) Fail("seq_lens vs model");
      for (int layer = 0; layer < config_.num_layers; ++layer) {
        absl::StatusOr<LayerView> view = manager_->GetLayerView(layer);
        if (!view.ok()) Fail("GetLayerView: " + view.status().ToString());
        for (int64_t pos = 0; pos < it->second.computed; ++pos) {
          const int64_t block = table->block_table[i * table->row_stride +
                                                   pos / config_.block_size];
          CheckRow(*view, block, pos % config_.block_size, it->second, layer,
                   pos);
        }
      }
    }
    return absl::OkStatus();
  }

  // One token's K and V read from the cache as stored, against the reference.
  void CheckRow(const LayerView& view, int64_t block, int64_t offset,
                const RefSequence& s, int layer, int64_t pos) const {
    const int h = config_.num_kv_heads;
    for (bool is_value : {false, true}) {
      const int d = is_value ? hv_ : config_.head_size;
      const int64_t* strides = is_value ? view.value_strides : view.key_strides;
      const char* base = static_cast<const char*>(is_value ? view.value_cache
                                                           : view.key_cache);
      const float* scales = is_value ? view.value_scale : view.key_scale;
      const std::vector<float> row =
          SyntheticRow(kDataSeed, layer, is_value, s.prefix_hash[pos], h, d);
      for (int head = 0; head < h; ++head) {
        const std::vector<float> q = QuantizeDequantizeHead(
            std::vector<float>(row.begin() + head * d,
                               row.begin() + (head + 1) * d),
            config_.cache_dtype);
        const int64_t at =
            block * strides[0] + offset * strides[1] + head * strides[2];
        const float scale = scales == nullptr
                                ? 1.0f
                                : scales[block * view.scale_strides[0] +
                                         offset * view.scale_strides[1] +
                                         head * view.scale_strides[2]];
        for (int e = 0; e < d; ++e) {
          float got;
          if (config_.cache_dtype == DType::kBFloat16) {
            got = testing::Bf16ToFloat(
                reinterpret_cast<const uint16_t*>(base)[at + e]);
          } else if (config_.cache_dtype == DType::kInt8) {
            got = static_cast<float>(
                      reinterpret_cast<const int8_t*>(base)[at + e]) *
                  scale;
          } else {
            got = testing::Fp8E4M3Value(
                      reinterpret_cast<const uint8_t*>(base)[at + e]) *
                  scale;
          }
          if (std::memcmp(&got, &q[e], sizeof(float)) != 0) {
            Fail("block table read: layer " + std::to_string(layer) +
                 " token " + std::to_string(pos) + " block " +
                 std::to_string(block) + (is_value ? " V" : " K") +
                 " is not the sequence's own data");
          }
        }
      }
    }
  }

  // ReserveGraphStep with a hostile padded count; a step that succeeds is
  // checked (padding, Commit refused: never captured) and aborted.
  absl::Status GraphStep() {
    const int64_t hostile[] = {-1, 0, 1, 2, 8, 9, kHuge, kMin};
    const int64_t graph_tokens = hostile[in_.Range(8)];
    std::vector<ReserveRequest> batch;
    for (int i = in_.Range(3); i >= 0; --i) {
      batch.push_back(ReserveRequest{Id(), {}, 1 + in_.Range(2)});
    }
    absl::StatusOr<StepPlanInfo> plan =
        manager_->ReserveGraphStep(batch, graph_tokens);
    if (!plan.ok()) return plan.status();
    if (config_.graph_max_tokens == 0 || graph_tokens < plan->num_tokens ||
        graph_tokens > config_.graph_max_tokens) {
      Fail("bad ReserveGraphStep ok");
    }
    const absl::StatusOr<GraphStepInputs> in = manager_->GraphStep();
    if (!in.ok() || in->slot_mapping != plan->slot_mapping) {
      Fail("graph step inputs");
    }
    for (int64_t i = plan->num_tokens; i < in->max_tokens; ++i) {
      if (in->slot_mapping[i] != -1) Fail("graph step padding");
    }
    // Never captured, no Append: Commit must refuse it.
    if (manager_->Commit(plan->id).ok()) Fail("graph Commit without capture");
    if (!manager_->Abort(plan->id).ok()) Fail("graph step Abort");
    return absl::OkStatus();
  }

  // GatherBatch / GatherAsync with hostile ranges and counts.
  absl::Status GatherBatch() {
    const int layer = in_.Range(config_.num_layers + 1);  // may be bad
    std::vector<GatherRequest> requests;
    const int64_t hostile[] = {0, 1, 2, -1, kHuge, kMin};
    for (int i = in_.Range(4); i > 0; --i) {
      const uint8_t mode = in_.Byte();
      requests.push_back(
          GatherRequest{Id(), mode < 200 ? in_.Range(6) : hostile[mode % 6],
                        mode < 200 ? in_.Range(4) : hostile[(mode / 6) % 6]});
    }
    GatherOptions options;
    options.include_in_flight = in_.Byte() & 1;
    const int h = config_.num_kv_heads;
    constexpr int64_t kRows = 16;
    std::vector<float> k_out(kRows * h * config_.head_size),
        v_out(kRows * h * hv_);
    int64_t total = 0;
    for (const GatherRequest& r : requests) {
      if (r.num_tokens > 0 && r.num_tokens < kRows) total += r.num_tokens;
    }
    const int64_t rows = std::max<int64_t>(1, std::min(total, kRows));
    TensorView k = TensorView::Contiguous(k_out.data(), DType::kFloat32,
                                          {rows, h, config_.head_size});
    TensorView v =
        TensorView::Contiguous(v_out.data(), DType::kFloat32, {rows, h, hv_});
    if (requests.size() == 1 && in_.Byte() & 1) {
      const GatherRequest& r = requests[0];
      return manager_->GatherAsync(r.sequence, layer, r.token_begin,
                                   r.num_tokens, k, v, options);
    }
    return manager_->GatherBatch(requests, layer, k, v, options);
  }

  absl::Status KnownLength() {
    const int64_t id = Id();
    absl::StatusOr<int64_t> known = manager_->KnownLength(id);
    auto it = seqs_.find(id);
    if (known.ok() != (it != seqs_.end())) Fail("KnownLength vs model");
    if (!known.ok()) return known.status();
    const int64_t computed = *manager_->SequenceLength(id);
    if (*known != static_cast<int64_t>(it->second.tokens.size()) ||
        computed > *known) {
      Fail("known length vs model");
    }
    return absl::OkStatus();
  }

  absl::Status Lookup() {
    const int kind = in_.Range(9);
    const int64_t id = Id();
    switch (kind) {
      case 7: {
        // Known ids only; true once no onboard fills the prefix (always
        // without a tier).
        absl::StatusOr<bool> loaded = manager_->PrefixLoaded(id);
        if (loaded.ok() != (seqs_.count(id) == 1))
          Fail("PrefixLoaded vs model");
        if (loaded.ok() && config_.host_tier_bytes == 0 && !*loaded) {
          Fail("PrefixLoaded false without a tier");
        }
        return loaded.status();
      }
      case 8: {
        // A hostile table: only 0 exists without layer groups, and it is
        // GraphStep().
        const int32_t tables[] = {0, 1, -1, INT32_MAX, INT32_MIN};
        const int32_t table = tables[in_.Range(5)];
        absl::StatusOr<GraphStepInputs> in = manager_->GroupGraphStep(table);
        if (table != 0 && !absl::IsInvalidArgument(in.status())) {
          Fail("GroupGraphStep of table " + std::to_string(table) + ": " +
               in.status().ToString());
        }
        if (table == 0 && in.ok() != (config_.graph_max_tokens > 0)) {
          Fail("GroupGraphStep(0) vs graph_max_tokens");
        }
        return in.status();
      }
      case 0: {
        std::vector<SequenceId> ids;
        const int n = in_.Range(6);  // 0 and 5 are hostile
        for (int i = 0; i < n; ++i) ids.push_back(Id());
        return manager_->BatchBlockTable(ids).status();
      }
      case 1:
        return manager_->TokensThatFit(id).status();
      case 2: {
        ReserveRequest r;
        r.sequence = id;
        const uint8_t b = in_.Byte();
        r.num_tokens = b < 128 ? 1 : b < 192 ? kHuge : kMin;
        return manager_->CanReserve({r});
      }
      case 3:
        return manager_->GetLayerView(in_.Byte() % 4 - 1).status();
      case 4:
        if (manager_->MetricsText().empty()) Fail("empty metrics text");
        return absl::OkStatus();
      case 6: {
        // Refused while a plan is in flight (and then changes nothing).
        const absl::Status s = manager_->ResetPrefixCache();
        if (s.ok() != plans_.empty()) Fail("ResetPrefixCache vs plans");
        if (s.ok() && config_.enable_prefix_caching &&
            manager_->EvictableBlocks() != 0) {
          Fail("ResetPrefixCache left cached blocks");
        }
        return s;
      }
      default: {
        absl::StatusOr<int64_t> len = manager_->SequenceLength(id);
        auto it = seqs_.find(id);
        if (len.ok() != (it != seqs_.end())) Fail("SequenceLength vs model");
        if (len.ok() && *len != it->second.computed) Fail("length vs model");
        return len.status();
      }
    }
  }

  // Gathers every computed token of `id` in every layer and compares it with
  // the reference quantization.
  void Verify(int64_t id) {
    const RefSequence& s = seqs_.at(id);
    absl::StatusOr<int64_t> len = manager_->SequenceLength(id);
    if (!len.ok() || *len != s.computed) {
      Fail("sequence " + std::to_string(id) + " length differs from model");
    }
    if (s.computed == 0) return;
    const int h = config_.num_kv_heads;
    const int64_t t = s.computed;
    std::vector<float> k_out(t * h * config_.head_size), v_out(t * h * hv_);
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      TensorView k = TensorView::Contiguous(k_out.data(), DType::kFloat32,
                                            {t, h, config_.head_size});
      TensorView v =
          TensorView::Contiguous(v_out.data(), DType::kFloat32, {t, h, hv_});
      if (absl::Status st = manager_->Gather(id, layer, 0, t, k, v); !st.ok()) {
        Fail("Verify gather: " + st.ToString());
      }
      for (int64_t pos = 0; pos < t; ++pos) {
        for (bool is_value : {false, true}) {
          const int d = is_value ? hv_ : config_.head_size;
          std::vector<float> row = SyntheticRow(kDataSeed, layer, is_value,
                                                s.prefix_hash[pos], h, d);
          const float* got =
              (is_value ? v_out.data() : k_out.data()) + pos * h * d;
          for (int head = 0; head < h; ++head) {
            std::vector<float> x(row.begin() + head * d,
                                 row.begin() + (head + 1) * d);
            std::vector<float> q =
                QuantizeDequantizeHead(x, config_.cache_dtype);
            if (std::memcmp(got + head * d, q.data(), d * sizeof(float))) {
              Fail("sequence " + std::to_string(id) + " layer " +
                   std::to_string(layer) + " token " + std::to_string(pos) +
                   (is_value ? " V" : " K") + " differs from the reference");
            }
          }
        }
      }
    }
  }

  // Takes the queued KV events and checks them (see the top of the file).
  void DrainEvents() {
    absl::StatusOr<std::vector<KVEventBatch>> batches = manager_->TakeEvents();
    if (!batches.ok()) Fail("TakeEvents: " + batches.status().ToString());
    const int64_t dropped = manager_->Metrics().kv_event_batches_dropped;
    int64_t missing = 0;
    for (const KVEventBatch& b : *batches) {
      if (b.sequence < next_event_) Fail("event batches out of order");
      if (b.sequence > next_event_) events_in_sync_ = false;
      missing += static_cast<int64_t>(b.sequence - next_event_);
      next_event_ = b.sequence + 1;
      if (b.events.empty()) Fail("an empty event batch");
      for (const KVEvent& e : b.events) ApplyEvent(e);
    }
    // Drops at the end of the queue show up only in the counter.
    const int64_t batches_made = manager_->Metrics().kv_event_batches;
    missing += batches_made - static_cast<int64_t>(next_event_);
    if (batches_made != static_cast<int64_t>(next_event_)) {
      events_in_sync_ = false;
      next_event_ = static_cast<uint64_t>(batches_made);
    }
    if (missing != dropped - dropped_seen_) Fail("event gaps vs drop counter");
    dropped_seen_ = dropped;
    if (!events_in_sync_) return;
    for (const KVEventMedium medium :
         {KVEventMedium::kDevice, KVEventMedium::kHost}) {
      const std::vector<uint64_t> cached =
          KVCacheManagerTestPeer::CachedHashesForTesting(*manager_, medium);
      if (std::set<uint64_t>(cached.begin(), cached.end()) !=
          rebuilt_[Medium(medium)]) {
        Fail("events do not rebuild the cached hashes of a medium");
      }
    }
  }
  static int Medium(KVEventMedium m) {
    return m == KVEventMedium::kHost ? 1 : 0;
  }
  void ApplyEvent(const KVEvent& e) {
    std::set<uint64_t>& rebuilt = rebuilt_[Medium(e.medium)];
    switch (e.type) {
      case KVEventType::kAllBlocksCleared:
        for (std::set<uint64_t>& set : rebuilt_) set.clear();
        events_in_sync_ = true;  // Nothing missed before it matters now.
        return;
      case KVEventType::kBlockStored:
        if (e.token_ids.size() !=
            e.block_hashes.size() * static_cast<size_t>(config_.block_size)) {
          Fail("a stored event's tokens");
        }
        for (const uint64_t h : e.block_hashes) {
          if (!rebuilt.insert(h).second && events_in_sync_) {
            Fail("a hash stored twice");
          }
        }
        return;
      case KVEventType::kBlockRemoved:
        for (const uint64_t h : e.block_hashes) {
          if (rebuilt.erase(h) != 1 && events_in_sync_) {
            Fail("a hash removed but not held");
          }
        }
        return;
    }
  }

  Input& in_;
  KVCacheConfig config_;
  int hv_ = 0;
  std::unique_ptr<KVCacheManager> manager_;
  std::map<int64_t, RefSequence> seqs_;
  std::map<uint64_t, RefPlan> plans_;
  uint64_t last_closed_plan_ = 0;
  // KV events: the next batch expected, the hashes they say are cached, and
  // whether no batch was missed since the last AllBlocksCleared.
  uint64_t next_event_ = 0;
  std::set<uint64_t> rebuilt_[2];  // Per medium: device, host.
  bool events_in_sync_ = true;
  int64_t dropped_seen_ = 0;
};

}  // namespace
}  // namespace kvcache

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 0 && data[0] == kvcache::kGroupInputTag) {
    kvcache::FuzzLayerGroups(data + 1, size - 1);
    return 0;
  }
  if (size > 0 && data[0] == kvcache::kGroupManagerInputTag) {
    kvcache::FuzzGroupManager(data + 1, size - 1);
    return 0;
  }
  kvcache::Input in(data, size);
  kvcache::Harness harness(in);
  if (harness.Init()) harness.Run();
  return 0;
}
