// The C++ run the Python tests compare cache bytes with (issue #19): the same
// config, steps and inputs as python/tests/test_kvcache.py's
// CacheBytesEqualTheCppRun, through the C++ API on the CPU backend (CPU and
// CUDA caches are bit-identical, DESIGN.md section 3). Writes every layer's
// key cache, value cache, key scales and value scales, element by element in
// [block, token, head, dim] order, to the file named by argv[2].
//
//   reference_dump int8|fp8 OUT_FILE

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "api/kv_cache_manager.h"

namespace {

constexpr int kLayers = 2, kHeads = 2, kHeadSize = 16;

// Exactly representable in float32, so Python computes the same values.
float Input(int64_t seq, int64_t pos, int layer, int head, int d, int kv) {
  const int64_t x =
      (seq * 7 + pos * 31 + layer * 131 + head * 17 + d * 5 + kv * 3) % 255;
  return static_cast<float>(x - 127) / 32.0f;
}

struct Row {
  int64_t seq, pos;
};

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "reference_dump: %s\n", s.ToString().c_str());
  return 1;
}

absl::Status Step(kvcache::KVCacheManager& m,
                  const std::vector<kvcache::ReserveRequest>& batch,
                  const std::vector<Row>& rows) {
  absl::StatusOr<kvcache::StepPlanInfo> plan = m.Reserve(batch);
  if (!plan.ok()) return plan.status();
  const int64_t t = static_cast<int64_t>(rows.size());
  std::vector<float> k(t * kHeads * kHeadSize), v(k.size());
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int64_t i = 0; i < t; ++i) {
      for (int h = 0; h < kHeads; ++h) {
        for (int d = 0; d < kHeadSize; ++d) {
          const int64_t at = (i * kHeads + h) * kHeadSize + d;
          k[at] = Input(rows[i].seq, rows[i].pos, layer, h, d, 0);
          v[at] = Input(rows[i].seq, rows[i].pos, layer, h, d, 1);
        }
      }
    }
    const auto kt = kvcache::TensorView::Contiguous(
        k.data(), kvcache::DType::kFloat32, {t, kHeads, kHeadSize});
    const auto vt = kvcache::TensorView::Contiguous(
        v.data(), kvcache::DType::kFloat32, {t, kHeads, kHeadSize});
    if (absl::Status s = m.Append(plan->id, layer, kt, vt); !s.ok()) return s;
  }
  return m.Commit(plan->id);
}

// Elements of a [blocks, tokens, heads, (dim)] view, in that order.
void Write(std::FILE* f, const void* base, size_t elem, const int64_t* strides,
           const int64_t* shape, int ndim) {
  const auto* p = static_cast<const char*>(base);
  const int64_t inner = ndim == 4 ? shape[3] : 1;
  for (int64_t b = 0; b < shape[0]; ++b) {
    for (int64_t t = 0; t < shape[1]; ++t) {
      for (int64_t h = 0; h < shape[2]; ++h) {
        for (int64_t d = 0; d < inner; ++d) {
          const int64_t at = b * strides[0] + t * strides[1] + h * strides[2] +
                             (ndim == 4 ? d * strides[3] : 0);
          std::fwrite(p + at * elem, elem, 1, f);
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: reference_dump int8|fp8 OUT_FILE\n");
    return 2;
  }
  kvcache::KVCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_size = kHeadSize;
  c.block_size = 4;
  c.num_blocks = 16;
  c.cache_dtype = std::string(argv[1]) == "fp8" ? kvcache::DType::kFp8E4M3
                                                : kvcache::DType::kInt8;
  c.input_dtype = kvcache::DType::kFloat32;
  auto m = kvcache::KVCacheManager::Create(c);
  if (!m.ok()) return Fail(m.status());
  std::vector<kvcache::TokenId> p1, p2;
  for (int i = 0; i < 10; ++i) p1.push_back(100 + i);
  for (int i = 0; i < 7; ++i) p2.push_back(200 + i);
  if (auto s = (*m)->AddSequence(1, p1); !s.ok()) return Fail(s.status());
  if (auto s = (*m)->AddSequence(2, p2); !s.ok()) return Fail(s.status());
  std::vector<Row> rows;
  for (int i = 0; i < 10; ++i) rows.push_back({1, i});
  for (int i = 0; i < 7; ++i) rows.push_back({2, i});
  if (absl::Status s = Step(**m, {{1, {}, 10}, {2, {}, 7}}, rows); !s.ok()) {
    return Fail(s);
  }
  if (absl::Status s =
          Step(**m, {{1, {110}, 1}, {2, {207}, 1}}, {{1, 10}, {2, 7}});
      !s.ok()) {
    return Fail(s);
  }
  std::FILE* f = std::fopen(argv[2], "wb");
  if (f == nullptr) return 1;
  for (int layer = 0; layer < kLayers; ++layer) {
    absl::StatusOr<kvcache::LayerView> v = (*m)->GetLayerView(layer);
    if (!v.ok()) return Fail(v.status());
    const int64_t k_shape[4] = {v->num_blocks, v->block_size, v->num_kv_heads,
                                v->head_size};
    const int64_t v_shape[4] = {v->num_blocks, v->block_size, v->num_kv_heads,
                                v->head_size_v};
    Write(f, v->key_cache, 1, v->key_strides, k_shape, 4);
    Write(f, v->value_cache, 1, v->value_strides, v_shape, 4);
    Write(f, v->key_scale, 4, v->scale_strides, k_shape, 3);
    Write(f, v->value_scale, 4, v->scale_strides, k_shape, 3);
  }
  std::fclose(f);
  return 0;
}
