// Test helper: KVCacheManager::Attention end to end on either backend. Three
// sequences share prefix blocks (a prefix-cache hit) and a fork (copy-on-write
// of the partial block at the next decode step); attention over the batch,
// with 1 to 8 query tokens, window and soft-cap variants, is checked against
// the float64 reference computed from the manager's own cache (read through
// GetLayerView and BlockTable). `MemOps` moves bytes to and from the
// backend's memory (memcpy on the CPU, cudaMemcpy in the CUDA test).

#ifndef KVCACHE_TESTS_ATTENTION_MANAGER_SCENARIO_H_
#define KVCACHE_TESTS_ATTENTION_MANAGER_SCENARIO_H_

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "tests/attention_test_util.h"

namespace kvcache::testing {

struct MemOps {
  Backend backend = Backend::kCpu;
  MemoryKind memory = MemoryKind::kHost;
  std::function<void*(size_t)> alloc;
  std::function<void(void*)> release;
  std::function<void(void*, const void*, size_t)> to_backend;
  std::function<void(void*, const void*, size_t)> to_host;
};

// `placement`: the cache's scale placement; the reference reads either through
// the layer view (row pitch, scale byte offset) and unpacks it.
inline void RunAttentionManagerScenario(
    DType cache_dtype, const MemOps& mem,
    ScalePlacement placement = ScalePlacement::kSide) {
  SCOPED_TRACE(::testing::Message() << DTypeName(cache_dtype) << " "
                                    << ScalePlacementName(placement));
  KVCacheConfig config;
  config.scale_placement = placement;
  config.num_layers = 2;
  config.num_kv_heads = 2;
  config.num_q_heads = 8;
  config.head_size = 128;
  config.block_size = 16;
  config.cache_dtype = cache_dtype;
  config.input_dtype =
      IsQuantized(cache_dtype) ? DType::kBFloat16 : cache_dtype;
  config.backend = mem.backend;
  config.num_blocks = 64;
  config.cpu_threads = 2;
  auto manager = KVCacheManager::Create(config);
  ASSERT_TRUE(manager.ok()) << manager.status();
  KVCacheManager& m = **manager;
  std::mt19937_64 rng(2020);
  const int64_t H = 2, D = 128, Hq = 8;
  std::vector<void*> owned;
  auto backend_copy = [&](const std::vector<uint16_t>& host) {
    void* p = mem.alloc(host.size() * 2);
    mem.to_backend(p, host.data(), host.size() * 2);
    owned.push_back(p);
    return p;
  };
  auto step = [&](std::vector<ReserveRequest> batch) {
    absl::StatusOr<StepPlanInfo> plan = m.Reserve(batch);
    ASSERT_TRUE(plan.ok()) << plan.status();
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<uint16_t> k(plan->num_tokens * H * D), v(k.size());
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (uint16_t& x : k) x = ToHalf(config.input_dtype, normal(rng));
      for (uint16_t& x : v) x = ToHalf(config.input_dtype, normal(rng));
      const TensorView kv =
          TensorView::Contiguous(backend_copy(k), config.input_dtype,
                                 {plan->num_tokens, H, D}, mem.memory);
      const TensorView vv =
          TensorView::Contiguous(backend_copy(v), config.input_dtype,
                                 {plan->num_tokens, H, D}, mem.memory);
      ASSERT_TRUE(m.Append(plan->id, layer, kv, vv).ok());
    }
    ASSERT_TRUE(m.Commit(plan->id).ok());
  };
  std::vector<TokenId> p1(70), p2(68);
  for (int i = 0; i < 70; ++i) p1[i] = 1000 + i;
  for (int i = 0; i < 68; ++i) p2[i] = i < 48 ? p1[i] : 5000 + i;
  ASSERT_TRUE(m.AddSequence(1, p1).ok());
  step({{1, {}, 70}});
  absl::StatusOr<int64_t> hit = m.AddSequence(2, p2);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ(*hit, 48);  // Three shared blocks.
  step({{2, {}, 68 - *hit}});
  ASSERT_TRUE(m.Fork(1, 3).ok());
  step({{1, {7}, 1}, {3, {8}, 1}});  // Copy-on-write of block 4.

