// CPU decode attention: one work item per (sequence, KV head) holds the
// float32 queries of all its query rows (query tokens x GQA heads), walks the
// keys the rows attend once, dequantizing each K and V row once (code * scale,
// as the gather does), and keeps an online softmax per row.

#include "kernels/cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/attention_math.h"
#include "kernels/attention_validation.h"
#include "kernels/dtype_dispatch.h"
#include "kernels/kernel_validation.h"
#include "kernels/quantize.h"
#include "kernels/thread_pool.h"

namespace kvcache {
namespace {

using internal::AttentionSeq;

// Row k of a cache as float32 (dequantized).
template <class Cache>
void LoadRow(const typename Cache::T* src, const float* scale, int64_t n,
             float* dst) {
  if constexpr (Cache::kQuantized) {
    const float s = *scale;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = internal::Dequantize(Cache::Decode(src[i]), s);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = Cache::ToFloat(src[i]);
  }
}

template <class Cache, class Q>
void AttendOne(const AttentionParams& p, int32_t seq, int32_t kv_head,
               std::vector<float>& scratch) {
  using CacheT = typename Cache::T;
  using QT = typename Q::T;
  const CacheLayout& layout = p.cache.layout;
  const int64_t D = layout.head_size, Dv = layout.head_size_v;
  const int32_t G = p.num_q_heads / static_cast<int32_t>(layout.num_heads);
  const AttentionSeq s = internal::LoadAttentionSeq(
      p, seq, p.seq_lens[seq], p.q_start[seq], p.q_start[seq + 1]);
  const int32_t rows = s.num_q * G;
  scratch.assign(static_cast<size_t>(rows) * (D + Dv + 2) + D + Dv, 0.0f);
  float* q = scratch.data();  // [rows, D], times softmax_scale.
  float* o = q + rows * D;    // [rows, Dv]
  float* m = o + rows * Dv;   // [rows]
  float* l = m + rows;        // [rows]
  float* krow = l + rows;     // [D]
  float* vrow = krow + D;     // [Dv]
  std::vector<int32_t> begin(rows), end(rows);
  const QT* qbase = static_cast<const QT*>(p.q);
  for (int32_t r = 0; r < rows; ++r) {
    const int32_t j = r / G, h = kv_head * G + r % G;
    const QT* src = qbase + (s.q_begin + j) * p.q_token_stride +
                    static_cast<int64_t>(h) * p.q_head_stride;
    for (int64_t d = 0; d < D; ++d) q[r * D + d] = Q::ToFloat(src[d]);
    m[r] = -std::numeric_limits<float>::infinity();
    internal::AttentionRowKeys(s, p.window, j, &begin[r], &end[r]);
  }
  const int32_t* table = p.block_table + seq * p.block_table_stride;
  const CacheT* kc = static_cast<const CacheT*>(p.cache.key_cache);
  const CacheT* vc = static_cast<const CacheT*>(p.cache.value_cache);
  for (int32_t k = s.key_begin; k < s.len; ++k) {
    const int64_t slot =
        internal::AttentionSlot(table, layout.block_size, layout.num_blocks, k);
    if (slot < 0) continue;
    const int64_t so = layout.scale_offset_in<false>(slot, kv_head);
    LoadRow<Cache>(kc + layout.key_offset_in<false>(slot, kv_head),
                   Cache::kQuantized ? p.cache.key_scale + so : nullptr, D,
                   krow);
    bool loaded_v = false;
    for (int32_t r = 0; r < rows; ++r) {
      if (k < begin[r] || k >= end[r]) continue;
      if (!loaded_v) {
        LoadRow<Cache>(vc + layout.value_offset_in<false>(slot, kv_head),
                       Cache::kQuantized ? p.cache.value_scale + so : nullptr,
                       Dv, vrow);
        loaded_v = true;
      }
      // Eight partial sums (D is a multiple of 8), so the compiler can keep
      // them in one vector register: float32 throughout, as specified.
      const float* qr = q + r * D;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t d = 0; d < D; d += 8) {
        for (int i = 0; i < 8; ++i) part[i] += qr[d + i] * krow[d + i];
      }
      float x = ((part[0] + part[4]) + (part[1] + part[5])) +
                ((part[2] + part[6]) + (part[3] + part[7]));
      x *= p.softmax_scale;
      if (p.soft_cap > 0.0f) x = p.soft_cap * std::tanh(x / p.soft_cap);
      float* orow = o + r * Dv;
      if (x > m[r]) {
        const float alpha = std::exp(m[r] - x);  // 0 for the first key.
        l[r] *= alpha;
        for (int64_t d = 0; d < Dv; ++d) orow[d] *= alpha;
        m[r] = x;
      }
      const float e = std::exp(x - m[r]);
      l[r] += e;
      for (int64_t d = 0; d < Dv; ++d) orow[d] += e * vrow[d];
    }
  }
  QT* obase = static_cast<QT*>(p.o);
  for (int32_t r = 0; r < rows; ++r) {
    const int32_t j = r / G, h = kv_head * G + r % G;
    QT* dst = obase + (s.q_begin + j) * p.o_token_stride +
              static_cast<int64_t>(h) * p.o_head_stride;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < Dv; ++d) dst[d] = Q::FromFloat(o[r * Dv + d] * inv);
  }
}

}  // namespace

absl::Status AttentionCpu(const AttentionParams& params,
                          internal::ThreadPool* pool) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateAttention(params));
  if (params.num_seqs == 0 || params.num_q_tokens == 0) {
    return absl::OkStatus();
  }
  KVCACHE_RETURN_IF_ERROR(internal::CheckAttentionBatch(
      params, params.block_table, params.seq_lens, params.q_start));
  const int64_t heads = params.cache.layout.num_heads;
  const int64_t items = params.num_seqs * heads;
  int64_t work = 0;  // Keys x rows over the batch, to decide on threads.
  for (int32_t i = 0; i < params.num_seqs; ++i) {
    work += static_cast<int64_t>(std::max(params.seq_lens[i], 0)) *
            (params.q_start[i + 1] - params.q_start[i]);
  }
  work *= params.num_q_heads * params.cache.layout.head_size;
  return internal::DispatchCacheType(
      params.cache.layout.cache_dtype, [&](auto cache) {
        return internal::DispatchFloatType(
            params.q_dtype, "q", [&](auto q) -> absl::Status {
              using Cache = decltype(cache);
              using Q = decltype(q);
              if constexpr (std::is_same_v<Q, internal::Float32Type>) {
                return absl::InvalidArgumentError("q dtype float32");
              } else {
                auto run = [&](int64_t begin, int64_t end) {
                  std::vector<float> scratch;
                  for (int64_t i = begin; i < end; ++i) {
                    AttendOne<Cache, Q>(params, static_cast<int32_t>(i / heads),
                                        static_cast<int32_t>(i % heads),
                                        scratch);
                  }
                };
                constexpr int64_t kMinParallelWork = int64_t{1} << 20;
                if (pool == nullptr || pool->num_threads() <= 1 ||
                    work < kMinParallelWork || items == 1) {
                  run(0, items);
                } else {
                  pool->ParallelFor(
                      items, std::min<int64_t>(items, 4 * pool->num_threads()),
                      run);
                }
                return absl::OkStatus();
              }
            });
      });
}

}  // namespace kvcache
