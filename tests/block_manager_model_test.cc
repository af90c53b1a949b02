// Randomized model-based test of BlockManager: random operations (including
// invalid ones) are applied both to the manager and to a deliberately simple
// reference model written here, and after every operation the two must agree
// and Validate() must pass.
//
// The model predicts every status code, lengths, tables' evolution, the exact
// number of blocks a reservation needs (its own copy-on-write rule) and pool
// usage. Prefix-cache hits depend on the LRU history, which the model does not
// simulate; instead it simulates the K/V memory: each reserved slot is written
// with a fingerprint of (extra key, every token up to this one) and
// copy-on-write pairs are applied, and every computed or reserved token of
// every live sequence must read back its own fingerprint. So a prefix hit, a
// copy or an eviction that hands a sequence anyone else's data fails the test.

#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/block_hash.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

uint64_t Mix(uint64_t x) {  // splitmix64 finalizer: the model's own
                            // fingerprint, not XXH3.
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct ModelSeq {
  std::vector<TokenId> tokens;
  std::vector<uint64_t> fp;  // Fingerprint of each known token's whole prefix.
  uint64_t root = 0;
  int64_t computed = 0;
  std::vector<BlockId> table;
  uint64_t plan = 0;  // Pending reservation.
  int64_t reserved = 0;
  std::vector<BlockId> table_before;
  size_t tokens_before = 0;
  BlockId cow_src = -1;

  void Append(TokenId t) {
    tokens.push_back(t);
    fp.push_back(
        Mix((fp.empty() ? root : fp.back()) ^ (static_cast<uint64_t>(t) << 1)));
  }
};

// A weak hash for the collision variant: only the first token counts.
BlockHash WeakHash(const BlockHash&, absl::Span<const TokenId> tokens) {
  return BlockHash{static_cast<uint64_t>(tokens[0] % 2), 0};
}

struct Variant {
  bool prefix;
  BlockHashFunction hash;
  int ops;
};

class ModelTest : public ::testing::TestWithParam<Variant> {
 protected:
  static constexpr int32_t kBlocks = 24;
  static constexpr int32_t kBs = 4;
  static constexpr int kIds = 14;

  void Init(uint64_t seed) {
    rng_.seed(seed);
    BlockManagerOptions o;
    o.num_blocks = kBlocks;
    o.block_size = kBs;
    o.enable_prefix_caching = GetParam().prefix;
    o.hash_function_for_testing = GetParam().hash;
    m_ = std::move(*BlockManager::Create(o));
    kv_.assign(kBlocks * kBs, 0);
    std::uniform_int_distribution<int> tok(1, 3);
    for (auto& base : bases_) {
      base.clear();
      for (int i = 0; i < 28; ++i) base.push_back(tok(rng_));
    }
  }

  int Rand(int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng_);
  }
  SequenceId RandomId() { return Rand(0, kIds - 1); }

  std::multiset<BlockId> Holders() const {
    std::multiset<BlockId> h;
    for (const auto& [id, s] : seqs_) {
      h.insert(s.table.begin(), s.table.end());
      if (s.cow_src >= 0) h.insert(s.cow_src);
    }
    return h;
  }
  int64_t Available() const {
    const std::multiset<BlockId> h = Holders();
    return kBlocks -
           static_cast<int64_t>(std::set<BlockId>(h.begin(), h.end()).size());
  }
  bool NeedsCopy(const ModelSeq& s) const {
    return s.computed % kBs != 0 && Holders().count(s.table.back()) > 1;
  }
  std::vector<BlockId> Table(SequenceId id) const {
    auto t = m_->BlockTable(id);
    return t.ok() ? std::vector<BlockId>(t->begin(), t->end())
                  : std::vector<BlockId>{};
  }

  void AddSequence();
  void Reserve(bool dry_run);
  void CommitOrAbort(bool commit);
  void Free();
  void Fork();
  void TokensThatFit();
  void CheckAll();

  std::mt19937_64 rng_;
  std::unique_ptr<BlockManager> m_;
  std::map<SequenceId, ModelSeq> seqs_;
  std::set<uint64_t> open_plans_;
  std::vector<uint64_t> closed_plans_;
  std::vector<uint64_t> kv_;  // Simulated K/V memory: a fingerprint per slot.
  std::vector<TokenId> bases_[5];
};

