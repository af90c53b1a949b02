// Test helper: random decode-attention cases on the host (a paged cache with
// random codes and scales, block tables that share prefix blocks and forked
// tails, padding entries, random queries), shared by the CPU and CUDA
// attention tests, and the error measure of issue #20: max |o - ref| over
// max |ref|.

#ifndef KVCACHE_TESTS_ATTENTION_TEST_UTIL_H_
#define KVCACHE_TESTS_ATTENTION_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "kernels/attention_params.h"
#include "kernels/float_convert.h"
#include "kernels/fp8.h"
#include "tests/attention_reference.h"

namespace kvcache::testing {

struct AttnCaseConfig {
  int64_t head_size = 128;
  int64_t num_kv_heads = 2;
  int32_t group = 4;  // Query heads per KV head.
  int64_t block_size = 16;
  DType cache_dtype = DType::kInt8;
  DType q_dtype = DType::kBFloat16;
  std::vector<int32_t> seq_lens;   // 0 = a padding entry.
  std::vector<int32_t> num_query;  // Per sequence (1..8).
  int32_t window = 0;
  float soft_cap = 0.0f;
  bool share_prefix = false;  // Sequences share their first blocks, and
                              // odd ones fork from the one before.
  std::string Name() const {
    return absl::StrCat("D=", head_size, " Hkv=", num_kv_heads, " G=", group,
                        " bs=", block_size, " cache=", DTypeName(cache_dtype),
                        " q=", DTypeName(q_dtype), " seqs=", seq_lens.size(),
                        " len0=", seq_lens.empty() ? 0 : seq_lens[0],
                        " T0=", num_query.empty() ? 0 : num_query[0],
                        " window=", window, " cap=", soft_cap,
                        share_prefix ? " shared" : "");
  }
};

struct AttnCase {
  AttnCaseConfig config;
  CacheLayout layout;
  std::vector<uint8_t> key_cache, value_cache;
  std::vector<float> key_scale, value_scale;
  std::vector<std::vector<int32_t>> tables;
  int64_t table_stride = 1;
  std::vector<int32_t> flat_table, seq_lens, q_start;
  std::vector<uint16_t> q;
  int32_t num_q_heads = 0;
  int32_t max_query = 1;
  int32_t max_len = 0;
  float softmax_scale = 0;

  // Params over the given (host or device) copies of this case's buffers.
  AttentionParams Params(void* kc, void* vc, float* ks, float* vs,
                         const void* qp, void* o, const int32_t* table,
                         const int32_t* lens, const int32_t* qs) const {
    AttentionParams p;
    p.cache.layout = layout;
    p.cache.key_cache = kc;
    p.cache.value_cache = vc;
    p.cache.key_scale = IsQuantized(layout.cache_dtype) ? ks : nullptr;
    p.cache.value_scale = IsQuantized(layout.cache_dtype) ? vs : nullptr;
    p.q = qp;
    p.q_dtype = config.q_dtype;
    p.q_token_stride = num_q_heads * layout.head_size;
    p.q_head_stride = layout.head_size;
    p.o = o;
    p.o_token_stride = num_q_heads * layout.head_size_v;
    p.o_head_stride = layout.head_size_v;
    p.num_q_tokens = q_start.back();
    p.num_q_heads = num_q_heads;
    p.num_seqs = static_cast<int32_t>(seq_lens.size());
    p.block_table = table;
    p.block_table_stride = table_stride;
    p.seq_lens = lens;
    p.q_start = qs;
    p.max_query_tokens = max_query;
    p.max_seq_len = max_len;
    p.softmax_scale = softmax_scale;
    p.soft_cap = config.soft_cap;
    p.window = config.window;
    return p;
  }

  RefBatch Ref() const {
    RefBatch b;
    b.cache.layout = layout;
    b.cache.key_cache = const_cast<uint8_t*>(key_cache.data());
    b.cache.value_cache = const_cast<uint8_t*>(value_cache.data());
    b.cache.key_scale = const_cast<float*>(key_scale.data());
    b.cache.value_scale = const_cast<float*>(value_scale.data());
    b.tables = tables;
    b.seq_lens = seq_lens;
    b.q_start = q_start;
    b.q = q.data();
    b.q_dtype = config.q_dtype;
    b.num_q_heads = num_q_heads;
    b.softmax_scale = softmax_scale;
    b.soft_cap = config.soft_cap;
    b.window = config.window;
    return b;
  }
};

inline uint16_t ToHalf(DType dtype, float x) {
  return dtype == DType::kBFloat16 ? internal::PortableFloatToBFloat16(x)
                                   : internal::PortableFloatToFloat16(x);
}

// Random codes for a cache of `dtype` (never an fp8 NaN), Gaussian for 16-bit.
inline void FillCache(std::vector<uint8_t>& bytes, DType dtype,
                      std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  if (dtype == DType::kInt8) {
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng() % 255 + 129);
  } else if (dtype == DType::kFp8E4M3) {
    for (uint8_t& b : bytes) {
      b = internal::FloatToFp8E4M3(normal(rng) * 120.0f);
    }
  } else {
    uint16_t* h = reinterpret_cast<uint16_t*>(bytes.data());
    for (size_t i = 0; i < bytes.size() / 2; ++i) {
      h[i] = ToHalf(dtype, normal(rng));
    }
  }
}

