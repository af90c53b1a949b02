// Test helper: an independent float64 reference of paged decode attention
// (semantics in kernels/attention_params.h), written from the definition: for
// each query row, the scores of every key it attends over the dequantized
// cache (code * scale in float32, as the design defines it, then widened to
// double), a max-subtracted softmax and the weighted sum of V, all in double.
// Host buffers only.

#ifndef KVCACHE_TESTS_ATTENTION_REFERENCE_H_
#define KVCACHE_TESTS_ATTENTION_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/cache_layout.h"
#include "core/dtype.h"
#include "kernels/float_convert.h"
#include "kernels/fp8.h"
#include "kernels/quantize.h"

namespace kvcache::testing {

// One cache element (index `i` of a cache of `dtype`) dequantized with `scale`.
inline double CacheValue(const void* cache, DType dtype, int64_t i,
                         float scale) {
  switch (dtype) {
    case DType::kInt8: {
      const float code = static_cast<const int8_t*>(cache)[i];
      return static_cast<double>(internal::Dequantize(code, scale));
    }
    case DType::kFp8E4M3: {
      const float code =
          internal::Fp8E4M3ToFloat(static_cast<const uint8_t*>(cache)[i]);
      return static_cast<double>(internal::Dequantize(code, scale));
    }
    case DType::kBFloat16:
      return internal::BFloat16ToFloat(static_cast<const uint16_t*>(cache)[i]);
    default:
      return internal::Float16ToFloat(static_cast<const uint16_t*>(cache)[i]);
  }
}

inline double Half(DType dtype, uint16_t h) {
  return dtype == DType::kBFloat16 ? internal::BFloat16ToFloat(h)
                                   : internal::Float16ToFloat(h);
}

// A batch on the host: the queries of sequence i are q rows
// [q_start[i], q_start[i+1]), q [rows, Hq, D] contiguous 16-bit.
struct RefBatch {
  LayerCache cache;  // Host pointers.
  std::vector<std::vector<int32_t>> tables;
  std::vector<int32_t> seq_lens;
  std::vector<int32_t> q_start;
  const uint16_t* q = nullptr;
  DType q_dtype = DType::kBFloat16;
  int32_t num_q_heads = 0;
  double softmax_scale = 1.0;
  double soft_cap = 0.0;
  int32_t window = 0;
};

// Returns o [rows, Hq, Dv] in double; rows that attend nothing are 0.
inline std::vector<double> ReferenceAttention(const RefBatch& b) {
  const CacheLayout& L = b.cache.layout;
  const int64_t D = L.head_size, Dv = L.head_size_v, Hkv = L.num_heads;
  const int64_t Hq = b.num_q_heads, G = Hq / Hkv;
  const int64_t rows = b.q_start.back();
  std::vector<double> out(rows * Hq * Dv, 0.0);
  const bool quant = IsQuantized(L.cache_dtype);
  for (size_t i = 0; i < b.seq_lens.size(); ++i) {
    const int64_t len = b.seq_lens[i];
    const int64_t T = b.q_start[i + 1] - b.q_start[i];
    if (len <= 0) continue;
    for (int64_t j = 0; j < T; ++j) {
      const int64_t pos = len - T + j;
      const int64_t lo =
          b.window > 0 ? std::max<int64_t>(0, pos - b.window + 1) : 0;
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t kvh = h / G;
        const uint16_t* q = b.q + ((b.q_start[i] + j) * Hq + h) * D;
        std::vector<double> scores;
        std::vector<int64_t> slots;
        for (int64_t k = lo; k <= pos; ++k) {
          const int64_t slot =
              int64_t{b.tables[i][k / L.block_size]} * L.block_size +
              k % L.block_size;
          const float ks = quant ? b.cache.key_scale[slot * Hkv + kvh] : 0.f;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += Half(b.q_dtype, q[d]) *
                   CacheValue(b.cache.key_cache, L.cache_dtype,
                              (slot * Hkv + kvh) * D + d, ks);
          }
          double x = dot * b.softmax_scale;
          if (b.soft_cap > 0) x = b.soft_cap * std::tanh(x / b.soft_cap);
          scores.push_back(x);
          slots.push_back(slot);
        }
        if (scores.empty()) continue;
        const double mx = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (double& s : scores) sum += (s = std::exp(s - mx));
        double* o = out.data() + ((b.q_start[i] + j) * Hq + h) * Dv;
        for (size_t k = 0; k < slots.size(); ++k) {
          const float vs =
              quant ? b.cache.value_scale[slots[k] * Hkv + kvh] : 0.f;
          for (int64_t d = 0; d < Dv; ++d) {
            o[d] += scores[k] / sum *
                    CacheValue(b.cache.value_cache, L.cache_dtype,
                               (slots[k] * Hkv + kvh) * Dv + d, vs);
          }
        }
      }
    }
  }
  return out;
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_ATTENTION_REFERENCE_H_
