// GroupRunner: drives a KVCacheManager configured with layer groups through
// random steps (add, prefill chunks, decode, speculative steps, fork,
// truncate, free) and checks every layer's
// Gather against an independent reference: each token's K/V is a synthetic
// row of (seed, layer, token prefix), quantized and dequantized by
// testing/kv_reference.h. Each layer has its group's shape (KV heads, K and
// V head sizes, cache dtype); inputs are the config's input_dtype (float32 or
// bfloat16: the synthetic rows are bf16 values, so both carry them exactly)
// and outputs float32. Inputs and outputs live in `device`'s memory (host or
// CUDA), so one scenario runs on both backends. Test-only.

#ifndef KVCACHE_TESTS_GROUP_RUNNER_H_
#define KVCACHE_TESTS_GROUP_RUNNER_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/kv_reference.h"

namespace kvcache::testing {

// GroupRunner::Step's options.
struct GroupStepOptions {
  // Commit with these accepted counts (batch order): a speculative step.
  const std::vector<int64_t>* accepted = nullptr;
  // Takes this sequence out of the plan before the Appends (which still
  // carry its rows: padding).
  std::optional<SequenceId> remove;
  int64_t* copies = nullptr;  // Receives the step's copy-on-write count.
};

class GroupRunner {
 public:
  struct Seq {
    std::vector<TokenId> tokens;   // Known tokens.
    std::vector<uint64_t> hashes;  // hashes[p]: prefix hash of tokens [0, p].
  };

  // One layer's shape (its group's).
  struct Shape {
    int heads = 0, d = 0, dv = 0;
    DType dtype = DType::kInt8;
  };

  GroupRunner(KVCacheManager* manager, Device* device, uint64_t seed)
      : m_(manager), device_(device), seed_(seed), rng_(seed) {
    const KVCacheConfig& c = m_->config();
    shapes_.resize(c.num_layers);
    for (const LayerGroup& g : c.layer_groups) {
      for (int32_t l : g.layers) {
        shapes_[l] = {g.num_kv_heads, g.head_size, g.head_size_v,
                      g.cache_dtype};
      }
    }
    input_dtype_ = c.input_dtype;
  }

  const Shape& shape(int layer) const { return shapes_[layer]; }

  // K (V) of token `p` of `id` in `layer`, as Step appends it.
  std::vector<float> TokenRow(SequenceId id, int layer, bool is_value,
                              int64_t p) {
    const Shape& sh = shapes_[layer];
    return Row(layer, is_value, seqs_.at(id).hashes[p],
               is_value ? sh.dv : sh.d);
  }

  KVCacheManager& manager() { return *m_; }
  const std::map<SequenceId, Seq>& sequences() const { return seqs_; }

  // Tokens from a small vocabulary so that prompts share prefixes.
  std::vector<TokenId> RandomTokens(int64_t n, int vocab = 3) {
    std::vector<TokenId> t(n);
    for (TokenId& x : t) x = static_cast<TokenId>(rng_() % vocab);
    return t;
  }

  absl::StatusOr<int64_t> Add(SequenceId id, std::vector<TokenId> prompt) {
    absl::StatusOr<int64_t> hit = m_->AddSequence(id, prompt);
    if (!hit.ok()) return hit;
    Seq& s = seqs_[id];
    s.tokens = std::move(prompt);
    Rehash(s);
    return hit;
  }

  absl::Status Free(SequenceId id) {
    absl::Status st = m_->Free(id);
    if (st.ok()) seqs_.erase(id);
    return st;
  }

  absl::Status Fork(SequenceId parent, SequenceId child) {
    absl::Status st = m_->Fork(parent, child);
    if (st.ok()) seqs_[child] = seqs_.at(parent);
    return st;
  }

  absl::Status Truncate(SequenceId id, int64_t length) {
    absl::Status st = m_->Truncate(id, length);
    if (st.ok()) {
      Seq& s = seqs_.at(id);
      s.tokens.resize(length);
      s.hashes.resize(length);
    }
    return st;
  }

