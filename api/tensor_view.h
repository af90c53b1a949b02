// TensorView is a non-owning description of a caller's tensor: pointer, dtype,
// shape, element strides and where the memory lives. It is how K/V reach the
// manager and where dequantized K/V go. FromDLPack turns a DLPack DLTensor
// (e.g. from torch.utils.dlpack) into one without a copy.
//
// Plain value type; thread-compatible. The caller owns the memory and keeps it
// alive for the call (and, on CUDA, until the work enqueued on the call's
// stream has run).

#ifndef KVCACHE_API_TENSOR_VIEW_H_
#define KVCACHE_API_TENSOR_VIEW_H_

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "dlpack/dlpack.h"

namespace kvcache {

enum class MemoryKind : int32_t {
  kHost = 0,  // Ordinary (or pinned) host memory.
  kCuda = 1,  // CUDA device memory of device `device`.
};

struct TensorView {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::kBFloat16;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // In elements, not bytes.
  MemoryKind memory = MemoryKind::kHost;
  int32_t device = 0;

  // A contiguous (row-major) view of `shape`.
  static TensorView Contiguous(void* data, DType dtype,
                               std::initializer_list<int64_t> shape,
                               MemoryKind memory = MemoryKind::kHost,
                               int32_t device = 0);

  // The product of the shape (-1 if it overflows). Only the first
  // min(ndim, kMaxDims) dimensions are read.
  int64_t numel() const;
  // "bfloat16[16, 8, 128] strides [1024, 128, 1] on host" for messages.
  std::string DebugString() const;
};

// Converts a DLTensor: float32/float16/bfloat16 (lanes 1) on kDLCPU,
// kDLCUDAHost or kDLCUDA, 1 to kMaxDims dimensions (checked before shape and
// strides are read); byte_offset is applied; null strides mean row-major
// (computed with overflow checks). InvalidArgument naming the unsupported
// field otherwise (also for a null shape or a negative extent).
absl::StatusOr<TensorView> FromDLPack(const DLTensor& tensor);

}  // namespace kvcache

#endif  // KVCACHE_API_TENSOR_VIEW_H_
