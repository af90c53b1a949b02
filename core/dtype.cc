#include "core/dtype.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache {

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt8:
      return "int8";
    case DType::kFp8E4M3:
      return "fp8_e4m3";
  }
  return "unknown";
}

bool IsValidDType(DType dtype) {
  const int32_t v = static_cast<int32_t>(dtype);
  return v >= static_cast<int32_t>(DType::kFloat32) &&
         v <= static_cast<int32_t>(DType::kFp8E4M3);
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  if (name == "float32" || name == "fp32") return DType::kFloat32;
  if (name == "float16" || name == "fp16") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  if (name == "int8") return DType::kInt8;
  if (name == "fp8_e4m3" || name == "fp8") return DType::kFp8E4M3;
  return absl::InvalidArgumentError(absl::StrCat(
      "dtype \"", name,
      "\" is not one of float32, float16, bfloat16, int8, fp8_e4m3"));
}

}  // namespace kvcache
