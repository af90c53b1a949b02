// DType names the element types of K/V inputs and caches, with their sizes and
// the quantization limits of DESIGN.md section 3.
//
// Plain constexpr data and functions: thread-safe, no state, no CUDA. Kernels
// use the same values.

#ifndef KVCACHE_CORE_DTYPE_H_
#define KVCACHE_CORE_DTYPE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcache {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt8 = 3,
  kFp8E4M3 = 4,  // fp8 e4m3fn: no infinities, max finite 448.
};

// Largest quantized magnitude (DESIGN.md section 3: QMAX).
inline constexpr float kInt8QuantMax = 127.0f;
inline constexpr float kFp8E4M3QuantMax = 448.0f;
// int8 codes are clamped to [kInt8Min, kInt8Max].
inline constexpr int kInt8Min = -128;
inline constexpr int kInt8Max = 127;
// Lower bound of every per-(token, head) scale, so an all-zero head never
// divides by zero.
inline constexpr float kMinScale = 1e-6f;

// Bytes per element.
constexpr size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kInt8:
    case DType::kFp8E4M3:
      return 1;
  }
  return 0;
}

// True for cache dtypes stored with a float32 scale per (token, head).
constexpr bool IsQuantized(DType dtype) {
  return dtype == DType::kInt8 || dtype == DType::kFp8E4M3;
}

// True for dtypes accepted as K/V input (and as dequantized output).
constexpr bool IsFloatingInput(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 ||
         dtype == DType::kBFloat16;
}

// QMAX of a quantized dtype; 0 for the others.
constexpr float QuantMax(DType dtype) {
  switch (dtype) {
    case DType::kInt8:
      return kInt8QuantMax;
    case DType::kFp8E4M3:
      return kFp8E4M3QuantMax;
    default:
      return 0.0f;
  }
}

// "float32", "float16", "bfloat16", "int8", "fp8_e4m3"; "unknown" for an
// invalid value.
absl::string_view DTypeName(DType dtype);

// Parses a name printed by DTypeName (also "fp32", "fp16", "bf16", "fp8").
// InvalidArgument otherwise.
absl::StatusOr<DType> ParseDType(absl::string_view name);

// True when `dtype` holds one of the enumerators (guards values cast from
// integers, e.g. the C API).
bool IsValidDType(DType dtype);

}  // namespace kvcache

#endif  // KVCACHE_CORE_DTYPE_H_
