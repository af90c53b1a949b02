// The AVX2 rows of the CPU kernels against the scalar rows, byte for byte, on
// every code path: head sizes that leave 8-, 16- and 24-element tails after
// the 32-wide loop (8 .. 1024), K and V of different sizes, every input layout
// (dense, fused QKV, head-major, unaligned strides), padding slots, zero,
// huge, NaN and Inf heads, every write dtype pair, every gather variant (slot
// list, block table with padding blocks, strided and unaligned outputs) into
// every output dtype, with and without a thread pool. The element conversions
// are compared on a dense sweep of float bit patterns plus every fp8 code and
// rounding boundary (all 2^32 patterns with KVCACHE_EXHAUSTIVE=1). Inputs are
// fresh random each run; the seed is printed (rerun with
// KVCACHE_TEST_SEED=<seed>). Skips where the CPU has no AVX2.

#include "kernels/cpu_kernels_avx2.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_kernels.h"
#include "kernels/quantize.h"
#include "kernels/thread_pool.h"
#include "tests/kernel_test_util.h"

namespace kvcache::testing {
namespace {

using internal::CpuHasAvx2;
using internal::ForceScalarCpuRowsForTesting;

uint64_t Seed() {
  static const uint64_t seed = [] {
    const uint64_t s = TestSeed();
    std::printf("cpu_kernels_avx2_test seed: KVCACHE_TEST_SEED=%llu\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

class Avx2Test : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CpuHasAvx2()) GTEST_SKIP() << "this CPU has no AVX2 + F16C";
  }
  void TearDown() override { ForceScalarCpuRowsForTesting(false); }
};

struct Outputs {
  std::vector<uint8_t> key_cache, value_cache;
  std::vector<float> key_scale, value_scale;
};

// Writes the case with the scalar or the AVX2 rows, on fresh copies of its
// caches.
Outputs Write(const HostCase& hc, bool scalar, internal::ThreadPool* pool) {
  Outputs o{hc.key_cache, hc.value_cache, hc.key_scale, hc.value_scale};
  std::vector<uint8_t> input = hc.input;
  const bool q = IsQuantized(hc.config.cache_dtype);
  const QuantizeWriteParams p = hc.Params(
      input.data(), hc.slots.data(), o.key_cache.data(), o.value_cache.data(),
      q ? o.key_scale.data() : nullptr, q ? o.value_scale.data() : nullptr);
  ForceScalarCpuRowsForTesting(scalar);
  EXPECT_TRUE(QuantizeWriteCpu(p, pool).ok());
  ForceScalarCpuRowsForTesting(false);
  return o;
}

std::vector<uint8_t> Gather(const HostCase& hc, Outputs& o, GatherCase g,
                            bool scalar, internal::ThreadPool* pool) {
  const bool q = IsQuantized(hc.config.cache_dtype);
  const LayerCache cache = hc.Cache(o.key_cache.data(), o.value_cache.data(),
                                    q ? o.key_scale.data() : nullptr,
                                    q ? o.value_scale.data() : nullptr);
  ForceScalarCpuRowsForTesting(scalar);
  EXPECT_TRUE(GatherCpu(g.Params(cache, g.output.data(), g.slots.data(),
                                 g.block_table.data()),
                        pool)
                  .ok());
  ForceScalarCpuRowsForTesting(false);
  return g.output;
}

bool SameBytes(const void* a, const void* b, size_t n) {
  return n == 0 || std::memcmp(a, b, n) == 0;
}

void CheckCase(const CaseConfig& c, std::mt19937_64& rng,
               internal::ThreadPool* pool = nullptr) {
  SCOPED_TRACE(c.Name());
  const HostCase hc = MakeCase(c, rng);
  Outputs want = Write(hc, /*scalar=*/true, nullptr);
  const Outputs got = Write(hc, /*scalar=*/false, pool);
  ASSERT_EQ(got.key_cache, want.key_cache);
  ASSERT_EQ(got.value_cache, want.value_cache);
  ASSERT_TRUE(SameBytes(got.key_scale.data(), want.key_scale.data(),
                        want.key_scale.size() * 4));
  ASSERT_TRUE(SameBytes(got.value_scale.data(), want.value_scale.data(),
                        want.value_scale.size() * 4));
  for (DType out : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int variant = 0; variant < kGatherVariants; ++variant) {
      SCOPED_TRACE(::testing::Message() << "gather variant " << variant
                                        << " out " << DTypeName(out));
      const GatherCase g = MakeGatherCase(hc, out, variant, rng);
      ASSERT_EQ(Gather(hc, want, g, /*scalar=*/false, pool),
                Gather(hc, want, g, /*scalar=*/true, nullptr));
    }
  }
}

TEST_F(Avx2Test, RowsMatchScalarOnEveryPath) {
  std::mt19937_64 rng(Seed());
  int i = 0;
  for (int64_t d : {8, 16, 24, 40, 128, 136, 1024}) {
    for (int64_t heads : {1, 3, 8}) {
      for (const DTypePair& pair : WriteDTypePairs()) {
        CaseConfig c;
        c.head_size = d;
        c.head_size_v = heads == 3 ? (d == 8 ? 40 : 24) : d;
        c.num_heads = heads;
        c.block_size = heads == 1 ? 1 : 16;
        c.num_tokens = TokensFor(heads, d, c.head_size_v, 40000);
        c.input_dtype = pair.input;
        c.cache_dtype = pair.cache;
        c.layout = static_cast<InputLayout>(i % 4);
        // Inline scales on every other quantized case.
        if (IsQuantized(pair.cache) && (i / 4 + i) % 2 == 1) {
          c.placement = ScalePlacement::kInline;
        }
        ++i;
        CheckCase(c, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// Large calls split over a pool (chunk edges inside tokens) write the same
// bytes as the scalar rows on one thread.
TEST_F(Avx2Test, PooledLargeCallsMatchScalar) {
  std::mt19937_64 rng(Seed() + 1);
  internal::ThreadPool pool(3);
  for (const DTypePair& pair : WriteDTypePairs()) {
    CaseConfig c;
    c.num_tokens = 300;  // 300 x 7 x 256 elements: split over the pool.
    c.num_heads = 7;
    c.input_dtype = pair.input;
    c.cache_dtype = pair.cache;
    if (IsQuantized(pair.cache) && pair.input == DType::kBFloat16) {
      c.placement = ScalePlacement::kInline;
    }
    CheckCase(c, rng, &pool);
    if (HasFatalFailure()) return;
  }
}

// ---- Element conversions ----

// Compares the AVX2 conversions with the scalar ones on float bit patterns
// (a multiple of 8 of them).
void CheckConversions(const std::vector<uint32_t>& bits) {
  const int64_t n = static_cast<int64_t>(bits.size()) / 8 * 8;
  std::vector<float> x(static_cast<size_t>(n));
  std::memcpy(x.data(), bits.data(), x.size() * 4);
  std::vector<int8_t> i8(x.size());
  std::vector<uint8_t> f8(x.size());
  std::vector<uint16_t> bf(x.size()), hf(x.size());
  internal::EncodeInt8ArrayAvx2(x.data(), n, i8.data());
  internal::EncodeFp8ArrayAvx2(x.data(), n, f8.data());
  internal::FloatToBFloat16ArrayAvx2(x.data(), n, bf.data());
  internal::FloatToFloat16ArrayAvx2(x.data(), n, hf.data());
  int64_t bad = 0;
  for (int64_t i = 0; i < n && bad < 10; ++i) {
    const float v = x[i];
    const bool ok = i8[i] == internal::Int8Type::Encode(v) &&
                    f8[i] == internal::FloatToFp8E4M3(v) &&
                    bf[i] == internal::FloatToBFloat16(v) &&
                    hf[i] == internal::FloatToFloat16(v);
    if (!ok) {
      ++bad;
      ADD_FAILURE() << "float bits 0x" << std::hex << bits[i] << ": int8 "
                    << int{i8[i]} << " fp8 " << int{f8[i]} << " bf16 " << bf[i]
                    << " fp16 " << hf[i];
    }
  }
}

// Every 4099th pattern from a random start, and +-4 around every fp8 value,
// fp8 midpoint, int8 midpoint and the special values, both signs.
std::vector<uint32_t> SweepPatterns(std::mt19937_64& rng) {
  std::vector<uint32_t> out;
  for (uint64_t u = rng() % 4099; u <= 0xFFFFFFFFull; u += 4099) {
    out.push_back(static_cast<uint32_t>(u));
  }
  std::vector<float> points = {0.0f,     1e-6f,    448.0f,  464.0f,   65504.0f,
                               65520.0f, 0x1p-10f, 0x1p-6f, 0x1p-24f, 0x1p-25f,
                               127.5f,   128.0f,   -128.5f};
  for (int c = 0; c < 127; ++c) {
    const float v = internal::PortableFp8E4M3ToFloat(static_cast<uint8_t>(c));
    const float next =
        c < 126 ? internal::PortableFp8E4M3ToFloat(static_cast<uint8_t>(c + 1))
                : 512.0f;
    points.push_back(v);
    points.push_back((v + next) / 2);
  }
  for (int k = -128; k <= 127; ++k) points.push_back(k + 0.5f);
  for (float p : points) {
    for (int d = -4; d <= 4; ++d) {
      out.push_back(internal::FloatBits(p) + d);
      out.push_back((internal::FloatBits(p) | 0x80000000u) + d);
    }
  }
  for (uint32_t s : {0x7F800000u, 0xFF800000u, 0x7FC00000u, 0x7F800001u,
                     0xFFFFFFFFu, 0x7FFFFFFFu, 0x00000001u, 0x807FFFFFu}) {
    out.push_back(s);
  }
  while (out.size() % 8 != 0) out.push_back(0);
  return out;
}

TEST_F(Avx2Test, ConversionsMatchScalarOnSweep) {
  std::mt19937_64 rng(Seed() + 2);
  CheckConversions(SweepPatterns(rng));
}

TEST_F(Avx2Test, ConversionsMatchScalarOnAllFloats) {
  const char* env = std::getenv("KVCACHE_EXHAUSTIVE");
  if (env == nullptr || std::string(env) != "1") {
    GTEST_SKIP() << "set KVCACHE_EXHAUSTIVE=1 for all 2^32 patterns";
  }
  std::vector<uint32_t> bits(size_t{1} << 20);
  for (uint64_t base = 0; base < (uint64_t{1} << 32); base += bits.size()) {
    for (size_t i = 0; i < bits.size(); ++i) {
      bits[i] = static_cast<uint32_t>(base + i);
    }
    CheckConversions(bits);
    if (HasFailure()) return;
  }
}

TEST_F(Avx2Test, DecodesMatchScalarOnEveryCode) {
  std::vector<uint8_t> codes(256);
  for (int c = 0; c < 256; ++c) codes[c] = static_cast<uint8_t>(c);
  std::vector<float> f(256);
  internal::DecodeFp8ArrayAvx2(codes.data(), 256, f.data());
  for (int c = 0; c < 256; ++c) {
    const float want = internal::Fp8E4M3ToFloat(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f[c])) << c;  // Canonicalized after scaling.
    } else {
      EXPECT_EQ(internal::FloatBits(f[c]), internal::FloatBits(want)) << c;
    }
  }
  std::vector<uint16_t> halves(65536);
  for (int h = 0; h < 65536; ++h) halves[h] = static_cast<uint16_t>(h);
  std::vector<float> g(65536);
  internal::Float16ToFloatArrayAvx2(halves.data(), 65536, g.data());
  for (int h = 0; h < 65536; ++h) {
    const float want = internal::Float16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(g[h])) << h;  // Any NaN: quantized or canonical.
    } else {
      EXPECT_EQ(internal::FloatBits(g[h]), internal::FloatBits(want)) << h;
    }
  }
}

}  // namespace
}  // namespace kvcache::testing
