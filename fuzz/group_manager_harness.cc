#include "fuzz/group_manager_harness.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "api/kv_cache_manager.h"
#include "api/kv_cache_manager_test_peer.h"
#include "spdlog/sinks/null_sink.h"
#include "spdlog/spdlog.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

using testing::ExtendPrefixHash;
using testing::QuantizeDequantizeHead;
using testing::SyntheticRow;

constexpr uint64_t kSeed = 11;
constexpr int kMaxOps = 48;
constexpr int64_t kIds = 5;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "group manager fuzzer: %s\n", what.c_str());
  std::abort();
}

class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  int Range(int n) { return Byte() % n; }
  // Mostly small, sometimes hostile.
  int64_t Count() {
    static const int64_t kHostile[] = {
        0, -1, std::numeric_limits<int64_t>::min(),
        std::numeric_limits<int64_t>::max(), 1 << 20};
    const uint8_t b = Byte();
    return b < 230 ? b % 10 : kHostile[b % 5];
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

struct RefSeq {
  std::vector<TokenId> tokens;
  std::vector<uint64_t> hashes;  // hashes[p]: of tokens [0, p].
  int64_t computed = 0;
  uint64_t plan = 0;
};

struct RefPlan {
  std::vector<SequenceId> ids;  // Batch order.
  std::vector<int64_t> reserved;
  std::vector<size_t> tokens_before;
};

struct Snapshot {
  int64_t free = 0, evictable = 0;
  std::map<SequenceId, std::pair<int64_t, std::vector<std::vector<BlockId>>>>
      seqs;
  bool operator==(const Snapshot& o) const {
    return free == o.free && evictable == o.evictable && seqs == o.seqs;
  }
};

class Harness {
 public:
  explicit Harness(Bytes& in) : in_(in) {}

  bool Init() {
    const uint8_t a = in_.Byte(), b = in_.Byte();
    KVCacheConfig& c = config_;
    c.block_size = 1 + (a & 3);
    c.num_blocks = 8 + b % 40;
    c.input_dtype = DType::kFloat32;
    c.enable_prefix_caching = (b & 0x80) == 0;
    c.max_tokens_per_step = 32;
    c.max_sequences_per_step = 3;
    c.max_inflight_plans = 2;
    // KV events, in a queue that never drops within one input: replayed,
    // they must rebuild the manager's cached hashes.
    c.enable_kv_events = true;
    c.kv_events_queue_capacity = 4 * kMaxOps;
    const DType dtypes[] = {DType::kInt8, DType::kFp8E4M3};
    LayerGroup sliding, full;
    sliding.kind = AttentionKind::kSlidingWindow;
    sliding.sliding_window = 1 + (a >> 2) % 12;
    for (LayerGroup* g : {&sliding, &full}) {
      g->num_kv_heads = 1 + ((a >> 6) & 1);
      g->head_size = 8;
      g->head_size_v = (a & 0x80) ? 0 : 8;
      g->cache_dtype = dtypes[(b >> 5) & 1];
    }
    // 2 to 4 layers; one to three sliding.
    switch (b % 4) {
      case 0:
        c.num_layers = 2;
        sliding.layers = {0};
        full.layers = {1};
        break;
      case 1:
        c.num_layers = 3;
        sliding.layers = {0, 2};
        full.layers = {1};
        break;
      case 2:
        c.num_layers = 4;
        sliding.layers = {0, 1, 2};
        full.layers = {3};
        break;
      default:  // Sliding only.
        c.num_layers = 2;
        sliding.layers = {0, 1};
        break;
    }
    c.layer_groups = {sliding};
    if (!full.layers.empty()) c.layer_groups.push_back(full);
    c.logger_name = "group_manager_fuzzer";
    if (spdlog::get(c.logger_name) == nullptr) {
      spdlog::null_logger_mt(c.logger_name);
    }
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    if (!m.ok()) Fail("Create: " + m.status().ToString());
    m_ = *std::move(m);
    heads_ = sliding.num_kv_heads;
    dv_ = sliding.head_size_v;
    dtype_ = sliding.cache_dtype;
    window_ = sliding.sliding_window;
    return true;
  }

  void Run() {
    for (int op = 0; op < kMaxOps && !in_.empty(); ++op) {
      const Snapshot before = Take();
      const char* call = "?";
      const absl::Status st = Op(call);
      if (std::getenv("KVCACHE_FUZZ_TRACE") != nullptr) {
        std::fprintf(stderr, "%s: %s\n", call, st.ToString().c_str());
      }
      if (absl::Status v = m_->Validate(); !v.ok()) {
        Fail(std::string("Validate after ") + call + ": " + v.ToString());
      }
      if (!st.ok() && !(Take() == before)) {
        Fail(std::string(call) + " failed (" + st.ToString() +
             ") but changed the manager");
      }
      CheckTables();
      CheckEvents();
      if (op % 4 == 3) CheckData();
    }
    CheckData();
  }

 private:
  int64_t FirstKept(int64_t tokens) const {
    return std::max<int64_t>(0, tokens - window_ + 1) / config_.block_size;
  }
  bool Sliding(int32_t table) const {
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      if (*m_->LayerBlockTable(layer) == table) {
        return layer_sliding(layer);
      }
    }
    return false;
  }
  bool layer_sliding(int layer) const {
    const std::vector<int32_t>& s = config_.layer_groups[0].layers;
    return std::find(s.begin(), s.end(), layer) != s.end();
  }

  Snapshot Take() const {
    Snapshot s;
    s.free = m_->FreeBlocks();
    s.evictable = m_->EvictableBlocks();
    for (SequenceId id = 0; id < kIds; ++id) {
      absl::StatusOr<int64_t> len = m_->SequenceLength(id);
      if (!len.ok()) continue;
      auto& entry = s.seqs[id];
      entry.first = *len;
      for (int32_t t = 0; t < m_->NumBlockTables(); ++t) {
        entry.second.push_back(*m_->GroupBlockTable(id, t));
      }
    }
    return s;
  }

  void Push(RefSeq& s, TokenId t) {
    s.tokens.push_back(t);
    s.hashes.push_back(
        ExtendPrefixHash(s.hashes.empty() ? 0 : s.hashes.back(), t));
  }
  void Resize(RefSeq& s, size_t n) {
    s.tokens.resize(n);
    s.hashes.resize(n);
  }
  // Mostly a live sequence, else a small id, sometimes a hostile one.
  SequenceId Id() {
    const uint8_t b = in_.Byte();
    if (b < 128 && !seqs_.empty()) {
      auto it = seqs_.begin();
      std::advance(it, b % seqs_.size());
      return it->first;
    }
    return b < 240 ? b % kIds : (b % 2 == 0 ? -1 : 1000);
  }

  absl::Status Op(const char*& call) {
    switch (in_.Range(11)) {
      case 0: {
        call = "AddSequence";
        const SequenceId id = Id();
        std::vector<TokenId> prompt(in_.Range(20));
        // Two tokens: prompts share prefixes (prefix hits).
        for (TokenId& t : prompt) t = in_.Range(2);
        absl::StatusOr<int64_t> hit = m_->AddSequence(id, prompt);
        if (hit.ok()) {
          RefSeq& s = seqs_[id];
          for (TokenId t : prompt) Push(s, t);
          s.computed = *hit;
        }
        return hit.status();
      }
      case 1:
      case 2:
        call = "Reserve";
        return Reserve();
      case 3:
      case 4:
        call = "Commit";
        return Close();
      case 5: {
        call = "Fork";
        const SequenceId parent = Id(), child = Id();
        absl::Status st = m_->Fork(parent, child);
        if (st.ok()) {
          seqs_[child] = seqs_.at(parent);
        } else if (seqs_.count(parent) && !seqs_.count(child) &&
                   seqs_.at(parent).plan == 0 && child >= 0) {
          Fail("Fork of a live parent to a new child: " + st.ToString());
        }
        return st;
      }
      case 6: {
        call = "Truncate";
        const SequenceId id = Id();
        auto it = seqs_.find(id);
        // Mostly a few tokens back; hostile counts as they are.
        const int64_t back = in_.Count();
        const int64_t to = it == seqs_.end() || back < 0 || back > 64
                               ? back
                               : it->second.computed - back;
        absl::Status st = m_->Truncate(id, to);
        if (it == seqs_.end() || it->second.plan != 0 || to < 0 ||
            to > it->second.computed) {
          if (st.ok()) Fail("Truncate out of contract succeeded");
          return st;
        }
        // Independently: refused exactly when the window at `to` reads a
        // block released at the current length.
        const bool refused = config_.layer_groups[0].sliding_window > 0 &&
                             FirstKept(it->second.computed) > FirstKept(to);
        if (refused != !st.ok()) {
          Fail("Truncate from " + std::to_string(it->second.computed) + " to " +
               std::to_string(to) + ": " + st.ToString());
        }
        if (st.ok()) {
          it->second.computed = to;
          Resize(it->second, to);
        }
        return st;
      }
      case 7: {
        call = "Free";
        const SequenceId id = Id();
        absl::Status st = m_->Free(id);
        if (st.ok()) seqs_.erase(id);
        return st;
      }
      case 10: {
        // A hostile table: out of range is InvalidArgument; in range, the
        // graph step's own error (graph_max_tokens is 0 here).
        call = "GroupGraphStep";
        const int32_t tables[] = {0, 1, m_->NumBlockTables(), -1, INT32_MAX};
        const int32_t table = tables[in_.Range(5)];
        const absl::Status st = m_->GroupGraphStep(table).status();
        const bool in_range = table >= 0 && table < m_->NumBlockTables();
        if (in_range ? !absl::IsFailedPrecondition(st)
                     : !absl::IsInvalidArgument(st)) {
          Fail("GroupGraphStep of table " + std::to_string(table) + ": " +
               st.ToString());
        }
        return st;
      }
      case 9: {
        call = "ResetPrefixCache";
        absl::Status st = m_->ResetPrefixCache();
        if (st.ok() != plans_.empty())
          Fail("ResetPrefixCache: " + st.ToString());
        return st;
      }
      default: {
        call = "RemoveFromPlan";
        if (plans_.empty()) {
          return m_->RemoveFromPlan(uint64_t{1} << 40, Id());
        }
        auto p = plans_.begin();
        std::advance(p, in_.Range(static_cast<int>(plans_.size())));
        const SequenceId id = Id();
        absl::Status st = m_->RemoveFromPlan(p->first, id);
        auto s = seqs_.find(id);
        const bool in_plan = s != seqs_.end() && s->second.plan == p->first;
        if (st.ok() != in_plan) Fail("RemoveFromPlan: " + st.ToString());
        if (st.ok()) {
          const RefPlan& rp = p->second;
          for (size_t i = 0; i < rp.ids.size(); ++i) {
            if (rp.ids[i] == id) Resize(s->second, rp.tokens_before[i]);
          }
          s->second.plan = 0;
        }
        return st;
      }
    }
  }

  // Reserve a batch, then Append every layer whole (K/V rows from the
  // reference), leaving the plan in flight.
  absl::Status Reserve() {
    std::vector<ReserveRequest> batch(1 + in_.Range(3));
    std::vector<std::vector<TokenId>> news;
    for (ReserveRequest& r : batch) {
      r.sequence = Id();
      r.new_token_ids.resize(in_.Range(4));
      for (TokenId& t : r.new_token_ids) t = in_.Range(2);
      r.num_tokens = in_.Count();
      // Often exactly what is known.
      auto it = seqs_.find(r.sequence);
      if (it != seqs_.end() && in_.Range(2) == 0) {
        r.num_tokens = static_cast<int64_t>(it->second.tokens.size()) +
                       static_cast<int64_t>(r.new_token_ids.size()) -
                       it->second.computed;
      }
    }
    absl::StatusOr<StepPlanInfo> plan = m_->Reserve(batch);
    if (!plan.ok()) return plan.status();
    RefPlan& rp = plans_[plan->id];
    for (const ReserveRequest& r : batch) {
      RefSeq& s = seqs_.at(r.sequence);
      rp.ids.push_back(r.sequence);
      rp.reserved.push_back(r.num_tokens);
      rp.tokens_before.push_back(s.tokens.size());
      for (TokenId t : r.new_token_ids) Push(s, t);
      s.plan = plan->id;
    }
    const int64_t n = plan->num_tokens;
    const int64_t d = 8;
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      std::vector<float> k, v;
      for (const PlanSequence& ps : plan->sequences) {
        const RefSeq& s = seqs_.at(ps.sequence);
        for (int64_t p = ps.first_position;
             p < ps.first_position + ps.num_tokens; ++p) {
          std::vector<float> row =
              SyntheticRow(kSeed, layer, false, s.hashes[p], heads_, d);
          k.insert(k.end(), row.begin(), row.end());
          if (dv_ > 0) {
            row = SyntheticRow(kSeed, layer, true, s.hashes[p], heads_, dv_);
            v.insert(v.end(), row.begin(), row.end());
          }
        }
      }
      const TensorView key =
          TensorView::Contiguous(k.data(), DType::kFloat32, {n, heads_, d});
      const TensorView value =
          dv_ > 0 ? TensorView::Contiguous(v.data(), DType::kFloat32,
                                           {n, heads_, dv_})
                  : TensorView();
      if (absl::Status st = m_->Append(plan->id, layer, key, value); !st.ok()) {
        Fail("Append of a reserved plan: " + st.ToString());
      }
    }
    return absl::OkStatus();
  }

  // Commit (all, or accepted counts, some hostile) or Abort a plan.
  absl::Status Close() {
    if (plans_.empty()) return m_->Commit(uint64_t{1} << 40);
    auto p = plans_.begin();
    std::advance(p, in_.Range(static_cast<int>(plans_.size())));
    const RefPlan& rp = p->second;
    const int how = in_.Range(4);
    absl::Status st;
    std::vector<int64_t> accepted;
    if (how == 0) {
      st = m_->Abort(p->first);
    } else if (how == 1) {
      st = m_->Commit(p->first);
    } else {
      for (int64_t r : rp.reserved) {
        const uint8_t b = in_.Byte();
        accepted.push_back(b < 240 ? b % (r + 1) : r + 1 + b % 3);
      }
      if (how == 3 && !accepted.empty()) accepted.pop_back();  // Wrong size.
      st = m_->Commit(p->first, accepted);
      bool valid = accepted.size() == rp.ids.size();
      for (size_t i = 0; valid && i < rp.ids.size(); ++i) {
        auto s = seqs_.find(rp.ids[i]);
        if (s == seqs_.end() || s->second.plan != p->first) continue;
        valid = accepted[i] >= 0 && accepted[i] <= rp.reserved[i];
      }
      if (st.ok() != valid) Fail("Commit(accepted): " + st.ToString());
      if (!st.ok()) return st;
    }
    if (!st.ok()) Fail("closing a plan in flight: " + st.ToString());
    for (size_t i = 0; i < rp.ids.size(); ++i) {
      auto s = seqs_.find(rp.ids[i]);
      if (s == seqs_.end() || s->second.plan != p->first) continue;
      RefSeq& q = s->second;
      if (how == 0) {
        Resize(q, rp.tokens_before[i]);
      } else if (how == 1) {
        q.computed += rp.reserved[i];
      } else {
        q.computed += accepted[i];
        Resize(q, q.computed);
      }
      q.plan = 0;
    }
    plans_.erase(p);
    return st;
  }

  int64_t Reserved(SequenceId id, const RefSeq& s) const {
    if (s.plan == 0) return 0;
    const RefPlan& rp = plans_.at(s.plan);
    for (size_t i = 0; i < rp.ids.size(); ++i) {
      if (rp.ids[i] == id) return rp.reserved[i];
    }
    return 0;
  }

  // Lengths and the shape of every table.
  void CheckTables() const {
    const int64_t bs = config_.block_size;
    for (SequenceId id = 0; id < kIds; ++id) {
      auto it = seqs_.find(id);
      absl::StatusOr<int64_t> len = m_->SequenceLength(id);
      if (len.ok() != (it != seqs_.end())) Fail("a sequence is lost or extra");
      if (!len.ok()) continue;
      const RefSeq& s = it->second;
      if (*len != s.computed ||
          *m_->KnownLength(id) != static_cast<int64_t>(s.tokens.size())) {
        Fail("lengths of sequence " + std::to_string(id));
      }
      const int64_t end = s.computed + Reserved(id, s);
      for (int32_t t = 0; t < m_->NumBlockTables(); ++t) {
        const std::vector<BlockId> table = *m_->GroupBlockTable(id, t);
        const int64_t first = Sliding(t) ? FirstKept(s.computed) : 0;
        if (static_cast<int64_t>(table.size()) != (end + bs - 1) / bs) {
          Fail("table size of sequence " + std::to_string(id));
        }
        for (int64_t b = 0; b < static_cast<int64_t>(table.size()); ++b) {
          if ((table[b] < 0) != (b < first)) {
            Fail("released entries of sequence " + std::to_string(id));
          }
        }
      }
    }
  }

  // The events so far, replayed, hold exactly the manager's cached hashes.
  void CheckEvents() {
    absl::StatusOr<std::vector<KVEventBatch>> batches = m_->TakeEvents();
    if (!batches.ok()) Fail("TakeEvents: " + batches.status().ToString());
    for (const KVEventBatch& b : *batches) {
      if (b.sequence != next_batch_++) Fail("a gap in the event batches");
      for (const KVEvent& e : b.events) {
        if (e.type == KVEventType::kAllBlocksCleared) {
          cached_.clear();
          continue;
        }
        if (e.medium != KVEventMedium::kDevice) Fail("an event off the device");
        for (uint64_t h : e.block_hashes) {
          const bool stored = e.type == KVEventType::kBlockStored;
          if (stored ? !cached_.insert(h).second : cached_.erase(h) == 0) {
            Fail(stored ? "a hash stored twice" : "a hash removed not held");
          }
        }
      }
    }
    const std::vector<uint64_t> held =
        KVCacheManagerTestPeer::CachedHashesForTesting(*m_,
                                                       KVEventMedium::kDevice);
    if (std::set<uint64_t>(held.begin(), held.end()) != cached_) {
      Fail("the events do not rebuild the cached hashes");
    }
  }

  // Every token each layer holds gathers to the reference.
  void CheckData() const {
    const int64_t bs = config_.block_size;
    for (const auto& [id, s] : seqs_) {
      for (int layer = 0; layer < config_.num_layers; ++layer) {
        const int64_t first =
            layer_sliding(layer) ? FirstKept(s.computed) * bs : 0;
        const int64_t n = s.computed - first;
        if (n <= 0) continue;
        std::vector<float> k(n * heads_ * 8), v(n * heads_ * dv_);
        const TensorView key =
            TensorView::Contiguous(k.data(), DType::kFloat32, {n, heads_, 8});
        const TensorView value =
            dv_ > 0 ? TensorView::Contiguous(v.data(), DType::kFloat32,
                                             {n, heads_, dv_})
                    : TensorView();
        if (absl::Status st = m_->Gather(id, layer, first, n, key, value);
            !st.ok()) {
          Fail("Gather of held tokens: " + st.ToString());
        }
        for (int part = 0; part < (dv_ > 0 ? 2 : 1); ++part) {
          const int hs = part == 0 ? 8 : dv_;
          const std::vector<float>& got = part == 0 ? k : v;
          for (int64_t t = 0; t < n; ++t) {
            const std::vector<float> row = SyntheticRow(
                kSeed, layer, part == 1, s.hashes[first + t], heads_, hs);
            for (int h = 0; h < heads_; ++h) {
              const std::vector<float> want = QuantizeDequantizeHead(
                  std::vector<float>(row.begin() + h * hs,
                                     row.begin() + (h + 1) * hs),
                  dtype_);
              for (int e = 0; e < hs; ++e) {
                const float g = got[(t * heads_ + h) * hs + e];
                if (std::fabs(g - want[e]) >
                    1e-3f * (1.0f + std::fabs(want[e]))) {
                  Fail("sequence " + std::to_string(id) + " layer " +
                       std::to_string(layer) + " token " +
                       std::to_string(first + t) + " reads another's data");
                }
              }
            }
          }
        }
      }
    }
  }

  Bytes& in_;
  KVCacheConfig config_;
  std::unique_ptr<KVCacheManager> m_;
  int heads_ = 1, dv_ = 8, window_ = 1;
  DType dtype_ = DType::kInt8;
  std::map<SequenceId, RefSeq> seqs_;
  std::map<uint64_t, RefPlan> plans_;
  std::set<uint64_t> cached_;  // Rebuilt from events.
  uint64_t next_batch_ = 0;
};

}  // namespace

void FuzzGroupManager(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  Harness h(in);
  if (h.Init()) h.Run();
}

}  // namespace kvcache
