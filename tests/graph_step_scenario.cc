#include "tests/graph_step_scenario.h"

#include <algorithm>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"
#include "testing/kv_reference.h"

namespace kvcache::testing {
namespace {

constexpr int kFamilies = 3;
constexpr int kFamilyTokens = 8;  // Two full blocks of 4: prefix hits.
constexpr int kMaxLive = 12;
constexpr int64_t kMaxLength = 40;

StepKV RandomKV(const ScenarioOptions& o, int64_t rows, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> value(-2.0f, 2.0f);
  StepKV kv;
  kv.rows = rows;
  kv.k.resize(o.num_layers);
  kv.v.resize(o.num_layers);
  for (int layer = 0; layer < o.num_layers; ++layer) {
    kv.k[layer].resize(rows * o.num_kv_heads * o.head_size);
    kv.v[layer].resize(rows * o.num_kv_heads * o.head_size_v);
    for (uint16_t& x : kv.k[layer]) x = FloatToBf16(value(rng));
    for (uint16_t& x : kv.v[layer]) x = FloatToBf16(value(rng));
  }
  return kv;
}

absl::Status StepError(int step, absl::string_view what,
                       const absl::Status& s) {
  return absl::Status(
      s.code(), absl::StrCat("step ", step, " ", what, ": ", s.message()));
}

}  // namespace

KVCacheConfig ScenarioConfig(const ScenarioOptions& o, Backend backend,
                             bool graph) {
  KVCacheConfig c;
  c.num_layers = o.num_layers;
  c.num_kv_heads = o.num_kv_heads;
  c.head_size = o.head_size;
  c.head_size_v = o.head_size_v;
  c.block_size = o.block_size;
  c.cache_dtype = o.cache_dtype;
  c.input_dtype = DType::kBFloat16;
  c.backend = backend;
  c.num_blocks = 160;
  c.cpu_threads = 1;
  c.max_tokens_per_step = 64;
  c.max_sequences_per_step = 32;
  c.max_blocks_per_sequence = 16;
  c.graph_max_tokens = graph ? static_cast<int32_t>(o.capture_tokens) : 0;
  if (o.sliding_window > 0) {
    LayerGroup sliding, full;
    sliding.kind = AttentionKind::kSlidingWindow;
    sliding.sliding_window = o.sliding_window;
    for (LayerGroup* g : {&sliding, &full}) {
      g->num_kv_heads = o.num_kv_heads;
      g->head_size = o.head_size;
      g->head_size_v = o.head_size_v;
      g->cache_dtype = o.cache_dtype;
    }
    for (int l = 0; l + 1 < o.num_layers; ++l) sliding.layers.push_back(l);
    full.layers = {o.num_layers - 1};
    c.layer_groups = {sliding, full};
    c.num_kv_heads = c.head_size = c.head_size_v = 0;
    c.num_blocks = 480;  // A page per table: the full table's and windows'.
  }
  return c;
}

absl::Status RunScenario(const ScenarioOptions& o, KVCacheManager& m,
                         StepRunner& runner, ScenarioCounts* counts) {
  std::mt19937_64 rng(o.seed);
  std::mt19937_64 data(Mix(o.seed));
  std::vector<std::vector<TokenId>> families(kFamilies);
  for (auto& f : families) {
    for (int i = 0; i < kFamilyTokens; ++i) f.push_back(rng() % 1000);
  }
  std::map<SequenceId, int64_t> live;  // id -> known length.
  SequenceId next_id = 1;
  auto rand = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto free_one = [&](int step, SequenceId id) -> absl::Status {
    if (absl::Status s = m.Free(id); !s.ok()) return StepError(step, "free", s);
    live.erase(id);
    ++counts->frees;
    return absl::OkStatus();
  };
  for (int step = 0; step < o.steps; ++step) {
    // Admit a sequence from a prompt family, and prefill it.
    if (live.size() < 2 || (live.size() < kMaxLive && rand(0, 3) == 0)) {
      std::vector<TokenId> prompt = families[rand(0, kFamilies - 1)];
      for (int64_t i = rand(1, 6); i > 0; --i) prompt.push_back(rng() % 1000);
      const SequenceId id = next_id++;
      absl::StatusOr<int64_t> hit = m.AddSequence(id, prompt);
      if (!hit.ok()) return StepError(step, "add", hit.status());
      counts->prefix_hit_tokens += *hit;
      const ReserveRequest request{
          id, {}, static_cast<int64_t>(prompt.size()) - *hit};
      const StepKV kv = RandomKV(o, request.num_tokens, data);
      if (absl::Status s = runner.Prefill(m, {request}, kv); !s.ok()) {
        return StepError(step, "prefill", s);
      }
      live[id] = static_cast<int64_t>(prompt.size());
      ++counts->prefills;
    }
    // Fork one (its partial last block is shared: copy-on-write next step).
    if (live.size() < kMaxLive && rand(0, 5) == 0) {
      auto parent = std::next(live.begin(), rand(0, live.size() - 1));
      const SequenceId child = next_id++;
      if (absl::Status s = m.Fork(parent->first, child); !s.ok()) {
        return StepError(step, "fork", s);
      }
      live[child] = parent->second;
      ++counts->forks;
    }
    // Free the long ones, and now and then any one.
    for (auto it = live.begin(); it != live.end();) {
      const SequenceId id = (it++)->first;
      if (live[id] >= kMaxLength) {
        if (absl::Status s = free_one(step, id); !s.ok()) return s;
      }
    }
    if (live.size() > 3 && rand(0, 7) == 0) {
      if (absl::Status s = free_one(
              step, std::next(live.begin(), rand(0, live.size() - 1))->first);
          !s.ok()) {
        return s;
      }
    }
    if (live.empty()) continue;
    // Decode 1..capture_tokens of them, padded to capture_tokens.
    std::vector<SequenceId> ids;
    for (const auto& [id, length] : live) ids.push_back(id);
    std::shuffle(ids.begin(), ids.end(), rng);
    const int64_t n = rand(
        1,
        std::min<int64_t>(o.capture_tokens, static_cast<int64_t>(ids.size())));
    std::vector<ReserveRequest> batch;
    for (int64_t i = 0; i < n; ++i) {
      batch.push_back(ReserveRequest{ids[i], {TokenId(rng() % 1000)}, 1});
    }
    const StepKV kv = RandomKV(o, o.capture_tokens, data);
    if (absl::Status s = runner.Decode(m, batch, o.capture_tokens, kv);
        !s.ok()) {
      return StepError(step, "decode", s);
    }
    for (const ReserveRequest& r : batch) ++live[r.sequence];
    ++counts->decode_steps;
    counts->padded_steps += n < o.capture_tokens;
  }
  counts->block_copies = m.Metrics().block_copies;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<char>> CacheBytes(const KVCacheManager& m,
                                             const CopyToHostFn& copy_to_host) {
  std::vector<char> bytes;
  for (int layer = 0; layer < m.config().num_layers; ++layer) {
    absl::StatusOr<LayerView> view = m.GetLayerView(layer);
    if (!view.ok()) return view.status();
    const int64_t elem = static_cast<int64_t>(DTypeSize(view->cache_dtype));
    const int64_t k = view->num_blocks * view->key_strides[0] * elem;
    const int64_t v = view->num_blocks * view->value_strides[0] * elem;
    const int64_t s = view->key_scale == nullptr
                          ? 0
                          : view->num_blocks * view->scale_strides[0] * 4;
    const size_t at = bytes.size();
    bytes.resize(at + k + v + 2 * s);
    char* out = bytes.data() + at;
    for (absl::Status st :
         {copy_to_host(out, view->key_cache, k),
          copy_to_host(out + k, view->value_cache, v),
          s > 0 ? copy_to_host(out + k + v, view->key_scale, s)
                : absl::OkStatus(),
          s > 0 ? copy_to_host(out + k + v + s, view->value_scale, s)
                : absl::OkStatus()}) {
      if (!st.ok()) return st;
    }
  }
  return bytes;
}

}  // namespace kvcache::testing
