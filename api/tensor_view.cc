#include "api/tensor_view.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "dlpack/dlpack.h"

namespace kvcache {

TensorView TensorView::Contiguous(void* data, DType dtype,
                                  std::initializer_list<int64_t> shape,
                                  MemoryKind memory, int32_t device) {
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.memory = memory;
  view.device = device;
  view.ndim =
      static_cast<int32_t>(shape.size() > kMaxDims ? kMaxDims : shape.size());
  int i = 0;
  for (int64_t dim : shape) {
    if (i == kMaxDims) break;
    view.shape[i++] = dim;
  }
  // Unsigned: a hostile shape gives a wrong stride (rejected where the view
  // is checked), never undefined behaviour.
  uint64_t stride = 1;
  for (int d = view.ndim - 1; d >= 0; --d) {
    view.strides[d] = static_cast<int64_t>(stride);
    stride *= static_cast<uint64_t>(view.shape[d]);
  }
  return view;
}

namespace {

// The dimensions a view's arrays really hold: ndim is the caller's and is not
// trusted (issue #12: ndim = 2^30 read far past the arrays).
int ValidDims(int32_t ndim) {
  return ndim < 0                      ? 0
         : ndim > TensorView::kMaxDims ? TensorView::kMaxDims
                                       : ndim;
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ValidDims(ndim); ++d) {
    if (__builtin_mul_overflow(n, shape[d], &n)) return -1;
  }
  return n;
}

std::string TensorView::DebugString() const {
  const int dims = ValidDims(ndim);
  return absl::StrCat(
      DTypeName(dtype), "[",
      absl::StrJoin(absl::MakeConstSpan(shape, dims), ", "), "] strides [",
      absl::StrJoin(absl::MakeConstSpan(strides, dims), ", "), "] on ",
      memory == MemoryKind::kHost ? "host" : absl::StrCat("cuda:", device));
}

absl::StatusOr<TensorView> FromDLPack(const DLTensor& tensor) {
  TensorView view;
  if (tensor.dtype.lanes != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DLTensor has ", tensor.dtype.lanes, " lanes; only 1 is supported"));
  }
  if (tensor.dtype.code == kDLFloat && tensor.dtype.bits == 32) {
    view.dtype = DType::kFloat32;
  } else if (tensor.dtype.code == kDLFloat && tensor.dtype.bits == 16) {
    view.dtype = DType::kFloat16;
  } else if (tensor.dtype.code == kDLBfloat && tensor.dtype.bits == 16) {
    view.dtype = DType::kBFloat16;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "DLTensor dtype (code ", tensor.dtype.code, ", bits ",
        tensor.dtype.bits, ") is not float32, float16 or bfloat16"));
  }
  switch (tensor.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      view.memory = MemoryKind::kHost;
      break;
    case kDLCUDA:
      view.memory = MemoryKind::kCuda;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("DLTensor device type ", tensor.device.device_type,
                       " is not CPU, CUDA host or CUDA"));
  }
  view.device = tensor.device.device_id;
  if (tensor.ndim < 1 || tensor.ndim > TensorView::kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat("DLTensor has ", tensor.ndim,
                     " dimensions; expected 1 to ", TensorView::kMaxDims));
  }
  if (tensor.data == nullptr) {
    return absl::InvalidArgumentError("DLTensor data is null");
  }
  const int64_t elem = static_cast<int64_t>(DTypeSize(view.dtype));
  if (tensor.byte_offset % elem != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DLTensor byte_offset ", tensor.byte_offset,
                     " is not a multiple of the element size ", elem));
  }
  if (tensor.shape == nullptr) {
    return absl::InvalidArgumentError("DLTensor shape is null");
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(tensor.data);
  if (tensor.byte_offset > UINTPTR_MAX - base) {
    return absl::InvalidArgumentError(absl::StrCat("DLTensor byte_offset ",
                                                   tensor.byte_offset,
                                                   " wraps the address space"));
  }
  view.ndim = tensor.ndim;
  view.data = static_cast<char*>(tensor.data) + tensor.byte_offset;
  // Null strides mean row-major: each stride is the product of the later
  // extents, computed without overflow.
  int64_t stride = 1;
  for (int d = tensor.ndim - 1; d >= 0; --d) {
    const int64_t extent = tensor.shape[d];
    if (extent < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("DLTensor shape[", d, "] = ", extent, " is negative"));
    }
    view.shape[d] = extent;
    view.strides[d] = tensor.strides != nullptr ? tensor.strides[d] : stride;
    if (tensor.strides == nullptr && d > 0 &&
        __builtin_mul_overflow(stride, extent, &stride)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DLTensor row-major strides of shape [",
          absl::StrJoin(absl::MakeConstSpan(tensor.shape, tensor.ndim), ", "),
          "] overflow int64"));
    }
  }
  return view;
}

}  // namespace kvcache