  using StepOptions = GroupStepOptions;

  // One step: reserve `n[i]` tokens for `ids[i]` (new token ids drawn at
  // random when the known tokens run out), append every layer, commit.
  absl::Status Step(const std::vector<SequenceId>& ids,
                    const std::vector<int64_t>& n,
                    const StepOptions& options = {}) {
    const std::vector<int64_t>* accepted = options.accepted;
    absl::StatusOr<std::vector<ReserveRequest>> batch = Batch(ids, n);
    if (!batch.ok()) return batch.status();
    absl::StatusOr<StepPlanInfo> plan = m_->Reserve(*batch);
    if (!plan.ok()) return plan.status();
    if (options.copies != nullptr) *options.copies = plan->num_block_copies;
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_[ids[i]];
      s.tokens.insert(s.tokens.end(), (*batch)[i].new_token_ids.begin(),
                      (*batch)[i].new_token_ids.end());
      Rehash(s);
    }
    if (options.remove.has_value()) {
      if (absl::Status st = m_->RemoveFromPlan(plan->id, *options.remove);
          !st.ok()) {
        m_->Abort(plan->id).IgnoreError();
        return st;
      }
      for (size_t i = 0; i < ids.size(); ++i) {
        if (ids[i] != *options.remove) continue;
        Seq& s = seqs_[ids[i]];
        s.tokens.resize(s.tokens.size() - (*batch)[i].new_token_ids.size());
        s.hashes.resize(s.tokens.size());
      }
    }
    for (int layer = 0; layer < m_->config().num_layers; ++layer) {
      if (absl::Status st = AppendLayer(*plan, layer, options.remove);
          !st.ok()) {
        m_->Abort(plan->id).IgnoreError();
        return st;
      }
    }
    if (accepted == nullptr) return m_->Commit(plan->id);
    if (absl::Status st = m_->Commit(plan->id, *accepted); !st.ok()) {
      m_->Abort(plan->id).IgnoreError();
      return st;
    }
    // The known tokens end at the accepted ones.
    for (size_t i = 0; i < plan->sequences.size(); ++i) {
      const PlanSequence& ps = plan->sequences[i];
      if (options.remove == ps.sequence) continue;
      Seq& s = seqs_[ps.sequence];
      s.tokens.resize(ps.first_position + (*accepted)[i]);
      s.hashes.resize(s.tokens.size());
    }
    return absl::OkStatus();
  }

  // Step without the appends and the commit: reserves and returns the plan
  // (AppendLayer each layer, then Commit). Known tokens only.
  absl::StatusOr<StepPlanInfo> ReserveOnly(const std::vector<SequenceId>& ids,
                                           const std::vector<int64_t>& n) {
    std::vector<ReserveRequest> batch;
    for (size_t i = 0; i < ids.size(); ++i) {
      ReserveRequest r;
      r.sequence = ids[i];
      r.num_tokens = n[i];
      batch.push_back(r);
    }
    absl::StatusOr<StepPlanInfo> plan = m_->Reserve(batch);
    return plan;
  }

