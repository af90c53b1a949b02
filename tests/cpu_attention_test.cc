// The CPU decode attention (kernels/cpu_attention.h) against the float64
// reference (tests/attention_reference.h) over the shape matrix of issue #20
// that is affordable on a CPU: context lengths 1, 15, 16, 17 and 1000 in one
// batch with a padding entry, a few 32768-token contexts at batch 1, a batch
// of 256, GQA groups 1/4/8/16, head sizes 64/128/256, int8/fp8/bf16 caches,
// window on and off, soft-cap, 1 to 8 query tokens, shared prefix blocks and
// forked tails; plus threads vs one thread (bit-identical) and validation.

#include "kernels/cpu_attention.h"

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/thread_pool.h"
#include "tests/attention_test_util.h"

namespace kvcache::testing {
namespace {

// Of max |o|, beyond the 16-bit output's own rounding (attention_test_util.h).
constexpr double kTolerance = 2e-3;

std::vector<uint16_t> RunCpu(const AttnCase& a, internal::ThreadPool* pool,
                             absl::Status* status) {
  std::vector<uint16_t> o(
      a.q.size() / a.layout.head_size * a.layout.head_size_v,
      0x7FC1);  // Poison: a NaN in both 16-bit types.
  AttentionParams p =
      a.Params(const_cast<uint8_t*>(a.key_cache.data()),
               const_cast<uint8_t*>(a.value_cache.data()),
               const_cast<float*>(a.key_scale.data()),
               const_cast<float*>(a.value_scale.data()), a.q.data(), o.data(),
               a.flat_table.data(), a.seq_lens.data(), a.q_start.data());
  *status = AttentionCpu(p, pool);
  return o;
}

void CheckCase(const AttnCaseConfig& config, std::mt19937_64& rng,
               internal::ThreadPool* pool = nullptr) {
  SCOPED_TRACE(config.Name());
  const AttnCase a = MakeAttnCase(config, rng);
  absl::Status status;
  const std::vector<uint16_t> o = RunCpu(a, pool, &status);
  ASSERT_TRUE(status.ok()) << status;
  const AttnError e =
      CompareAttention(o, config.q_dtype, ReferenceAttention(a.Ref()));
  EXPECT_TRUE(e.finite);
  EXPECT_LE(e.relative(), kTolerance)
      << "error beyond output rounding " << e.max_excess << ", raw max abs "
      << e.max_abs << ", max |o| " << e.max_ref;
}

TEST(CpuAttentionTest, ShapeMatrix) {
  std::mt19937_64 rng(20);
  int n = 0;
  for (DType cache : {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16}) {
    for (int64_t d : {64, 128, 256}) {
      for (int32_t g : {1, 4, 8, 16}) {
        for (int32_t window : {0, 300}) {
          AttnCaseConfig c;
          c.head_size = d;
          c.group = g;
          c.num_kv_heads = g == 16 ? 1 : 2;
          c.cache_dtype = cache;
          c.q_dtype = n % 2 ? DType::kFloat16 : DType::kBFloat16;
          c.block_size = n % 3 == 0 ? 16 : (n % 3 == 1 ? 32 : 7);
          c.seq_lens = {1, 15, 16, 0, 17, 1000};
          c.num_query = {1 + n % 8, 8, 2, 1, 5, 1 + (n + 3) % 8};
          c.window = window;
          c.soft_cap = n % 4 == 3 ? 5.0f : 0.0f;
          c.share_prefix = n % 5 == 0;
          CheckCase(c, rng);
          ++n;
        }
      }
    }
  }
}

TEST(CpuAttentionTest, LongContexts) {
  std::mt19937_64 rng(21);
  internal::ThreadPool pool(2);
  struct Long {
    DType cache;
    int64_t d;
    int32_t g, t, window;
  };
  for (const Long& l : {Long{DType::kInt8, 128, 4, 1, 0},
                        Long{DType::kFp8E4M3, 256, 8, 2, 4096},
                        Long{DType::kBFloat16, 64, 16, 8, 0}}) {
    AttnCaseConfig c;
    c.head_size = l.d;
    c.group = l.g;
    c.num_kv_heads = 1;
    c.cache_dtype = l.cache;
    c.seq_lens = {32768};
    c.num_query = {l.t};
    c.window = l.window;
    CheckCase(c, rng, &pool);
  }
}

TEST(CpuAttentionTest, Batch256SharedPrefixes) {
  std::mt19937_64 rng(22);
  AttnCaseConfig c;
  c.head_size = 64;
  c.group = 4;
  c.num_kv_heads = 2;
  c.share_prefix = true;
  for (int i = 0; i < 256; ++i) {
    c.seq_lens.push_back(i % 17 == 0 ? 0 : 1 + (i * 37) % 200);
  }
  c.num_query = {1, 1, 3, 8};
  CheckCase(c, rng);
}

TEST(CpuAttentionTest, ThreadsGiveTheSameBytes) {
  std::mt19937_64 rng(23);
  AttnCaseConfig c;
  c.seq_lens = {3000, 2000, 17, 0, 4000};
  c.num_query = {1, 4, 8};
  const AttnCase a = MakeAttnCase(c, rng);
  internal::ThreadPool pool(3);
  absl::Status s1, s2;
  const std::vector<uint16_t> one = RunCpu(a, nullptr, &s1);
  const std::vector<uint16_t> many = RunCpu(a, &pool, &s2);
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_EQ(one, many);
}

TEST(CpuAttentionTest, PaddingAndEmptyRowsAreZero) {
  std::mt19937_64 rng(24);
  AttnCaseConfig c;
  c.seq_lens = {0, 3};
  c.num_query = {2, 5};  // Sequence 1: rows 0 and 1 attend nothing (p < 0).
  const AttnCase a = MakeAttnCase(c, rng);
  absl::Status s;
  const std::vector<uint16_t> o = RunCpu(a, nullptr, &s);
  ASSERT_TRUE(s.ok()) << s;
  const int64_t row = a.num_q_heads * a.layout.head_size_v;
  for (int64_t i = 0; i < 4 * row; ++i) ASSERT_EQ(o[i], 0) << i;
  for (int64_t i = 4 * row; i < 7 * row; ++i) ASSERT_NE(o[i], 0x7FC1) << i;
}

TEST(CpuAttentionTest, RejectsBadArguments) {
  std::mt19937_64 rng(25);
  AttnCaseConfig c;
  c.seq_lens = {40};
  c.num_query = {1};
  AttnCase a = MakeAttnCase(c, rng);
  std::vector<uint16_t> o(a.q.size());
  auto params = [&] {
    return a.Params(a.key_cache.data(), a.value_cache.data(),
                    a.key_scale.data(), a.value_scale.data(), a.q.data(),
                    o.data(), a.flat_table.data(), a.seq_lens.data(),
                    a.q_start.data());
  };
  AttentionParams p = params();
  p.num_q_heads = 7;
  EXPECT_TRUE(absl::IsInvalidArgument(AttentionCpu(p)));
  p = params();
  p.q_dtype = DType::kFloat32;
  EXPECT_TRUE(absl::IsInvalidArgument(AttentionCpu(p)));
  p = params();
  p.max_seq_len = 39;
  EXPECT_TRUE(absl::IsInvalidArgument(AttentionCpu(p)));
  p = params();
  p.max_query_tokens = 9;
  EXPECT_TRUE(absl::IsInvalidArgument(AttentionCpu(p)));
  p = params();
  p.soft_cap = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(AttentionCpu(p)));
  p = params();
  p.variant = kNumAttentionVariants;
  const absl::Status bad_variant = AttentionCpu(p);
  EXPECT_TRUE(absl::IsInvalidArgument(bad_variant)) << bad_variant;
  EXPECT_NE(bad_variant.message().find("variant " +
                                       std::to_string(kNumAttentionVariants)),
            std::string::npos)
      << bad_variant;
  p.variant = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(AttentionCpu(p)));
  a.flat_table[1] = static_cast<int32_t>(a.layout.num_blocks);
  p = params();
  const absl::Status s = AttentionCpu(p);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
}

}  // namespace
}  // namespace kvcache::testing
