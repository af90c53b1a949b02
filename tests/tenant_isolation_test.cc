// Property test of issue #12 items 5 and 6: a tenant never reads another
// tenant's bytes through any public path. Random tenants (binary salts: empty,
// one zero byte, salts that differ only after a zero byte) add sequences with
// prompts drawn from a small shared set (so that without salts they would hit
// each other's blocks), fork them, decode and free them in a pool small enough
// that blocks pass between tenants all the time. Every element a tenant writes
// is its own marker value; after every call, every committed token of every
// live sequence is read through BatchBlockTable + GetLayerView (as an
// engine's attention kernel would, also while a plan is in flight, before its
// Append) and through Gather, and must hold the reader's marker.

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "testing/kv_reference.h"

namespace kvcache {
namespace {

constexpr int kLayers = 2, kHeads = 2, kHeadSize = 8, kBlockSize = 4;

const std::vector<std::string>& Salts() {
  static const std::vector<std::string> salts = {
      "", std::string(1, '\0'), std::string("\0Alice", 6),
      std::string("\0Bob", 4), std::string("\0Alice\0", 7)};
  return salts;
}

// The value every K/V element of `tenant` holds in `layer` (exact in bf16).
float Marker(int tenant, int layer) {
  return static_cast<float>(1 + tenant * kLayers + layer);
}

class TenantIsolation : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    KVCacheConfig c;
    c.num_layers = kLayers;
    c.num_kv_heads = kHeads;
    c.head_size = kHeadSize;
    c.block_size = kBlockSize;
    c.cache_dtype = GetParam();
    c.input_dtype = GetParam() == DType::kInt8 ? DType::kBFloat16 : GetParam();
    c.num_blocks = 24;
    c.max_inflight_plans = 1;
    absl::StatusOr<std::unique_ptr<KVCacheManager>> m =
        KVCacheManager::Create(c);
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = *std::move(m);
  }