inline AttnCase MakeAttnCase(const AttnCaseConfig& c, std::mt19937_64& rng) {
  AttnCase a;
  a.config = c;
  const int64_t n = static_cast<int64_t>(c.seq_lens.size());
  a.num_q_heads = static_cast<int32_t>(c.num_kv_heads * c.group);
  a.layout.block_size = c.block_size;
  a.layout.num_heads = c.num_kv_heads;
  a.layout.head_size = c.head_size;
  a.layout.head_size_v = c.head_size;
  a.layout.cache_dtype = c.cache_dtype;
  int64_t blocks = 1;
  for (int32_t len : c.seq_lens) {
    const int64_t b = (len + c.block_size - 1) / c.block_size;
    a.table_stride = std::max(a.table_stride, b);
    blocks += b;
    a.max_len = std::max(a.max_len, len);
  }
  a.layout.num_blocks = blocks;
  std::vector<int32_t> ids(blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  int64_t next = 0;
  a.tables.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = (c.seq_lens[i] + c.block_size - 1) / c.block_size;
    for (int64_t k = 0; k < b; ++k) {
      // Shared: the first half of the blocks is sequence 0's; odd sequences
      // fork from the one before (all blocks but the last shared).
      if (c.share_prefix && i > 0 &&
          k < static_cast<int64_t>(a.tables[0].size()) / 2) {
        a.tables[i].push_back(a.tables[0][k]);
      } else if (c.share_prefix && i % 2 == 1 && k + 1 < b &&
                 k < static_cast<int64_t>(a.tables[i - 1].size())) {
        a.tables[i].push_back(a.tables[i - 1][k]);
      } else {
        a.tables[i].push_back(ids[next++]);
      }
    }
  }
  const size_t elems = static_cast<size_t>(blocks * a.layout.key_block_elems());
  const size_t esize = DTypeSize(c.cache_dtype);
  a.key_cache.resize(elems * esize);
  a.value_cache.resize(elems * esize);
  FillCache(a.key_cache, c.cache_dtype, rng);
  FillCache(a.value_cache, c.cache_dtype, rng);
  if (IsQuantized(c.cache_dtype)) {
    const float qmax = c.cache_dtype == DType::kInt8 ? 127.0f : 448.0f;
    std::uniform_real_distribution<float> u(0.3f, 3.0f);
    a.key_scale.resize(blocks * a.layout.scale_block_elems());
    a.value_scale.resize(a.key_scale.size());
    for (float& s : a.key_scale) s = u(rng) / qmax * 2.5f;
    for (float& s : a.value_scale) s = u(rng) / qmax * 2.5f;
  }
  a.flat_table.assign(n * a.table_stride, -1);  // -1: padding columns.
  for (int64_t i = 0; i < n; ++i) {
    std::copy(a.tables[i].begin(), a.tables[i].end(),
              a.flat_table.begin() + i * a.table_stride);
  }
  a.seq_lens = c.seq_lens;
  a.q_start.push_back(0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = c.num_query[i % c.num_query.size()];
    a.max_query = std::max(a.max_query, t);
    a.q_start.push_back(a.q_start.back() + t);
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  a.q.resize(static_cast<size_t>(a.q_start.back()) * a.num_q_heads *
             c.head_size);
  for (uint16_t& h : a.q) h = ToHalf(c.q_dtype, normal(rng));
  // Logits of a few units: some rows peaked, most spread.
  a.softmax_scale =
      static_cast<float>(1.5 / std::sqrt(static_cast<double>(c.head_size)));
  return a;
}

// The error measure of the attention tests. Issue #20 bounds max |o - ref| by
// 2e-3 x max |ref| for bf16 outputs, but rounding a value to bf16 alone moves
// it by up to half an ulp, 2^-8 = 3.9e-3 of its magnitude (fp16: 2^-11): no
// kernel can meet that bound literally. So `excess` is the error beyond the
// output's own rounding, max(0, |o - ref| - ulp(ref) / 2), which is what the
// 2e-3 bar is applied to; `max_abs` is the raw error, reported beside it.
// Every element must be finite.
struct AttnError {
  double max_abs = 0, max_excess = 0, max_ref = 0;
  bool finite = true;
  double relative() const {
    return max_ref > 0 ? max_excess / max_ref : max_excess;
  }
  double raw_relative() const {
    return max_ref > 0 ? max_abs / max_ref : max_abs;
  }
};

inline double HalfUlp(DType dtype, double x) {
  const int mantissa_bits = dtype == DType::kBFloat16 ? 7 : 10;
  int e = 0;
  std::frexp(std::fabs(x), &e);  // |x| in [2^(e-1), 2^e).
  return std::ldexp(1.0, e - 1 - mantissa_bits - 1);
}

inline AttnError CompareAttention(const std::vector<uint16_t>& o, DType dtype,
                                  const std::vector<double>& ref) {
  AttnError e;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double x = Half(dtype, o[i]);
    if (!std::isfinite(x)) e.finite = false;
    const double err = std::fabs(x - ref[i]);
    e.max_abs = std::max(e.max_abs, err);
    e.max_excess =
        std::max(e.max_excess, std::max(0.0, err - HalfUlp(dtype, ref[i])));
    e.max_ref = std::max(e.max_ref, std::fabs(ref[i]));
  }
  return e;
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_ATTENTION_TEST_UTIL_H_
