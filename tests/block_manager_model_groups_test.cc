// The randomized model test, for layer groups: random AddSequence, Reserve
// (chunks and decode steps), Commit (all, or accepted counts of a
// speculative step), Abort, RemoveFromPlan, Fork, Truncate and Free on a
// GroupBlockManager with full and sliding-window tables, checked after every
// operation against a simple model:
//   - each table has ceil((computed + reserved) / block_size) entries, and a
//     sliding table's entries below floor(max(0, computed - W + 1) / bs) are
//     kNullBlock and the others are not;
//   - simulated K/V memory (a fingerprint of the token's whole prefix, salt
//     and table per slot, written at Reserve) reads back the sequence's own
//     fingerprints in every non-null entry: no page is handed to two tables
//     or two contents at once, and a prefix hit hands over only identical
//     content;
//   - pages in use = distinct non-null entries (and copy-on-write sources of
//     plans in flight); Reserve fails with ResourceExhausted when the new
//     pages of all tables plus the copies it must make (partial last blocks
//     another sequence holds) exceed free + evictable pages, succeeds when
//     they fit even with a copy of every partial last block, and a failure
//     changes nothing;
//   - Reserve copies a partial last block another sequence holds (a fork):
//     the simulated memory copies the page before the step's writes, so a
//     missing copy shows up as another sequence's tokens overwritten;
//   - Truncate is refused (FailedPrecondition, nothing changed) exactly when
//     a sliding table would need a block it released;
//   - every prefix hit equals an independent computation: the largest L
//     (below the prompt's length) such that every table has each block it
//     needs registered, asked block by block.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/group_block_manager.h"
#include "gtest/gtest.h"
#include "tests/block_manager_model.h"

namespace kvcache {
namespace model_test {
namespace {

struct GroupVariant {
  std::vector<int32_t> windows;
  bool prefix;
  int ops;
};

struct GSeq {
  std::vector<TokenId> tokens;
  std::vector<uint64_t> fp;
  uint64_t root = 0;
  ExtraKey extra;
  int64_t computed = 0;
  int64_t reserved = 0;
  uint64_t plan = 0;
  size_t tokens_before = 0;
  std::vector<BlockId> cow_srcs;  // Copy sources held by its plan.

  void Append(TokenId t) {
    tokens.push_back(t);
    fp.push_back(
        Mix((fp.empty() ? root : fp.back()) ^ (static_cast<uint64_t>(t) << 1)));
  }
};

class GroupModelTest : public ::testing::TestWithParam<GroupVariant> {
 protected:
  static constexpr int32_t kBlocks = 40;
  static constexpr int32_t kBs = 4;
  static constexpr int kIds = 10;

  void Init(uint64_t seed) {
    rng_.seed(seed);
    GroupBlockManagerOptions o;
    o.num_blocks = kBlocks;
    o.block_size = kBs;
    o.enable_prefix_caching = GetParam().prefix;
    o.windows = GetParam().windows;
    m_ = std::move(*GroupBlockManager::Create(o));
    kv_.assign(kBlocks * kBs, 0);
    for (auto& base : bases_) {
      base.clear();
      for (int i = 0; i < 40; ++i) base.push_back(Rand(1, 3));
    }
  }
  int Rand(int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng_);
  }
  int32_t tables() const { return m_->num_tables(); }
  int64_t FirstKept(int32_t t, int64_t tokens) const {
    const int64_t w = GetParam().windows[t];
    return w == 0 ? 0 : std::max<int64_t>(0, tokens - w + 1) / kBs;
  }
  static uint64_t Tag(int32_t table, uint64_t fp) {
    return Mix(fp + 0x1234567ULL * (table + 1));
  }

  // The independent hit: block by block, the largest servable prefix.
  int64_t ExpectedHit(const std::vector<TokenId>& prompt,
                      const ExtraKey& extra) const {
    if (!GetParam().prefix) return 0;
    const int64_t most = (static_cast<int64_t>(prompt.size()) - 1) / kBs;
    for (int64_t blocks = most; blocks > 0; --blocks) {
      bool ok = true;
      for (int32_t t = 0; t < tables() && ok; ++t) {
        for (int64_t b = FirstKept(t, blocks * kBs); b < blocks && ok; ++b) {
          std::vector<TokenId> prefix(prompt.begin(),
                                      prompt.begin() + (b + 1) * kBs);
          ok = m_->RegisteredForTesting(t, prefix, extra) >= 0;
        }
      }
      if (ok) return blocks * kBs;
    }
    return 0;
  }

