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

#include "tests/block_manager_model.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/shortfall.h"

namespace kvcache {
namespace model_test {

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
  // PeekPrefix predicts the hit and changes nothing.
  const PrefixCacheStats stats_before = m_->PrefixStats();
  const PoolUsage usage_before = m_->Usage();
  auto peek = m_->PeekPrefix(prompt, extra);
  ASSERT_EQ(peek.ok(), !prompt.empty()) << peek.status();
  ASSERT_EQ(m_->PrefixStats().queries, stats_before.queries);
  ASSERT_EQ(m_->PrefixStats().hit_tokens, stats_before.hit_tokens);
  ASSERT_EQ(m_->Usage().cached_blocks, usage_before.cached_blocks);
  ASSERT_EQ(m_->Usage().used_blocks, usage_before.used_blocks);
  auto hit = m_->AddSequence(id, prompt, extra);
  const absl::StatusCode want =
      prompt.empty()        ? absl::StatusCode::kInvalidArgument
      : seqs_.count(id) > 0 ? absl::StatusCode::kAlreadyExists
                            : absl::StatusCode::kOk;
  ASSERT_EQ(hit.status().code(), want) << hit.status();
  if (!hit.ok()) return;
  const int64_t n = static_cast<int64_t>(prompt.size());
  ASSERT_EQ(*hit, *peek);
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
      // A sampled token and up to 3 drafts.
      for (int i = Rand(1, Rand(0, 1) == 0 ? 1 : 4); i > 0; --i)
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
    if ((s.computed + r.num_tokens + kBs - 1) / kBs > kBlocks) {
      want = absl::StatusCode::kOutOfRange;  // Never fits.
      break;
    }
    if ((s.computed + r.num_tokens + kBs - 1) / kBs > GetParam().max_blocks) {
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
  const PoolUsage usage = m_->Usage();
  auto plan = m_->Reserve(batch);
  ASSERT_EQ(plan.status().code(), want) << plan.status();
  const std::optional<Shortfall> shortfall = GetShortfall(plan.status());
  if (want == absl::StatusCode::kResourceExhausted ||
      want == absl::StatusCode::kOutOfRange) {
    ASSERT_TRUE(shortfall.has_value()) << plan.status();
    ASSERT_EQ(shortfall->never_fits, want == absl::StatusCode::kOutOfRange);
    ASSERT_EQ(shortfall->blocks_free, usage.free_blocks);
    ASSERT_EQ(shortfall->blocks_evictable, usage.cached_blocks);
    ASSERT_EQ(shortfall->blocks_total, kBlocks);
    if (want == absl::StatusCode::kResourceExhausted) {
      ASSERT_EQ(shortfall->blocks_needed, needed);
    } else {
      ASSERT_GT(shortfall->blocks_needed, kBlocks);
    }
  } else {
    ASSERT_FALSE(shortfall.has_value());
  }
  if (!plan.ok()) return;
  open_plans_.insert(plan->id);
  std::vector<SequenceId>& order = plan_batches_[plan->id];
  for (const ReserveRequest& r : batch) order.push_back(r.sequence);
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
    ASSERT_EQ(plan->first_positions[i], s.computed);
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
  plan_batches_.erase(id);
  for (auto& [sid, s] : seqs_) {
    if (s.plan != id) continue;
    if (commit) {
      CloseCommitted(s, s.reserved);
    } else {
      CloseAborted(s);
    }
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
    if (r < 12)
      AddSequence();
    else if (r < 40)
      Reserve(/*dry_run=*/false);
    else if (r < 44)
      Reserve(/*dry_run=*/true);
    else if (r < 54)
      CommitOrAbort(/*commit=*/true);
    else if (r < 64)
      CommitAccepted();
    else if (r < 68)
      CommitOrAbort(/*commit=*/false);
    else if (r < 72)
      RemoveFromPlan();
    else if (r < 82)
      Free();
    else if (r < 88)
      Fork();
    else if (r < 96)
      Truncate();
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
                         ::testing::Values(Variant{true, nullptr, 100000, 20},
                                           Variant{true, &WeakHash, 30000, 30},
                                           Variant{false, nullptr, 30000, 30}));

}  // namespace model_test
}  // namespace kvcache