void ModelTest::AddSequence() {
  const SequenceId id = RandomId();
  std::vector<TokenId> prompt;
  if (Rand(0, 99) > 0) {
    const auto& base = bases_[Rand(0, 4)];
    prompt.assign(base.begin(), base.begin() + Rand(0, 28));
    for (int i = Rand(prompt.empty() ? 1 : 0, 6); i > 0; --i)
      prompt.push_back(Rand(1, 3));
  }
  ExtraKey extra;
  extra.salt = Rand(0, 3) == 0 ? "tenant" : "";
  extra.adapter_id = Rand(0, 7) == 0 ? 1 : 0;
  auto hit = m_->AddSequence(id, prompt, extra);
  const absl::StatusCode want =
      prompt.empty()        ? absl::StatusCode::kInvalidArgument
      : seqs_.count(id) > 0 ? absl::StatusCode::kAlreadyExists
                            : absl::StatusCode::kOk;
  ASSERT_EQ(hit.status().code(), want) << hit.status();
  if (!hit.ok()) return;
  const int64_t n = static_cast<int64_t>(prompt.size());
  ASSERT_EQ(*hit % kBs, 0);
  ASSERT_LE(*hit, (n - 1) / kBs * kBs);
  if (!GetParam().prefix) {
    ASSERT_EQ(*hit, 0);
  }
  ModelSeq s;
  s.root = Mix(std::hash<std::string>()(extra.salt) * 31 + extra.adapter_id);
  for (TokenId t : prompt) s.Append(t);
  s.computed = *hit;
  s.table = Table(id);
  ASSERT_EQ(static_cast<int64_t>(s.table.size()), *hit / kBs);
  seqs_[id] = std::move(s);
}

void ModelTest::Reserve(bool dry_run) {
  std::vector<ReserveRequest> batch(Rand(0, 30) == 0 ? 0 : Rand(1, 3));
  for (ReserveRequest& r : batch) {
    r.sequence = RandomId();
    if (!seqs_.empty() && Rand(0, 9) > 0) {  // Mostly live sequences.
      r.sequence =
          std::next(seqs_.begin(), Rand(0, static_cast<int>(seqs_.size()) - 1))
              ->first;
    }
    auto it = seqs_.find(r.sequence);
    const int64_t left =
        it == seqs_.end() ? 1 : it->second.tokens.size() - it->second.computed;
    if (left > 0 && Rand(0, 3) > 0) {
      r.num_tokens = Rand(1, static_cast<int>(left));
    } else {
      for (int i = Rand(1, 2); i > 0; --i)
        r.new_token_ids.push_back(Rand(1, 3));
      r.num_tokens = left + static_cast<int64_t>(r.new_token_ids.size());
    }
    if (Rand(0, 40) == 0) r.num_tokens = Rand(-1, 0);
    if (Rand(0, 40) == 0) r.num_tokens += Rand(1, 3);
  }
  // The model's prediction, in the manager's documented order of checks.
  absl::StatusCode want = batch.empty() ? absl::StatusCode::kInvalidArgument
                                        : absl::StatusCode::kOk;
  std::set<SequenceId> seen;
  int64_t needed = 0;
  for (const ReserveRequest& r : batch) {
    auto it = seqs_.find(r.sequence);
    if (it == seqs_.end()) {
      want = absl::StatusCode::kNotFound;
      break;
    }
    const ModelSeq& s = it->second;
    if (!seen.insert(r.sequence).second) {
      want = absl::StatusCode::kInvalidArgument;
      break;
    }
    if (s.plan != 0) {
      want = absl::StatusCode::kFailedPrecondition;
      break;
    }
    const int64_t known = s.tokens.size() + r.new_token_ids.size();
    if (r.num_tokens < 1 || s.computed + r.num_tokens > known) {
      want = absl::StatusCode::kInvalidArgument;
      break;
    }
    needed += (s.computed + r.num_tokens + kBs - 1) / kBs -
              static_cast<int64_t>(s.table.size()) + (NeedsCopy(s) ? 1 : 0);
  }
  if (want == absl::StatusCode::kOk && needed > Available()) {
    want = absl::StatusCode::kResourceExhausted;
  }
  if (dry_run) {
    ASSERT_EQ(m_->CanReserve(batch).code(), want) << m_->CanReserve(batch);
    return;
  }
  const std::multiset<BlockId> held_before = Holders();
  auto plan = m_->Reserve(batch);
  ASSERT_EQ(plan.status().code(), want) << plan.status();
  if (!plan.ok()) return;
  open_plans_.insert(plan->id);
  size_t slot = 0, copies = 0;
  std::set<BlockId> fresh;
  for (size_t i = 0; i < batch.size(); ++i) {
    ModelSeq& s = seqs_[batch[i].sequence];
    const bool cow = NeedsCopy(s);
    s.table_before = s.table;
    s.tokens_before = s.tokens.size();
    for (TokenId t : batch[i].new_token_ids) s.Append(t);
    s.table = Table(batch[i].sequence);
    const int64_t end = s.computed + batch[i].num_tokens;
    ASSERT_EQ(static_cast<int64_t>(s.table.size()), (end + kBs - 1) / kBs);
    for (size_t b = 0; b < s.table.size(); ++b) {
      const bool old =
          b < s.table_before.size() && !(cow && b + 1 == s.table_before.size());
      if (old) {
        ASSERT_EQ(s.table[b], s.table_before[b]);
      } else {  // A fresh block: nobody held it, and it is fresh once.
        ASSERT_EQ(held_before.count(s.table[b]), 0u)
            << "block " << s.table[b] << " was in use";
        ASSERT_TRUE(fresh.insert(s.table[b]).second);
      }
    }
    if (cow) {
      s.cow_src = s.table_before.back();
      ASSERT_LT(copies, plan->copies.size());
      ASSERT_EQ(plan->copies[copies].src, s.cow_src);
      ASSERT_EQ(plan->copies[copies].dst, s.table[s.table_before.size() - 1]);
      const BlockCopy c = plan->copies[copies++];
      for (int o = 0; o < kBs; ++o) kv_[c.dst * kBs + o] = kv_[c.src * kBs + o];
    }
    for (int64_t p = s.computed; p < end; ++p, ++slot) {
      ASSERT_LT(slot, plan->slot_mapping.size());
      ASSERT_EQ(plan->slot_mapping[slot], s.table[p / kBs] * kBs + p % kBs);
      kv_[plan->slot_mapping[slot]] =
          s.fp[p];  // The engine writes the step's K/V.
    }
    s.plan = plan->id;
    s.reserved = batch[i].num_tokens;
  }
  ASSERT_EQ(slot, plan->slot_mapping.size());
  ASSERT_EQ(copies, plan->copies.size());
}

