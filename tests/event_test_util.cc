#include "tests/event_test_util.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager_test_peer.h"
#include "api/tensor_view.h"
#include "core/status_macros.h"

namespace kvcache::testing {

KVCacheConfig SmallEventConfig(int64_t num_blocks, int32_t block_size,
                               int64_t host_tier_blocks) {
  KVCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.head_size = 8;
  c.block_size = block_size;
  c.cache_dtype = DType::kInt8;
  c.input_dtype = DType::kFloat32;
  c.cpu_threads = 1;
  c.num_blocks = num_blocks;
  c.max_inflight_plans = 2;
  c.max_tokens_per_step = 4096;
  c.enable_kv_events = true;
  if (host_tier_blocks > 0) {
    c.host_tier_bytes = host_tier_blocks * *BlockBytesAllLayers(c);
    // Every evicted block offloaded, so that the events cover every move.
    c.tier_offload_min_hits = 0;
  }
  return c;
}

absl::Status RunStep(KVCacheManager& m, SequenceId id, int64_t num_tokens,
                     const std::vector<TokenId>& new_tokens) {
  ReserveRequest r;
  r.sequence = id;
  r.num_tokens = num_tokens;
  r.new_token_ids = new_tokens;
  absl::StatusOr<StepPlanInfo> plan = m.Reserve({r});
  if (!plan.ok()) return plan.status();
  const int32_t d = m.config().head_size;
  std::vector<float> zeros(static_cast<size_t>(num_tokens) * d, 0.0f);
  const TensorView kv =
      TensorView::Contiguous(zeros.data(), DType::kFloat32, {num_tokens, 1, d});
  for (int layer = 0; layer < m.config().num_layers; ++layer) {
    if (absl::Status s = m.Append(plan->id, layer, kv, kv); !s.ok()) {
      (void)m.Abort(plan->id);
      return s;
    }
  }
  return m.Commit(plan->id);
}

absl::Status EventSetRebuilder::Apply(const KVEventBatch& batch) {
  if (batch.sequence != next_) {
    return absl::InternalError(
        absl::StrCat("batch ", batch.sequence, " arrived, expected ", next_));
  }
  ++next_;
  if (batch.events.empty()) return absl::InternalError("an empty batch");
  for (const KVEvent& e : batch.events) {
    std::set<uint64_t>& set = sets_[e.medium];
    switch (e.type) {
      case KVEventType::kBlockStored:
        if (e.block_hashes.empty() || e.block_size <= 0 ||
            e.token_ids.size() != e.block_hashes.size() * e.block_size) {
          return absl::InternalError(
              absl::StrCat("batch ", batch.sequence, ": malformed store"));
        }
        for (const uint64_t h : e.block_hashes) {
          if (!set.insert(h).second) {
            return absl::InternalError(absl::StrCat("batch ", batch.sequence,
                                                    ": stored ", h, " twice"));
          }
        }
        break;
      case KVEventType::kBlockRemoved:
        for (const uint64_t h : e.block_hashes) {
          if (set.erase(h) != 1) {
            return absl::InternalError(absl::StrCat(
                "batch ", batch.sequence, ": removed ", h, ", not held"));
          }
        }
        break;
      case KVEventType::kAllBlocksCleared:
        sets_.clear();
        break;
    }
  }
  return absl::OkStatus();
}

std::set<uint64_t> ManagerHashes(const KVCacheManager& m,
                                 KVEventMedium medium) {
  const std::vector<uint64_t> v =
      KVCacheManagerTestPeer::CachedHashesForTesting(m, medium);
  return std::set<uint64_t>(v.begin(), v.end());
}

RandomCacheOps::RandomCacheOps(KVCacheManager& m, uint64_t seed,
                               std::string salt)
    : m_(m), rng_(seed), salts_{"", std::move(salt), std::string("\0b", 2)} {
  const int32_t bs = m.config().block_size;
  for (int p = 0; p < 6; ++p) {
    std::vector<TokenId> prefix(bs * (1 + rng_() % 5));
    for (TokenId& t : prefix) t = static_cast<TokenId>(rng_() % 50000);
    prefixes_.push_back(std::move(prefix));
  }
}

SequenceId RandomCacheOps::PickLive() {
  auto it = live_.begin();
  std::advance(it, rng_() % live_.size());
  return it->first;
}

absl::Status RandomCacheOps::Op() {
  const uint64_t r = rng_() % 100;
  if (live_.empty() || (r < 25 && live_.size() < 12)) return Add();
  if (r < 75) return Step();
  if (r < 82) return Fork();
  if (r < 87) return Truncate();
  return Free();
}

absl::Status RandomCacheOps::Add() {
  const int32_t bs = m_.config().block_size;
  std::vector<TokenId> prompt = prefixes_[rng_() % prefixes_.size()];
  // Often a shared prefix's first blocks only, then a fresh tail.
  const size_t cut = std::min<size_t>(prompt.size() - 1, bs * (rng_() % 3));
  prompt.resize(prompt.size() - cut);
  const size_t tail = rng_() % (3 * bs);
  for (size_t i = 0; i < tail; ++i) {
    prompt.push_back(static_cast<TokenId>(rng_() % 50000));
  }
  ExtraKey extra;
  extra.adapter_id = rng_() % 4 == 0 ? 7 : 0;
  extra.salt = salts_[rng_() % salts_.size()];
  const SequenceId id = next_id_++;
  absl::StatusOr<int64_t> computed = m_.AddSequence(id, prompt, extra);
  if (absl::IsResourceExhausted(computed.status()) ||
      absl::IsOutOfRange(computed.status())) {
    return absl::OkStatus();  // No room for its cached prefix now.
  }
  if (!computed.ok()) return computed.status();
  live_[id] = Seq{std::move(prompt), *computed};
  return absl::OkStatus();
}

absl::Status RandomCacheOps::Step() {
  const SequenceId id = PickLive();
  Seq& s = live_[id];
  const int32_t bs = m_.config().block_size;
  std::vector<TokenId> fresh;
  int64_t n = static_cast<int64_t>(s.known.size()) - s.computed;
  if (n == 0) {  // Decode: 1 token, or a few speculative ones.
    const int k = 1 + static_cast<int>(rng_() % 4);
    for (int i = 0; i < k; ++i) {
      fresh.push_back(static_cast<TokenId>(rng_() % 50000));
    }
    n = k;
  } else {
    n = std::min<int64_t>(n, 1 + rng_() % (2 * bs));  // A prefill chunk.
  }
  if (s.computed + n > 40 * bs) return Free();  // Keep sequences short.
  ReserveRequest req;
  req.sequence = id;
  req.num_tokens = n;
  req.new_token_ids = fresh;
  absl::StatusOr<StepPlanInfo> plan = m_.Reserve({req});
  if (absl::IsResourceExhausted(plan.status()) ||
      absl::IsOutOfRange(plan.status())) {
    return Preempt(id);
  }
  if (!plan.ok()) return plan.status();
  s.known.insert(s.known.end(), fresh.begin(), fresh.end());
  const int32_t d = m_.config().head_size;
  std::vector<float> zeros(static_cast<size_t>(n) * d, 0.0f);
  const TensorView kv =
      TensorView::Contiguous(zeros.data(), DType::kFloat32, {n, 1, d});
  if (absl::Status st = m_.Append(plan->id, 0, kv, kv); !st.ok()) return st;
  const uint64_t how = rng_() % 10;
  if (how == 0) {
    // Aborted: the reservation and the tokens it made known are dropped.
    KVCACHE_RETURN_IF_ERROR(m_.Abort(plan->id));
    s.known.resize(s.known.size() - fresh.size());
    return absl::OkStatus();
  }
  int64_t accepted = n;
  if (how < 4 && !fresh.empty()) accepted = rng_() % (n + 1);
  KVCACHE_RETURN_IF_ERROR(m_.Commit(plan->id, {accepted}));
  s.computed += accepted;
  // Rejected drafts: the known tokens end at the new length.
  if (accepted < n) s.known.resize(s.computed);
  return absl::OkStatus();
}

absl::Status RandomCacheOps::Preempt(SequenceId keep) {
  // Frees another sequence (or this one when it is alone) to make room.
  SequenceId victim = keep;
  if (live_.size() > 1) {
    while (victim == keep) victim = PickLive();
  }
  KVCACHE_RETURN_IF_ERROR(m_.Free(victim));
  live_.erase(victim);
  return absl::OkStatus();
}

absl::Status RandomCacheOps::Fork() {
  const SequenceId parent = PickLive();
  const SequenceId child = next_id_++;
  KVCACHE_RETURN_IF_ERROR(m_.Fork(parent, child));
  Seq copy = live_[parent];
  live_[child] = std::move(copy);
  return absl::OkStatus();
}

absl::Status RandomCacheOps::Truncate() {
  const SequenceId id = PickLive();
  Seq& s = live_[id];
  const int64_t to = s.computed == 0 ? 0 : rng_() % (s.computed + 1);
  KVCACHE_RETURN_IF_ERROR(m_.Truncate(id, to));
  s.computed = to;
  s.known.resize(to);
  return absl::OkStatus();
}

absl::Status RandomCacheOps::Free() {
  const SequenceId id = PickLive();
  KVCACHE_RETURN_IF_ERROR(m_.Free(id));
  live_.erase(id);
  return absl::OkStatus();
}

}  // namespace kvcache::testing
