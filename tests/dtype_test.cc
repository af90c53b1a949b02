#include "core/dtype.h"

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace kvcache {
namespace {

TEST(DTypeTest, SizesMatchTheElementTypes) {
  EXPECT_EQ(DTypeSize(DType::kFloat32), 4u);
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kInt8), 1u);
  EXPECT_EQ(DTypeSize(DType::kFp8E4M3), 1u);
}

TEST(DTypeTest, QuantizationLimits) {
  EXPECT_TRUE(IsQuantized(DType::kInt8));
  EXPECT_TRUE(IsQuantized(DType::kFp8E4M3));
  EXPECT_FALSE(IsQuantized(DType::kBFloat16));
  EXPECT_FALSE(IsQuantized(DType::kFloat16));
  EXPECT_EQ(QuantMax(DType::kInt8), 127.0f);
  EXPECT_EQ(QuantMax(DType::kFp8E4M3), 448.0f);
  EXPECT_EQ(QuantMax(DType::kBFloat16), 0.0f);
  EXPECT_EQ(kInt8Min, -128);
  EXPECT_EQ(kInt8Max, 127);
  EXPECT_EQ(kMinScale, 1e-6f);
}

TEST(DTypeTest, NamesRoundTrip) {
  for (DType d : {DType::kFloat32, DType::kFloat16, DType::kBFloat16,
                  DType::kInt8, DType::kFp8E4M3}) {
    absl::StatusOr<DType> parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, d);
    EXPECT_TRUE(IsValidDType(d));
  }
  EXPECT_EQ(*ParseDType("bf16"), DType::kBFloat16);
  EXPECT_EQ(*ParseDType("fp8"), DType::kFp8E4M3);
}

TEST(DTypeTest, RejectsUnknownNamesAndValues) {
  absl::StatusOr<DType> parsed = ParseDType("int4");
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(parsed.status().message().find("int4"), absl::string_view::npos);
  EXPECT_FALSE(IsValidDType(static_cast<DType>(17)));
  EXPECT_FALSE(IsValidDType(static_cast<DType>(-1)));
  EXPECT_EQ(DTypeName(static_cast<DType>(17)), "unknown");
}

}  // namespace
}  // namespace kvcache