void ModelTest::CommitOrAbort(bool commit) {
  uint64_t id = 12345678;
  if (!open_plans_.empty() && Rand(0, 15) > 0) {
    id = *std::next(open_plans_.begin(),
                    Rand(0, static_cast<int>(open_plans_.size()) - 1));
  } else if (!closed_plans_.empty() && Rand(0, 1) == 0) {
    id = closed_plans_[Rand(0, static_cast<int>(closed_plans_.size()) - 1)];
  }
  const absl::Status status = commit ? m_->Commit(id) : m_->Abort(id);
  const bool open = open_plans_.count(id) > 0;
  ASSERT_EQ(status.code(),
            open ? absl::StatusCode::kOk : absl::StatusCode::kNotFound)
      << status;
  if (!open) {
    ASSERT_NE(status.message().find(absl::StrCat("plan ", id)),
              std::string::npos);
    return;
  }
  open_plans_.erase(id);
  closed_plans_.push_back(id);
  for (auto& [sid, s] : seqs_) {
    if (s.plan != id) continue;
    if (commit) {
      s.computed += s.reserved;
    } else {
      s.table = s.table_before;
      s.tokens.resize(s.tokens_before);
      s.fp.resize(s.tokens_before);
    }
    s.plan = 0;
    s.reserved = 0;
    s.cow_src = -1;
  }
}

void ModelTest::Free() {
  const SequenceId id = RandomId();
  const absl::Status status = m_->Free(id);
  ASSERT_EQ(status.code(), seqs_.erase(id) ? absl::StatusCode::kOk
                                           : absl::StatusCode::kNotFound);
}