  void AddSequence() {
    const SequenceId id = Rand(0, kIds - 1);
    if (seqs_.count(id)) return;
    GSeq s;
    s.extra.salt = Rand(0, 3) == 0 ? "tenant-b" : "";
    s.root = Mix(s.extra.salt.empty() ? 7 : 11);
    const auto& base = bases_[Rand(0, 3)];
    const int shared = Rand(0, 40);
    const int len = Rand(1, 44);
    for (int i = 0; i < len; ++i) {
      s.Append(i < shared && i < 40 ? base[i] : Rand(1, 3));
    }
    const int64_t expected = ExpectedHit(s.tokens, s.extra);
    auto hit = m_->AddSequence(id, s.tokens, s.extra);
    ASSERT_TRUE(hit.ok()) << hit.status();
    ASSERT_EQ(*hit, expected) << "hybrid hit of sequence " << id;
    s.computed = *hit;
    seqs_[id] = std::move(s);
  }

  void Reserve() {
    std::vector<ReserveRequest> batch;
    std::vector<SequenceId> ids;
    const int n = Rand(1, 3);
    for (int i = 0; i < n; ++i) {
      const SequenceId id = Rand(0, kIds - 1);
      auto it = seqs_.find(id);
      if (it == seqs_.end() || it->second.plan != 0 ||
          std::find(ids.begin(), ids.end(), id) != ids.end()) {
        continue;
      }
      const GSeq& s = it->second;
      ReserveRequest r;
      r.sequence = id;
      const int64_t known = static_cast<int64_t>(s.tokens.size());
      if (known > s.computed) {
        r.num_tokens = Rand(1, static_cast<int>(known - s.computed));
      } else {
        const int extra = Rand(1, 3);
        for (int k = 0; k < extra; ++k) r.new_token_ids.push_back(Rand(1, 3));
        r.num_tokens = Rand(1, extra);
      }
      ids.push_back(id);
      batch.push_back(std::move(r));
    }
    if (batch.empty()) return;
    int64_t need = 0;
    int64_t copies_lo = 0;  // Partial last blocks another sequence holds.
    int64_t copies_hi = 0;  // Every partial last block.
    std::set<std::pair<SequenceId, int32_t>> must_copy;
    for (const ReserveRequest& r : batch) {
      const GSeq& s = seqs_[r.sequence];
      const int64_t have = (s.computed + kBs - 1) / kBs;
      need += tables() * ((s.computed + r.num_tokens + kBs - 1) / kBs - have);
      if (s.computed % kBs == 0) continue;
      copies_hi += tables();
      for (int32_t t = 0; t < tables(); ++t) {
        const BlockId tail = (*m_->BlockTable(r.sequence, t))[s.computed / kBs];
        if (HeldByAnother(r.sequence, tail)) {
          ++copies_lo;
          must_copy.insert({r.sequence, t});
        }
      }
    }
    const PoolUsage before = m_->Usage();
    std::map<SequenceId, std::vector<std::vector<BlockId>>> tables_before;
    for (const ReserveRequest& r : batch) {
      for (int32_t t = 0; t < tables(); ++t) {
        const auto table = *m_->BlockTable(r.sequence, t);
        tables_before[r.sequence].emplace_back(table.begin(), table.end());
      }
    }
    auto plan = m_->Reserve(batch);
    const int64_t available = before.free_blocks + before.cached_blocks;
    if (need + copies_lo > available) {
      ASSERT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted)
          << plan.status();
    } else if (need + copies_hi <= available) {
      ASSERT_TRUE(plan.ok()) << plan.status() << " need " << need << " + "
                             << copies_hi << " copies";
    }
    if (!plan.ok()) {
      ASSERT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted)
          << plan.status();
      const PoolUsage after = m_->Usage();
      ASSERT_EQ(after.free_blocks, before.free_blocks);
      ASSERT_EQ(after.cached_blocks, before.cached_blocks);
      return;
    }
    // Every copy replaces a partial last block of a sequence of the batch by
    // a fresh page; every block another sequence held is copied. The copies
    // run before the step's writes.
    std::set<std::pair<SequenceId, int32_t>> copied;
    for (const BlockCopy& c : plan->copies) {
      bool found = false;
      for (const ReserveRequest& r : batch) {
        const GSeq& s = seqs_[r.sequence];
        if (s.computed % kBs == 0) continue;
        for (int32_t t = 0; t < tables(); ++t) {
          const int64_t last = s.computed / kBs;
          if (tables_before[r.sequence][t][last] != c.src) continue;
          if ((*m_->BlockTable(r.sequence, t))[last] != c.dst) continue;
          found = copied.insert({r.sequence, t}).second;
          seqs_[r.sequence].cow_srcs.push_back(c.src);
        }
      }
      ASSERT_TRUE(found) << "copy " << c.src << " -> " << c.dst
                         << " of no partial last block";
      ++copies_;
      std::copy(kv_.begin() + c.src * kBs, kv_.begin() + (c.src + 1) * kBs,
                kv_.begin() + c.dst * kBs);
    }
    for (const auto& st : must_copy) {
      ASSERT_TRUE(copied.count(st)) << "sequence " << st.first << " table "
                                    << st.second << " shares its last block "
                                    << "but was not copied";
    }
    size_t k = 0;
    for (const ReserveRequest& r : batch) {
      GSeq& s = seqs_[r.sequence];
      s.tokens_before = s.tokens.size();
      for (TokenId t : r.new_token_ids) s.Append(t);
      s.reserved = r.num_tokens;
      s.plan = plan->id;
      for (int64_t p = s.computed; p < s.computed + s.reserved; ++p, ++k) {
        for (int32_t t = 0; t < tables(); ++t) {
          const auto table = *m_->BlockTable(r.sequence, t);
          const int64_t slot = plan->slot_mappings[t][k];
          ASSERT_EQ(slot, int64_t{table[p / kBs]} * kBs + p % kBs);
          kv_[slot] = Tag(t, s.fp[p]);  // The step writes every layer.
        }
      }
    }
    plans_[plan->id] = ids;
  }