  // Writes `tokens` tokens of tenant `tenant` into every layer of the plan.
  void AppendAll(uint64_t plan, int64_t tokens, int tenant) {
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<uint16_t> data(tokens * kHeads * kHeadSize,
                                 testing::FloatToBf16(Marker(tenant, layer)));
      TensorView kv = TensorView::Contiguous(data.data(), DType::kBFloat16,
                                             {tokens, kHeads, kHeadSize});
      ASSERT_TRUE(manager_->Append(plan, layer, kv, kv).ok());
    }
  }

  // The value element `i` of a cache row holds, as the engine reads it.
  static float ReadElement(const LayerView& view, bool value, int64_t block,
                           int64_t offset, int64_t head, int64_t i) {
    const int64_t* s = value ? view.value_strides : view.key_strides;
    const int64_t at = block * s[0] + offset * s[1] + head * s[2] + i;
    const void* base = value ? view.value_cache : view.key_cache;
    if (view.cache_dtype == DType::kBFloat16) {
      return testing::Bf16ToFloat(static_cast<const uint16_t*>(base)[at]);
    }
    const float* scales = value ? view.value_scale : view.key_scale;
    const float scale =
        scales[block * view.scale_strides[0] + offset * view.scale_strides[1] +
               head * view.scale_strides[2]];
    return static_cast<float>(static_cast<const int8_t*>(base)[at]) * scale;
  }

  static bool Near(float got, float want) {
    return std::fabs(got - want) <= 1e-5f * want;
  }

  // Every committed token of `id` holds its tenant's markers, read through
  // the block table and the layer views, and through Gather.
  void CheckOwnBytes(SequenceId id) {
    const int tenant = tenant_of_.at(id);
    absl::StatusOr<BlockTableView> table = manager_->BatchBlockTable({id});
    ASSERT_TRUE(table.ok()) << table.status();
    const int64_t len = table->seq_lens[0];
    for (int layer = 0; layer < kLayers; ++layer) {
      const float want = Marker(tenant, layer);
      absl::StatusOr<LayerView> view = manager_->GetLayerView(layer);
      ASSERT_TRUE(view.ok());
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t block = table->block_table[pos / kBlockSize];
        for (bool value : {false, true}) {
          for (int64_t h = 0; h < kHeads; ++h) {
            for (int64_t i = 0; i < kHeadSize; ++i) {
              const float got =
                  ReadElement(*view, value, block, pos % kBlockSize, h, i);
              ASSERT_TRUE(Near(got, want))
                  << "tenant " << tenant << " sequence " << id << " layer "
                  << layer << " token " << pos << " block " << block
                  << " reads " << got << " through its block table, not "
                  << want;
            }
          }
        }
      }
      if (len == 0) continue;
      std::vector<float> k(len * kHeads * kHeadSize), v(k.size());
      ASSERT_TRUE(manager_
                      ->Gather(id, layer, 0, len,
                               TensorView::Contiguous(k.data(), DType::kFloat32,
                                                      {len, kHeads, kHeadSize}),
                               TensorView::Contiguous(v.data(), DType::kFloat32,
                                                      {len, kHeads, kHeadSize}))
                      .ok());
      for (size_t i = 0; i < k.size(); ++i) {
        ASSERT_TRUE(Near(k[i], want) && Near(v[i], want))
            << "tenant " << tenant << " sequence " << id << " gathers " << k[i]
            << " / " << v[i] << ", not " << want;
      }
    }
  }

  void CheckAll() {
    for (const auto& [id, tenant] : tenant_of_) {
      CheckOwnBytes(id);
      if (HasFatalFailure()) return;
    }
    ASSERT_TRUE(manager_->Validate().ok()) << manager_->Validate();
  }

  // One random call (and its step, for Add and Decode).
  void Step(std::mt19937& rng) {
    auto pick = [&](int n) {
      return static_cast<int>(
          std::uniform_int_distribution<int>(0, n - 1)(rng));
    };
    auto live = [&]() {
      auto it = tenant_of_.begin();
      std::advance(it, pick(static_cast<int>(tenant_of_.size())));
      return it->first;
    };
    const int op = tenant_of_.empty() ? 0 : pick(5);
    if (op == 0 || op == 1) {  // Add (a prefix hit when the tenant has it).
      const int tenant = pick(static_cast<int>(Salts().size()));
      std::vector<TokenId> prompt(4 + pick(8));
      const int variant = pick(3);
      for (size_t i = 0; i < prompt.size(); ++i) {
        prompt[i] = static_cast<TokenId>(variant * 100 + i);
      }
      ExtraKey extra;
      extra.salt = Salts()[tenant];
      const SequenceId id = next_id_++;
      absl::StatusOr<int64_t> hit = manager_->AddSequence(id, prompt, extra);
      ASSERT_TRUE(hit.ok()) << hit.status();
      tenant_of_[id] = tenant;
      CheckOwnBytes(id);  // The prefix hit is the tenant's own.
      const int64_t todo = static_cast<int64_t>(prompt.size()) - *hit;
      absl::StatusOr<StepPlanInfo> plan = manager_->Reserve({{id, {}, todo}});
      if (!plan.ok()) {  // Pool full: give up the sequence.
        ASSERT_TRUE(absl::IsResourceExhausted(plan.status()));
        ASSERT_TRUE(manager_->Free(id).ok());
        tenant_of_.erase(id);
        return;
      }
      AppendAll(plan->id, todo, tenant);
      ASSERT_TRUE(manager_->Commit(plan->id).ok());
    } else if (op == 2) {  // Fork.
      const SequenceId parent = live();
      const SequenceId child = next_id_++;
      ASSERT_TRUE(manager_->Fork(parent, child).ok());
      tenant_of_[child] = tenant_of_[parent];
    } else if (op == 3) {  // Decode one token; check before its Append.
      const SequenceId id = live();
      absl::StatusOr<StepPlanInfo> plan =
          manager_->Reserve({{id, {static_cast<TokenId>(pick(50))}, 1}});
      if (!plan.ok()) {
        ASSERT_TRUE(absl::IsResourceExhausted(plan.status()));
        return;
      }
      CheckAll();  // The plan's table (a copy after Fork) is readable now.
      if (HasFatalFailure()) return;
      AppendAll(plan->id, 1, tenant_of_[id]);
      ASSERT_TRUE(manager_->Commit(plan->id).ok());
    } else {  // Free.
      const SequenceId id = live();
      ASSERT_TRUE(manager_->Free(id).ok());
      tenant_of_.erase(id);
    }
  }

  std::unique_ptr<KVCacheManager> manager_;
  std::map<SequenceId, int> tenant_of_;
  SequenceId next_id_ = 1;
};

TEST_P(TenantIsolation, NoTenantReadsAnotherTenantsBytes) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    std::mt19937 rng(seed);
    for (int op = 0; op < 400; ++op) {
      Step(rng);
      if (HasFatalFailure()) return;
      CheckAll();
      if (HasFatalFailure()) return;
    }
    for (const auto& [id, tenant] : tenant_of_) {
      ASSERT_TRUE(manager_->Free(id).ok());
    }
    tenant_of_.clear();
  }
  EXPECT_GT(manager_->Metrics().block_copies, 0);
  EXPECT_GT(manager_->Metrics().prefix_hit_tokens, 0);
}

INSTANTIATE_TEST_SUITE_P(CacheDtypes, TenantIsolation,
                         ::testing::Values(DType::kBFloat16, DType::kInt8),
                         [](const auto& info) {
                           return std::string(DTypeName(info.param));
                         });

}  // namespace
}  // namespace kvcache
