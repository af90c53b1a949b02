// The portable conversions of kernels/fp8.h and kernels/float_convert.h against
// CUDA's own host conversions (cuda_fp8.h, cuda_bf16.h, cuda_fp16.h) on a dense
// sweep of float32 bit patterns, and every fp8 code's decoding. Where the build
// has no CUDA headers, the portable functions are checked against the test's
// reference only.

#include "kernels/fp8.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/float_convert.h"
#include "tests/kernel_reference.h"

#if defined(KVCACHE_HAVE_CUDA_HEADERS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace kvcache::internal {
namespace {

// Float bit patterns: every 37th pattern, plus all patterns within +-3 of every
// fp8 value and of every midpoint between neighbouring fp8 values, and the
// special values.
std::vector<uint32_t> SweepPatterns() {
  std::vector<uint32_t> out;
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 37)
    out.push_back(static_cast<uint32_t>(u));
  for (int c = 0; c < 127; ++c) {
    const float v = PortableFp8E4M3ToFloat(static_cast<uint8_t>(c));
    const float next =
        c < 126 ? PortableFp8E4M3ToFloat(static_cast<uint8_t>(c + 1)) : 512.0f;
    for (float x : {v, (v + next) / 2}) {
      for (int d = -3; d <= 3; ++d) {
        out.push_back(FloatBits(x) + d);
        out.push_back((FloatBits(x) | 0x80000000u) + d);
      }
    }
  }
  for (uint32_t s :
       {0x0u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0x7F800001u,
        0xFFFFFFFFu, 0x43E80000u, 0x43E00000u, 0x3A800000u}) {
    out.push_back(s);
  }
  return out;
}

TEST(Fp8Test, PortableEncoderMatchesReferenceNearEveryCode) {
  for (int c = 0; c < 127; ++c) {
    const float v = PortableFp8E4M3ToFloat(static_cast<uint8_t>(c));
    for (int d = -2; d <= 2; ++d) {
      const float x = BitsToFloat(FloatBits(v) + d);
      if (std::isnan(x)) continue;
      EXPECT_EQ(PortableFloatToFp8E4M3(x), testing::ref::Fp8Encode(x)) << x;
      EXPECT_EQ(PortableFloatToFp8E4M3(-x), testing::ref::Fp8Encode(-x)) << -x;
    }
  }
  EXPECT_EQ(PortableFloatToFp8E4M3(1e30f), 0x7E);
  EXPECT_EQ(PortableFloatToFp8E4M3(-INFINITY), 0xFE);
  EXPECT_EQ(PortableFloatToFp8E4M3(std::nanf("")), 0x7F);
}

TEST(Fp8Test, AllCodesDecode) {
  for (int c = 0; c < 256; ++c) {
    const float got = PortableFp8E4M3ToFloat(static_cast<uint8_t>(c));
    if ((c & 0x7F) == 0x7F) {
      EXPECT_EQ(FloatBits(got), 0x7FFFE000u) << c;
    } else {
      EXPECT_EQ(got, testing::ref::Fp8Decode(static_cast<uint8_t>(c))) << c;
    }
  }
}

#if defined(KVCACHE_HAVE_CUDA_HEADERS)
TEST(Fp8Test, PortableDecodeMatchesCudaOnAllCodes) {
  for (int c = 0; c < 256; ++c) {
    const __half_raw h =
        __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E4M3);
    const float want = __half2float(__half(h));
    const float got = PortableFp8E4M3ToFloat(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << c;
      EXPECT_EQ(FloatBits(PortableFloat16ToFloat(h.x)), FloatBits(got)) << c;
      EXPECT_EQ(FloatBits(Fp8E4M3ToFloat(static_cast<uint8_t>(c))),
                FloatBits(got))
          << c;
    } else {
      EXPECT_EQ(FloatBits(got), FloatBits(want)) << c;
    }
  }
}

TEST(Fp8Test, PortableConversionsMatchCudaHostConversionsOnSweep) {
  int64_t bad_fp8 = 0, bad_bf16 = 0, bad_fp16 = 0;
  for (uint32_t u : SweepPatterns()) {
    const float x = BitsToFloat(u);
    const uint8_t want8 = static_cast<uint8_t>(
        __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
    if (PortableFloatToFp8E4M3(x) != want8 && ++bad_fp8 <= 5) {
      ADD_FAILURE() << "fp8 of 0x" << std::hex << u << ": "
                    << int{PortableFloatToFp8E4M3(x)} << " vs cuda "
                    << int{want8};
    }
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    uint16_t wantb;
    std::memcpy(&wantb, &b, 2);
    if (PortableFloatToBFloat16(x) != wantb && ++bad_bf16 <= 5) {
      ADD_FAILURE() << "bf16 of 0x" << std::hex << u;
    }
    const __half h = __float2half_rn(x);
    uint16_t wanth;
    std::memcpy(&wanth, &h, 2);
    if (PortableFloatToFloat16(x) != wanth && ++bad_fp16 <= 5) {
      ADD_FAILURE() << "fp16 of 0x" << std::hex << u;
    }
  }
  EXPECT_EQ(bad_fp8 + bad_bf16 + bad_fp16, 0);
}

TEST(Fp8Test, PortableHalfWideningMatchesCudaOnAllPatterns) {
  for (uint32_t u = 0; u < 65536; ++u) {
    __half_raw r;
    r.x = static_cast<unsigned short>(u);
    const float want = __half2float(__half(r));
    const float got = PortableFloat16ToFloat(static_cast<uint16_t>(u));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << u;
    } else {
      ASSERT_EQ(FloatBits(got), FloatBits(want)) << u;
    }
  }
}
#else
TEST(Fp8Test, CudaHeadersAbsent) {
  GTEST_SKIP() << "skipped: built without CUDA headers, so the portable "
                  "conversions are not "
                  "compared with cuda_fp8.h here";
}
#endif

}  // namespace
}  // namespace kvcache::internal