void ModelTest::Fork() {
  const SequenceId parent = RandomId(), child = RandomId();
  auto it = seqs_.find(parent);
  const absl::StatusCode want =
      it == seqs_.end()        ? absl::StatusCode::kNotFound
      : it->second.plan != 0   ? absl::StatusCode::kFailedPrecondition
      : seqs_.count(child) > 0 ? absl::StatusCode::kAlreadyExists
                               : absl::StatusCode::kOk;
  ASSERT_EQ(m_->Fork(parent, child).code(), want);
  if (want == absl::StatusCode::kOk) seqs_[child] = seqs_[parent];
}

void ModelTest::TokensThatFit() {
  const SequenceId id = RandomId();
  auto fit = m_->TokensThatFit(id);
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second.plan != 0) {
    ASSERT_EQ(fit.status().code(), it == seqs_.end()
                                       ? absl::StatusCode::kNotFound
                                       : absl::StatusCode::kFailedPrecondition);
    return;
  }
  const ModelSeq& s = it->second;
  const int64_t available = Available() - (NeedsCopy(s) ? 1 : 0);
  const int64_t want =
      available < 0 ? 0 : s.table.size() * kBs - s.computed + available * kBs;
  ASSERT_TRUE(fit.ok());
  ASSERT_EQ(*fit, want);
}

void ModelTest::CheckAll() {
  const absl::Status valid = m_->Validate();
  ASSERT_TRUE(valid.ok()) << valid;
  ASSERT_EQ(m_->num_sequences(), static_cast<int64_t>(seqs_.size()));
  const PoolUsage u = m_->Usage();
  ASSERT_EQ(u.used_blocks, kBlocks - Available());
  ASSERT_EQ(u.free_blocks + u.cached_blocks + u.used_blocks, kBlocks);
  if (!GetParam().prefix) {
    ASSERT_EQ(u.cached_blocks, 0);
  }
  for (const auto& [id, s] : seqs_) {
    ASSERT_EQ(*m_->ComputedLength(id), s.computed) << "sequence " << id;
    ASSERT_EQ(*m_->KnownLength(id), static_cast<int64_t>(s.tokens.size()));
    ASSERT_EQ(Table(id), s.table) << "sequence " << id;
    for (int64_t p = 0; p < s.computed + s.reserved; ++p) {
      ASSERT_EQ(kv_[s.table[p / kBs] * kBs + p % kBs], s.fp[p])
          << "sequence " << id << " reads another's K/V at token " << p;
    }
  }
}

TEST_P(ModelTest, RandomOperationsAgreeWithTheModel) {
  const char* env = std::getenv("KVCACHE_TEST_SEED");
  const uint64_t seed =
      env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed,
                            " (rerun with KVCACHE_TEST_SEED=", seed, ")"));
  Init(seed);
  for (int op = 0; op < GetParam().ops; ++op) {
    SCOPED_TRACE(absl::StrCat("operation ", op));
    const int r = Rand(0, 99);
    if (r < 14)
      AddSequence();
    else if (r < 44)
      Reserve(/*dry_run=*/false);
    else if (r < 49)
      Reserve(/*dry_run=*/true);
    else if (r < 69)
      CommitOrAbort(/*commit=*/true);
    else if (r < 74)
      CommitOrAbort(/*commit=*/false);
    else if (r < 88)
      Free();
    else if (r < 95)
      Fork();
    else
      TokensThatFit();
    if (HasFatalFailure()) return;
    CheckAll();
    if (HasFatalFailure()) return;
  }
  const PrefixCacheStats stats = m_->PrefixStats();
  std::printf(
      "%d ops: %lld plans, %lld prefix hit tokens of %lld, %lld evictions\n",
      GetParam().ops,
      static_cast<long long>(closed_plans_.size() + open_plans_.size()),
      static_cast<long long>(stats.hit_tokens),
      static_cast<long long>(stats.query_tokens),
      static_cast<long long>(stats.evictions));
  EXPECT_GT(closed_plans_.size(), static_cast<size_t>(GetParam().ops / 20));
  if (GetParam().prefix) {
    EXPECT_GT(stats.hit_tokens, 0);
    EXPECT_GT(stats.evictions, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelTest,
                         ::testing::Values(Variant{true, nullptr, 100000},
                                           Variant{true, &WeakHash, 30000},
                                           Variant{false, nullptr, 30000}));

}  // namespace
}  // namespace kvcache
