// Layer groups on the CUDA backend against the CPU backend: the same random
// scenario (tests/group_runner.h: prefill chunks, decode past the sliding
// window, prefix hits, forks with copy-on-write, speculative steps,
// truncations, frees) on both must leave byte-identical caches and
// scales in every page slot, and every readable token must gather to the
// reference on CUDA too. Gemma-like (sliding + full, with V) and
// DeepSeek-like (K-only) configs, int8 and fp8; and groups of different cache
// shapes (records): 8 KV heads full beside 4 sliding, head sizes 128 / 256 /
// K-only 576, an int8 group beside a bf16 one, side and inline scales. Each
// round has a graph step whose uploaded per-table inputs must equal the CPU
// backend's byte for byte.

#include <algorithm>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/cuda_test_util.h"
#include "tests/group_runner.h"
#include "tests/make_layer_group.h"

namespace kvcache {
namespace {

enum class Kind { kGemmaLike, kKOnly, kHeads, kSizes, kDtypes };

// Groups of different shapes (`dtype` for the quantized ones).
KVCacheConfig MixedConfig(Kind kind, DType dtype, ScalePlacement placement) {
  KVCacheConfig c;
  c.block_size = 16;
  c.num_blocks = 256;
  c.input_dtype = DType::kFloat32;
  c.max_tokens_per_step = 1024;
  c.graph_max_tokens = 16;
  c.scale_placement = placement;
  if (kind == Kind::kHeads) {
    c.num_layers = 8;
    c.layer_groups = {MakeGroup({0, 1, 2, 4, 5, 6}, 48, 4, 128, 128, dtype),
                      MakeGroup({3, 7}, 0, 8, 128, 128, dtype)};
  } else if (kind == Kind::kSizes) {
    c.num_layers = 6;
    c.layer_groups = {MakeGroup({0, 3}, 48, 2, 128, 128, dtype),
                      MakeGroup({1, 4}, 0, 2, 256, 256, dtype),
                      MakeGroup({2, 5}, 0, 1, 576, 0, dtype)};
  } else {
    c.num_layers = 6;
    c.input_dtype = DType::kBFloat16;
    c.layer_groups = {MakeGroup({0, 1, 2, 3}, 48, 4, 128, 128, dtype),
                      MakeGroup({4, 5}, 0, 4, 128, 64, DType::kBFloat16)};
  }
  return c;
}

KVCacheConfig Config(bool k_only, DType dtype) {
  KVCacheConfig c;
  c.block_size = 16;
  c.num_blocks = 256;
  c.input_dtype = DType::kFloat32;
  c.max_tokens_per_step = 1024;
  c.graph_max_tokens = 16;
  LayerGroup sliding, full;
  sliding.kind = AttentionKind::kSlidingWindow;
  sliding.sliding_window = 48;
  for (LayerGroup* g : {&sliding, &full}) {
    g->num_kv_heads = k_only ? 1 : 4;
    g->head_size = k_only ? 576 : 128;
    g->head_size_v = k_only ? 0 : 64;
    g->cache_dtype = dtype;
  }
  if (k_only) {
    c.num_layers = 3;
    full.layers = {0, 1, 2};
    c.layer_groups = {full};
  } else {
    c.num_layers = 6;
    sliding.layers = {0, 1, 2, 3, 4};
    full.layers = {5};
    c.layer_groups = {sliding, full};
  }
  return c;
}

// Every allocation's bytes (each layer's view; layers sharing a slot repeat
// it): from each part's pointer to the end of its last row, by the view's
// strides (records interleave the parts, so the K part spans the slot).
std::vector<char> CacheBytes(KVCacheManager& m, Device& device) {
  std::vector<char> out;
  for (int layer = 0; layer < m.config().num_layers; ++layer) {
    const LayerView v = *m.GetLayerView(layer);
    const int64_t elem = static_cast<int64_t>(DTypeSize(v.cache_dtype));
    const int64_t last_slot = v.num_blocks * v.block_size - 1;
    auto extent = [&](const int64_t* st, int64_t row_elems) {
      return last_slot * st[1] + (v.num_kv_heads - 1) * st[2] + row_elems;
    };
    const int64_t key_row = v.key_row_pitch_bytes / elem;
    const int64_t value_row = v.value_row_pitch_bytes / elem;
    const struct {
      const void* p;
      int64_t bytes;
    } parts[] = {
        {v.key_cache, extent(v.key_strides, key_row) * elem},
        {v.value_cache, extent(v.value_strides, value_row) * elem},
        {v.key_scale, extent(v.scale_strides, 1) * 4},
        {v.value_scale, extent(v.scale_strides, 1) * 4},
    };
    for (const auto& part : parts) {
      if (part.p == nullptr) continue;
      const size_t at = out.size();
      out.resize(at + part.bytes);
      EXPECT_TRUE(device.CopyToHost(out.data() + at, part.p, part.bytes).ok());
    }
  }
  return out;
}

// The graph step's inputs of every table (GroupGraphStep), copied to the
// host: each table's slot mapping, then the shared positions and lengths,
// then the interleaved block tables.
absl::Status SnapshotGraphInputs(KVCacheManager& m, Device& device,
                                 std::vector<char>* out) {
  out->clear();
  for (int32_t t = 0; t < m.NumBlockTables(); ++t) {
    absl::StatusOr<GraphStepInputs> in = m.GroupGraphStep(t);
    if (!in.ok()) return in.status();
    const struct {
      const void* p;
      int64_t bytes;
    } parts[] = {
        {in->slot_mapping, in->max_tokens * 8},
        {in->positions, t == 0 ? in->max_tokens * 8 : 0},
        {in->seq_lens, t == 0 ? int64_t{in->max_sequences} * 4 : 0},
        {in->block_table,
         t == 0 ? int64_t{in->max_sequences} * in->row_stride * 4 : 0},
    };
    for (const auto& part : parts) {
      const size_t at = out->size();
      out->resize(at + part.bytes);
      if (part.bytes == 0) continue;
      if (absl::Status st =
              device.CopyToHost(out->data() + at, part.p, part.bytes);
          !st.ok()) {
        return st;
      }
    }
  }
  return absl::OkStatus();
}

struct Side {
  std::unique_ptr<Device> device;
  std::unique_ptr<KVCacheManager> manager;
  std::unique_ptr<testing::GroupRunner> runner;
};

Side Make(KVCacheConfig c, Backend backend, uint64_t seed) {
  Side s;
  c.backend = backend;
  if (backend == Backend::kCuda) {
    s.device = *CreateCudaDevice(0);
  } else {
    s.device = CreateCpuDevice();
  }
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return s;
  s.manager = *std::move(m);
  s.runner = std::make_unique<testing::GroupRunner>(s.manager.get(),
                                                    s.device.get(), seed);
  return s;
}

struct Case {
  Kind kind;
  DType dtype;
  ScalePlacement placement = ScalePlacement::kSide;
};

class CudaGroupsTest : public ::testing::TestWithParam<Case> {};

TEST_P(CudaGroupsTest, CachesAreByteIdenticalToTheCpuBackend) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const Case& p = GetParam();
  const KVCacheConfig c = p.kind == Kind::kGemmaLike || p.kind == Kind::kKOnly
                              ? Config(p.kind == Kind::kKOnly, p.dtype)
                              : MixedConfig(p.kind, p.dtype, p.placement);
  Side cpu = Make(c, Backend::kCpu, seed);
  Side cuda = Make(c, Backend::kCuda, seed);
  ASSERT_NE(cpu.manager, nullptr);
  ASSERT_NE(cuda.manager, nullptr);
  std::mt19937_64 rng(seed);
  // The same operations on both sides (each runner draws the same tokens).
  auto both = [&](auto&& op) {
    const absl::Status a = op(*cpu.runner);
    const absl::Status b = op(*cuda.runner);
    EXPECT_EQ(a, b);
    return a;
  };
  std::vector<SequenceId> live;
  SequenceId next = 1;
  std::vector<TokenId> shared = cpu.runner->RandomTokens(40, 1000);
  cuda.runner->RandomTokens(40, 1000);
  for (int round = 0; round < 12; ++round) {
    // Add one (sharing a prefix half of the time), then steps.
    const SequenceId id = next++;
    std::vector<TokenId> prompt;
    if (rng() % 2 == 0) {
      prompt.assign(shared.begin(), shared.begin() + 8 + rng() % 32);
    }
    const int64_t extra = 1 + rng() % 60;
    for (int64_t i = 0; i < extra; ++i) {
      prompt.push_back(static_cast<TokenId>(rng() % 1000));
    }
    int64_t hit = 0;
    ASSERT_TRUE(both([&](testing::GroupRunner& r) {
                  absl::StatusOr<int64_t> h = r.Add(id, prompt);
                  if (h.ok()) hit = *h;
                  return h.status();
                }).ok());
    ASSERT_TRUE(both([&](testing::GroupRunner& r) {
                  return r.Step({id},
                                {static_cast<int64_t>(prompt.size()) - hit});
                }).ok());
    live.push_back(id);
    for (int step = 0; step < 20; ++step) {
      std::vector<int64_t> ones(live.size(), 1);
      ASSERT_TRUE(both([&](testing::GroupRunner& r) {
                    return r.Step(live, ones);
                  }).ok());
    }
    // A decode graph step padded to a power of two (the Appends run on the
    // host, as at capture, from each table's fixed-address mapping): the
    // CUDA side's uploaded inputs equal the CPU side's byte for byte.
    {
      std::vector<int64_t> ones(live.size(), 1);
      int64_t padded = 1;
      while (padded < static_cast<int64_t>(live.size())) padded *= 2;
      std::vector<char> inputs[2];
      ASSERT_TRUE(both([&](testing::GroupRunner& r) {
                    const bool on_cuda = &r == cuda.runner.get();
                    Side& side = on_cuda ? cuda : cpu;
                    return r.GraphStep(
                        live, ones, padded,
                        [&](const StepPlanInfo&, std::optional<SequenceId>) {
                          return SnapshotGraphInputs(
                              *side.manager, *side.device, &inputs[on_cuda]);
                        });
                  }).ok());
      ASSERT_FALSE(inputs[0].empty());
      EXPECT_TRUE(inputs[0] == inputs[1])
          << "graph-step inputs differ between the backends";
    }
    // A fork (its next step copies the shared partial blocks), a
    // speculative step and a truncation, which a sliding window may refuse:
    // identically on both sides.
    if (live.size() <= 2) {
      const SequenceId parent = live[rng() % live.size()];
      const SequenceId child = next++;
      ASSERT_TRUE(both([&](testing::GroupRunner& r) {
                    return r.Fork(parent, child);
                  }).ok());
      live.push_back(child);
    }
    std::vector<int64_t> drafts(live.size()), accepted(live.size());
    for (size_t i = 0; i < live.size(); ++i) {
      drafts[i] = 1 + static_cast<int64_t>(rng() % 4);
      accepted[i] = static_cast<int64_t>(rng() % (drafts[i] + 1));
    }
    testing::GroupStepOptions speculative;
    speculative.accepted = &accepted;
    ASSERT_TRUE(both([&](testing::GroupRunner& r) {
                  return r.Step(live, drafts, speculative);
                }).ok());
    const SequenceId cut = live[rng() % live.size()];
    const int64_t len = *cpu.manager->SequenceLength(cut);
    const int64_t to = len - std::min<int64_t>(len, rng() % 6);
    both([&](testing::GroupRunner& r) {
      return r.Truncate(cut, to);
    }).IgnoreError();  // Refused or not, the same on both (checked).
    if (live.size() > 3) {
      const SequenceId gone = live[rng() % live.size()];
      ASSERT_TRUE(
          both([&](testing::GroupRunner& r) { return r.Free(gone); }).ok());
      live.erase(std::find(live.begin(), live.end(), gone));
    }
    ASSERT_TRUE(cuda.manager->Validate().ok());
    if (round % 4 == 3) {  // The fp8 reference is slow: every few rounds.
      ASSERT_TRUE(cuda.runner->CheckAll().ok()) << cuda.runner->CheckAll();
    }
  }
  const std::vector<char> a = CacheBytes(*cpu.manager, *cpu.device);
  const std::vector<char> b = CacheBytes(*cuda.manager, *cuda.device);
  ASSERT_EQ(a.size(), b.size());
  size_t first = 0;
  while (first < a.size() && a[first] == b[first]) ++first;
  EXPECT_EQ(first, a.size())
      << "first differing byte " << first << " of " << a.size();
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaGroupsTest,
    ::testing::Values(
        Case{Kind::kGemmaLike, DType::kInt8},
        Case{Kind::kGemmaLike, DType::kFp8E4M3},
        Case{Kind::kKOnly, DType::kInt8}, Case{Kind::kKOnly, DType::kFp8E4M3},
        Case{Kind::kHeads, DType::kInt8},
        Case{Kind::kHeads, DType::kFp8E4M3, ScalePlacement::kInline},
        Case{Kind::kSizes, DType::kInt8}, Case{Kind::kSizes, DType::kFp8E4M3},
        Case{Kind::kSizes, DType::kInt8, ScalePlacement::kInline},
        Case{Kind::kDtypes, DType::kInt8},
        Case{Kind::kDtypes, DType::kFp8E4M3, ScalePlacement::kInline}));

}  // namespace
}  // namespace kvcache