  const std::vector<SequenceId> ids = {1, 2, 3};
  for (int n : {1, 2, 8}) {
    for (int variant = 0; variant < 3; ++variant) {
      for (int layer = 0; layer < 2; ++layer) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " variant " << variant
                                          << " layer " << layer);
        AttentionOptions options;
        options.softmax_scale = 0.1f;
        options.num_query_tokens_per_sequence = n;
        options.window = variant == 1 ? 20 : 0;
        options.soft_cap = variant == 2 ? 3.0f : 0.0f;
        const int64_t rows = 3 * n;
        std::vector<uint16_t> q(rows * Hq * D);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (uint16_t& x : q) x = ToHalf(DType::kBFloat16, normal(rng));
        std::vector<uint16_t> o(rows * Hq * D, 0x7FC1);
        void* dq = backend_copy(q);
        void* dout = backend_copy(o);
        ASSERT_TRUE(
            m.Attention(ids, layer,
                        TensorView::Contiguous(dq, DType::kBFloat16,
                                               {rows, Hq, D}, mem.memory),
                        TensorView::Contiguous(dout, DType::kBFloat16,
                                               {rows, Hq, D}, mem.memory),
                        options)
                .ok());
        mem.to_host(o.data(), dout, o.size() * 2);
        // The reference reads the manager's cache on the host.
        absl::StatusOr<LayerView> view = m.GetLayerView(layer);
        ASSERT_TRUE(view.ok());
        const int64_t slots = view->num_blocks * view->block_size;
        std::vector<uint8_t> kc(slots * H * D * DTypeSize(cache_dtype)),
            vc(kc.size());
        std::vector<float> ks(IsQuantized(cache_dtype) ? slots * H : 0),
            vs(ks.size());
        if (view->scale_placement == ScalePlacement::kInline) {
          // Rows of key_row_pitch_bytes: D codes, the scale at
          // scale_byte_offset.
          const int64_t pitch = view->key_row_pitch_bytes;
          std::vector<uint8_t> kraw(slots * H * pitch), vraw(kraw.size());
          mem.to_host(kraw.data(), view->key_cache, kraw.size());
          mem.to_host(vraw.data(), view->value_cache, vraw.size());
          for (int64_t r = 0; r < slots * H; ++r) {
            std::memcpy(&kc[r * D], &kraw[r * pitch], D);
            std::memcpy(&vc[r * D], &vraw[r * pitch], D);
            std::memcpy(&ks[r], &kraw[r * pitch + view->scale_byte_offset], 4);
            std::memcpy(&vs[r], &vraw[r * pitch + view->scale_byte_offset], 4);
          }
        } else {
          mem.to_host(kc.data(), view->key_cache, kc.size());
          mem.to_host(vc.data(), view->value_cache, vc.size());
          if (!ks.empty()) {
            mem.to_host(ks.data(), view->key_scale, ks.size() * 4);
            mem.to_host(vs.data(), view->value_scale, vs.size() * 4);
          }
        }
        RefBatch b;
        b.cache.layout = {view->num_blocks, view->block_size, H, D, D,
                          cache_dtype};
        b.cache.key_cache = kc.data();
        b.cache.value_cache = vc.data();
        b.cache.key_scale = ks.data();
        b.cache.value_scale = vs.data();
        b.q_start = {0};
        for (SequenceId id : ids) {
          absl::StatusOr<std::vector<BlockId>> table = m.BlockTable(id);
          ASSERT_TRUE(table.ok());
          b.tables.emplace_back(table->begin(), table->end());
          b.seq_lens.push_back(static_cast<int32_t>(*m.SequenceLength(id)));
          b.q_start.push_back(b.q_start.back() + n);
        }
        b.q = q.data();
        b.num_q_heads = static_cast<int32_t>(Hq);
        b.softmax_scale = options.softmax_scale;
        b.soft_cap = options.soft_cap;
        b.window = options.window;
        const AttnError e =
            CompareAttention(o, DType::kBFloat16, ReferenceAttention(b));
        EXPECT_TRUE(e.finite);
        EXPECT_LE(e.relative(), 2e-3)
            << "raw max abs " << e.max_abs << " max |o| " << e.max_ref;
      }
    }
  }
  ASSERT_TRUE(m.Validate().ok());
  for (void* p : owned) mem.release(p);
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_ATTENTION_MANAGER_SCENARIO_H_