  // `block` is in a table of a live sequence other than `id`.
  bool HeldByAnother(SequenceId id, BlockId block) const {
    for (const auto& [other, s] : seqs_) {
      if (other == id) continue;
      for (int32_t t = 0; t < tables(); ++t) {
        // The StatusOr outlives the loop (a range-for over *f() would not).
        const absl::StatusOr<absl::Span<const BlockId>> table =
            m_->BlockTable(other, t);
        for (BlockId b : *table) {
          if (b == block) return true;
        }
      }
    }
    return false;
  }

  // Commit (all tokens, or random accepted counts) or Abort.
  void CloseRandomPlan(bool commit) {
    if (plans_.empty()) return;
    auto it = plans_.begin();
    std::advance(it, Rand(0, static_cast<int>(plans_.size()) - 1));
    const bool speculative = commit && Rand(0, 1) == 0;
    std::vector<int64_t> accepted;
    for (SequenceId id : it->second) {
      auto s = seqs_.find(id);
      const bool in_plan = s != seqs_.end() && s->second.plan == it->first;
      // Entries of sequences no longer in the plan are ignored: any value.
      accepted.push_back(in_plan ? Rand(0, static_cast<int>(s->second.reserved))
                                 : Rand(-5, 5));
    }
    if (speculative) {
      // A wrong size or an entry out of range changes nothing.
      std::vector<int64_t> bad = accepted;
      bad.push_back(0);
      ASSERT_EQ(m_->Commit(it->first, bad).code(),
                absl::StatusCode::kInvalidArgument);
      for (size_t i = 0; i < it->second.size(); ++i) {
        auto s = seqs_.find(it->second[i]);
        if (s == seqs_.end() || s->second.plan != it->first) continue;
        bad = accepted;
        bad[i] = s->second.reserved + 1;
        ASSERT_EQ(m_->Commit(it->first, bad).code(),
                  absl::StatusCode::kInvalidArgument);
        break;
      }
    }
    const absl::Status st = !commit       ? m_->Abort(it->first)
                            : speculative ? m_->Commit(it->first, accepted)
                                          : m_->Commit(it->first);
    ASSERT_TRUE(st.ok()) << st;
    for (size_t i = 0; i < it->second.size(); ++i) {
      auto s = seqs_.find(it->second[i]);
      if (s == seqs_.end() || s->second.plan != it->first) continue;
      GSeq& q = s->second;
      if (!commit) {
        q.tokens.resize(q.tokens_before);
        q.fp.resize(q.tokens_before);
      } else if (speculative) {
        q.computed += accepted[i];
        q.tokens.resize(q.computed);
        q.fp.resize(q.computed);
      } else {
        q.computed += q.reserved;
      }
      q.reserved = 0;
      q.plan = 0;
      q.cow_srcs.clear();
    }
    plans_.erase(it);
  }

