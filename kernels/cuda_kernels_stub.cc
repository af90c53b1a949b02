// The CUDA launchers in a build without a CUDA toolkit: every call fails
// cleanly.

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda_kernels.h"

namespace kvcache {
namespace {

absl::Status NoCuda(const char* what) {
  return absl::FailedPreconditionError(
      absl::StrCat(what, ": kvcache was built without CUDA support"));
}

}  // namespace

absl::Status QuantizeWriteCuda(const QuantizeWriteParams&, void*) {
  return NoCuda("QuantizeWriteCuda");
}
absl::Status GatherCuda(const GatherParams&, void*) {
  return NoCuda("GatherCuda");
}
absl::Status BlockCopyCuda(const BlockCopyParams&, void*) {
  return NoCuda("BlockCopyCuda");
}
absl::Status AttentionCuda(const AttentionParams&, void*) {
  return NoCuda("AttentionCuda");
}

}  // namespace kvcache
