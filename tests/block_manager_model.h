// The reference model of block_manager_model_test: a deliberately simple
// model of BlockManager (sequences, tables, holders, simulated K/V memory) and
// the fixture that applies random operations to both. See
// block_manager_model_test.cc.

#ifndef KVCACHE_TESTS_BLOCK_MANAGER_MODEL_H_
#define KVCACHE_TESTS_BLOCK_MANAGER_MODEL_H_

#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "allocator/block_hash.h"
#include "allocator/block_manager.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace model_test {

inline uint64_t Mix(uint64_t x) {  // splitmix64 finalizer: the model's own
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
inline BlockHash WeakHash(const BlockHash&, absl::Span<const TokenId> tokens) {
  return BlockHash{static_cast<uint64_t>(tokens[0] % 2), 0};
}

struct Variant {
  bool prefix;
  BlockHashFunction hash;
  int ops;
  // max_blocks_per_sequence: below the pool (Reserve refuses a sequence past
  // it) or above (it refuses one past the pool: never fits).
  int32_t max_blocks;
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
    o.max_blocks_per_sequence = GetParam().max_blocks;
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
  // The manager's copy-on-write rule: a partial tail shared with another
  // holder, or registered in the prefix cache (a full block that Truncate made
  // partial again; which blocks are registered is LRU history the model does
  // not simulate, so it asks).
  bool NeedsCopy(const ModelSeq& s) const {
    return s.computed % kBs != 0 && (Holders().count(s.table.back()) > 1 ||
                                     m_->BlockHashedForTesting(s.table.back()));
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
  // Speculative decoding (block_manager_model_spec.cc).
  uint64_t PickPlan();
  void CommitAccepted();
  void RemoveFromPlan();
  void Truncate();
  // The plan's sequences, in batch order, and how the model closes a plan's
  // sequence: as committed with `accepted` of its reserved tokens, or as
  // before Reserve.
  void CloseCommitted(ModelSeq& s, int64_t accepted);
  void CloseAborted(ModelSeq& s);

  std::mt19937_64 rng_;
  std::unique_ptr<BlockManager> m_;
  std::map<SequenceId, ModelSeq> seqs_;
  std::set<uint64_t> open_plans_;
  std::map<uint64_t, std::vector<SequenceId>> plan_batches_;
  std::vector<uint64_t> closed_plans_;
  std::vector<uint64_t> kv_;  // Simulated K/V memory: a fingerprint per slot.
  std::vector<TokenId> bases_[5];
};

}  // namespace model_test
}  // namespace kvcache

#endif  // KVCACHE_TESTS_BLOCK_MANAGER_MODEL_H_