  void RemoveFromPlan() {
    if (plans_.empty()) return;
    auto it = plans_.begin();
    std::advance(it, Rand(0, static_cast<int>(plans_.size()) - 1));
    const SequenceId id =
        it->second[Rand(0, static_cast<int>(it->second.size()) - 1)];
    auto s = seqs_.find(id);
    const bool in_plan = s != seqs_.end() && s->second.plan == it->first;
    const absl::Status st = m_->RemoveFromPlan(it->first, id);
    if (!in_plan) {
      ASSERT_FALSE(st.ok());
      return;
    }
    ASSERT_TRUE(st.ok()) << st;
    GSeq& q = s->second;
    q.tokens.resize(q.tokens_before);
    q.fp.resize(q.tokens_before);
    q.reserved = 0;
    q.plan = 0;
    q.cow_srcs.clear();
  }

  void Fork() {
    const SequenceId parent = Rand(0, kIds - 1);
    const SequenceId child = Rand(0, kIds - 1);
    const absl::Status st = m_->Fork(parent, child);
    auto p = seqs_.find(parent);
    if (p == seqs_.end()) {
      ASSERT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
    } else if (p->second.plan != 0) {
      ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    } else if (seqs_.count(child)) {
      ASSERT_EQ(st.code(), absl::StatusCode::kAlreadyExists) << st;
    } else {
      ASSERT_TRUE(st.ok()) << st;
      GSeq c = p->second;
      seqs_[child] = std::move(c);
      for (int32_t t = 0; t < tables(); ++t) {
        ASSERT_EQ(*m_->BlockTable(parent, t), *m_->BlockTable(child, t));
      }
    }
  }

  void Truncate() {
    const SequenceId id = Rand(0, kIds - 1);
    auto s = seqs_.find(id);
    if (s == seqs_.end() || s->second.plan != 0) return;
    GSeq& q = s->second;
    // Mostly a few tokens back (a rejected path), sometimes far.
    const int64_t back = Rand(0, 3) == 0 ? Rand(0, 40) : Rand(0, 2 * kBs);
    const int64_t length = std::max<int64_t>(0, q.computed - back);
    bool refused = false;
    for (int32_t t = 0; t < tables(); ++t) {
      refused |= FirstKept(t, q.computed) > FirstKept(t, length);
    }
    std::vector<std::vector<BlockId>> before;
    for (int32_t t = 0; t < tables(); ++t) {
      const auto table = *m_->BlockTable(id, t);
      before.emplace_back(table.begin(), table.end());
    }
    const absl::Status st = m_->Truncate(id, length);
    if (refused) {
      ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
      for (int32_t t = 0; t < tables(); ++t) {
        const auto table = *m_->BlockTable(id, t);
        ASSERT_EQ(std::vector<BlockId>(table.begin(), table.end()), before[t]);
      }
      return;
    }
    ASSERT_TRUE(st.ok()) << st << " truncating " << q.computed << " to "
                         << length;
    q.computed = length;
    q.tokens.resize(length);
    q.fp.resize(length);
    ++truncates_;
  }

  void Free() {
    const SequenceId id = Rand(0, kIds - 1);
    auto st = m_->Free(id);
    ASSERT_EQ(st.ok(), seqs_.count(id) == 1) << st;
    seqs_.erase(id);
  }