  // A graph step (KVCacheManager::ReserveGraphStep) of `n[i]` tokens for
  // `ids[i]`, padded to graph_tokens: reserves, runs `inspect` (say, a check
  // of the graph-step inputs; its error aborts the plan), optionally takes
  // `remove` out of the plan and runs `inspect` again, appends every layer
  // (graph_tokens rows each, the padding rows junk), and commits.
  absl::Status GraphStep(
      const std::vector<SequenceId>& ids, const std::vector<int64_t>& n,
      int64_t graph_tokens,
      const std::function<absl::Status(const StepPlanInfo&,
                                       std::optional<SequenceId>)>& inspect,
      std::optional<SequenceId> remove = std::nullopt) {
    absl::StatusOr<std::vector<ReserveRequest>> batch = Batch(ids, n);
    if (!batch.ok()) return batch.status();
    absl::StatusOr<StepPlanInfo> plan =
        m_->ReserveGraphStep(*batch, graph_tokens);
    if (!plan.ok()) return plan.status();
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_[ids[i]];
      s.tokens.insert(s.tokens.end(), (*batch)[i].new_token_ids.begin(),
                      (*batch)[i].new_token_ids.end());
      Rehash(s);
    }
    absl::Status st = inspect(*plan, std::nullopt);
    if (st.ok() && remove.has_value()) {
      st = m_->RemoveFromPlan(plan->id, *remove);
      if (st.ok()) {
        for (size_t i = 0; i < ids.size(); ++i) {
          if (ids[i] != *remove) continue;
          Seq& s = seqs_[ids[i]];
          s.tokens.resize(s.tokens.size() - (*batch)[i].new_token_ids.size());
          s.hashes.resize(s.tokens.size());
        }
        st = inspect(*plan, remove);
      }
    }
    for (int layer = 0; st.ok() && layer < m_->config().num_layers; ++layer) {
      st = AppendLayer(*plan, layer, remove, graph_tokens);
    }
    if (st.ok()) st = m_->Commit(plan->id);
    if (!st.ok()) m_->Abort(plan->id).IgnoreError();
    return st;
  }

  // Appends `layer`'s K/V of every token of `plan` (the rows of a sequence
  // removed from it are padding: any content), then junk rows up to
  // `padded_to` tokens (a graph step's padding).
  absl::Status AppendLayer(const StepPlanInfo& plan, int layer,
                           std::optional<SequenceId> removed = std::nullopt,
                           int64_t padded_to = 0) {
    const Shape& sh = shapes_[layer];
    std::vector<float> k, v;
    for (const PlanSequence& ps : plan.sequences) {
      const Seq& s = seqs_[ps.sequence];
      const bool padding = removed == ps.sequence;
      for (int64_t p = ps.first_position; p < ps.first_position + ps.num_tokens;
           ++p) {
        const uint64_t hash = padding ? ~uint64_t{0} - p : s.hashes[p];
        std::vector<float> row = Row(layer, false, hash, sh.d);
        k.insert(k.end(), row.begin(), row.end());
        if (sh.dv > 0) {
          row = Row(layer, true, hash, sh.dv);
          v.insert(v.end(), row.begin(), row.end());
        }
      }
    }
    int64_t total = plan.num_tokens;
    for (; total < padded_to; ++total) {
      const uint64_t junk = ~uint64_t{0} / 2 + total;
      std::vector<float> row = Row(layer, false, junk, sh.d);
      k.insert(k.end(), row.begin(), row.end());
      if (sh.dv > 0) {
        row = Row(layer, true, junk, sh.dv);
        v.insert(v.end(), row.begin(), row.end());
      }
    }
    absl::StatusOr<Buffer> kb = Upload(k);
    if (!kb.ok()) return kb.status();
    TensorView key = View(kb->data(), total, sh.heads, sh.d, input_dtype_);
    TensorView value;
    Buffer vb;
    if (sh.dv > 0) {
      absl::StatusOr<Buffer> b = Upload(v);
      if (!b.ok()) return b.status();
      vb = *std::move(b);
      value = View(vb.data(), total, sh.heads, sh.dv, input_dtype_);
    }
    return m_->Append(plan.id, layer, key, value);
  }

  // First token `layer` can still read of `id` (after its released blocks).
  int64_t FirstReadable(SequenceId id, int layer) {
    const int32_t table = *m_->LayerBlockTable(layer);
    const std::vector<BlockId> t = *m_->GroupBlockTable(id, table);
    int64_t i = 0;
    while (i < static_cast<int64_t>(t.size()) && t[i] < 0) ++i;
    return i * m_->config().block_size;
  }

  // Gathers [begin, begin + n) of `layer` and compares it with the
  // reference; returns Gather's error, or Internal naming the first
  // mismatch.
  absl::Status CheckGather(SequenceId id, int layer, int64_t begin, int64_t n) {
    const Seq& s = seqs_.at(id);
    const Shape& sh = shapes_[layer];
    const int heads = sh.heads, dv = sh.dv;
    absl::StatusOr<Buffer> kb = device_->Allocate(n * heads * sh.d * 4);
    if (!kb.ok()) return kb.status();
    TensorView key = View(kb->data(), n, heads, sh.d, DType::kFloat32);
    TensorView value;
    Buffer vb;
    if (dv > 0) {
      absl::StatusOr<Buffer> b = device_->Allocate(n * heads * dv * 4);
      if (!b.ok()) return b.status();
      vb = *std::move(b);
      value = View(vb.data(), n, heads, dv, DType::kFloat32);
    }
    if (absl::Status st = m_->Gather(id, layer, begin, n, key, value);
        !st.ok()) {
      return st;
    }
    for (int part = 0; part < (dv > 0 ? 2 : 1); ++part) {
      const int hs = part == 0 ? sh.d : dv;
      std::vector<float> got(n * heads * hs);
      if (absl::Status st = device_->CopyToHost(
              got.data(), part == 0 ? kb->data() : vb.data(), got.size() * 4);
          !st.ok()) {
        return st;
      }
      for (int64_t t = 0; t < n; ++t) {
        const std::vector<float> row =
            Row(layer, part == 1, s.hashes[begin + t], hs);
        for (int h = 0; h < heads; ++h) {
          const std::vector<float> head(row.begin() + h * hs,
                                        row.begin() + (h + 1) * hs);
          const std::vector<float> want =
              QuantizeDequantizeHead(head, sh.dtype);
          for (int e = 0; e < hs; ++e) {
            const float g = got[(t * heads + h) * hs + e];
            if (std::fabs(g - want[e]) > 1e-3f * (1.0f + std::fabs(want[e]))) {
              return absl::InternalError(
                  absl::StrCat("sequence ", id, " layer ", layer, " token ",
                               begin + t, part == 0 ? " K" : " V", " head ", h,
                               " elem ", e, ": got ", g, " want ", want[e]));
            }
          }
        }
      }
    }
    return absl::OkStatus();
  }

  // Every readable token of every live sequence in every layer.
  absl::Status CheckAll() {
    for (const auto& [id, s] : seqs_) {
      const int64_t len = *m_->SequenceLength(id);
      for (int layer = 0; layer < m_->config().num_layers; ++layer) {
        const int64_t first = std::min(FirstReadable(id, layer), len);
        if (len - first == 0) continue;
        if (absl::Status st = CheckGather(id, layer, first, len - first);
            !st.ok()) {
          return st;
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  // The reserve requests of a step of `n[i]` tokens for `ids[i]`, with new
  // token ids drawn at random where the known tokens run out.
  absl::StatusOr<std::vector<ReserveRequest>> Batch(
      const std::vector<SequenceId>& ids, const std::vector<int64_t>& n) {
    std::vector<ReserveRequest> batch;
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_[ids[i]];
      absl::StatusOr<int64_t> len = m_->SequenceLength(ids[i]);
      if (!len.ok()) return len.status();
      ReserveRequest r;
      r.sequence = ids[i];
      r.num_tokens = n[i];
      const int64_t missing =
          *len + n[i] - static_cast<int64_t>(s.tokens.size());
      if (missing > 0) r.new_token_ids = RandomTokens(missing);
      batch.push_back(r);
    }
    return batch;
  }

  void Rehash(Seq& s) {
    uint64_t h = s.hashes.empty() ? 0 : s.hashes.back();
    for (size_t p = s.hashes.size(); p < s.tokens.size(); ++p) {
      h = ExtendPrefixHash(h, s.tokens[p]);
      s.hashes.push_back(h);
    }
  }
  std::vector<float> Row(int layer, bool is_value, uint64_t hash, int hs) {
    return SyntheticRow(seed_, layer, is_value, hash, shapes_[layer].heads, hs);
  }
  TensorView View(void* data, int64_t tokens, int heads, int hs,
                  DType dtype) const {
    return TensorView::Contiguous(data, dtype, {tokens, heads, hs},
                                  device_->kind() == DeviceKind::kCuda
                                      ? MemoryKind::kCuda
                                      : MemoryKind::kHost,
                                  device_->ordinal());
  }
  // `x` in the input dtype (float32, or bf16: exact for synthetic rows).
  absl::StatusOr<Buffer> Upload(const std::vector<float>& x) {
    std::vector<uint16_t> bf16;
    const void* src = x.data();
    size_t bytes = x.size() * 4;
    if (input_dtype_ == DType::kBFloat16) {
      for (float f : x) bf16.push_back(FloatToBf16(f));
      src = bf16.data();
      bytes = bf16.size() * 2;
    }
    absl::StatusOr<Buffer> b = device_->Allocate(bytes);
    if (!b.ok()) return b;
    absl::Status st =
        device_->CopyToDeviceAsync(b->data(), src, bytes, nullptr);
    if (st.ok()) st = device_->SynchronizeStream(nullptr);
    if (!st.ok()) return st;
    return b;
  }

  KVCacheManager* m_;
  Device* device_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  std::vector<Shape> shapes_;  // Per layer.
  DType input_dtype_ = DType::kFloat32;
  std::map<SequenceId, Seq> seqs_;
};

// A sliding-window group and a full-attention group of one cache shape
// (float32 inputs): the group tests' configs.
struct HybridSpec {
  int32_t num_layers = 0;
  std::vector<int32_t> sliding_layers, full_layers;
  int32_t window = 0;
  int32_t num_kv_heads = 1, head_size = 8, head_size_v = 8;
  DType cache_dtype = DType::kInt8;
  int64_t num_blocks = 0;
  int32_t block_size = 4;
  int32_t max_tokens_per_step = 64;
  int32_t max_sequences_per_step = 8;
  bool full_first = false;  // The groups' order in layer_groups.
};

inline KVCacheConfig HybridConfig(const HybridSpec& spec) {
  KVCacheConfig c;
  c.num_layers = spec.num_layers;
  c.block_size = spec.block_size;
  c.num_blocks = spec.num_blocks;
  c.input_dtype = DType::kFloat32;
  c.max_tokens_per_step = spec.max_tokens_per_step;
  c.max_sequences_per_step = spec.max_sequences_per_step;
  LayerGroup sliding, full;
  sliding.kind = AttentionKind::kSlidingWindow;
  sliding.sliding_window = spec.window;
  for (LayerGroup* g : {&sliding, &full}) {
    g->num_kv_heads = spec.num_kv_heads;
    g->head_size = spec.head_size;
    g->head_size_v = spec.head_size_v;
    g->cache_dtype = spec.cache_dtype;
  }
  sliding.layers = spec.sliding_layers;
  full.layers = spec.full_layers;
  c.layer_groups = spec.full_first ? std::vector<LayerGroup>{full, sliding}
                                   : std::vector<LayerGroup>{sliding, full};
  return c;
}

// A manager with layer groups on the CPU backend and a GroupRunner driving
// it: the group tests' fixture. A config Create refuses fails the test (and
// leaves runner null).
struct GroupFixture {
  std::unique_ptr<Device> device = CreateCpuDevice();
  std::unique_ptr<KVCacheManager> manager;
  std::unique_ptr<GroupRunner> runner;

  GroupFixture(const KVCacheConfig& c, uint64_t seed) {
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) return;
    manager = *std::move(m);
    runner = std::make_unique<GroupRunner>(manager.get(), device.get(), seed);
  }
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_GROUP_RUNNER_H_