  void CheckAll() {
    ASSERT_TRUE(m_->Validate().ok()) << m_->Validate();
    std::set<BlockId> used;
    for (const auto& [id, s] : seqs_) {
      const int64_t end = s.computed + s.reserved;
      for (int32_t t = 0; t < tables(); ++t) {
        const auto table = *m_->BlockTable(id, t);
        ASSERT_EQ(static_cast<int64_t>(table.size()), (end + kBs - 1) / kBs);
        const int64_t first = FirstKept(t, s.computed);
        for (int64_t b = 0; b < static_cast<int64_t>(table.size()); ++b) {
          ASSERT_EQ(table[b] == kNullBlock, b < first)
              << "sequence " << id << " table " << t << " entry " << b;
          if (table[b] == kNullBlock) continue;
          used.insert(table[b]);
          ASSERT_LT(table[b], kBlocks);
          for (int64_t p = b * kBs; p < std::min(end, (b + 1) * kBs); ++p) {
            ASSERT_EQ(kv_[table[b] * kBs + p % kBs], Tag(t, s.fp[p]))
                << "sequence " << id << " table " << t
                << " reads another's K/V at token " << p;
          }
        }
      }
    }
    for (const auto& [id, s] : seqs_)
      used.insert(s.cow_srcs.begin(), s.cow_srcs.end());
    ASSERT_EQ(m_->Usage().used_blocks, static_cast<int32_t>(used.size()));
    for (const auto& [id, s] : seqs_) {
      ASSERT_EQ(*m_->ComputedLength(id), s.computed);
      ASSERT_EQ(*m_->KnownLength(id), static_cast<int64_t>(s.tokens.size()));
    }
    ASSERT_EQ(m_->num_sequences(), static_cast<int64_t>(seqs_.size()));
  }

  std::mt19937_64 rng_;
  std::unique_ptr<GroupBlockManager> m_;
  std::map<SequenceId, GSeq> seqs_;
  std::map<uint64_t, std::vector<SequenceId>> plans_;
  std::vector<uint64_t> kv_;
  std::vector<TokenId> bases_[4];
  int64_t truncates_ = 0;
  int64_t copies_ = 0;
};

TEST_P(GroupModelTest, RandomOperationsAgreeWithTheModel) {
  const char* env = std::getenv("KVCACHE_TEST_SEED");
  const uint64_t seed =
      env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed,
                            " (rerun with KVCACHE_TEST_SEED=", seed, ")"));
  Init(seed);
  int64_t closed = 0;
  for (int op = 0; op < GetParam().ops; ++op) {
    SCOPED_TRACE(absl::StrCat("operation ", op));
    const int r = Rand(0, 99);
    if (r < 13) {
      AddSequence();
    } else if (r < 45) {
      Reserve();
    } else if (r < 68) {
      CloseRandomPlan(/*commit=*/true);
      ++closed;
    } else if (r < 74) {
      CloseRandomPlan(/*commit=*/false);
    } else if (r < 77) {
      RemoveFromPlan();
    } else if (r < 84) {
      Fork();
    } else if (r < 90) {
      Truncate();
    } else {
      Free();
    }
    if (HasFatalFailure()) return;
    CheckAll();
    if (HasFatalFailure()) return;
  }
  const GroupPrefixStats& stats = m_->PrefixStats();
  std::printf("%d ops: %lld prefix hit tokens of %lld, %lld evictions\n",
              GetParam().ops, static_cast<long long>(stats.hit_tokens),
              static_cast<long long>(stats.query_tokens),
              static_cast<long long>(stats.evictions));
  EXPECT_GT(closed, GetParam().ops / 10);
  EXPECT_GT(truncates_, 0);
  EXPECT_GT(copies_, 0);
  if (GetParam().prefix) {
    EXPECT_GT(stats.hit_tokens, 0);
    EXPECT_GT(stats.evictions, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, GroupModelTest,
                         ::testing::Values(GroupVariant{{0, 8}, true, 30000},
                                           GroupVariant{
                                               {8, 12, 0}, true, 30000},
                                           GroupVariant{{4, 5}, true, 20000},
                                           GroupVariant{{0}, true, 10000},
                                           GroupVariant{{0, 6}, false, 10000}));

}  // namespace
}  // namespace model_test
}  // namespace kvcache
