#include "api/no_bad_alloc.h"

#include "absl/strings/str_cat.h"

namespace kvcache {
namespace internal {

absl::Status OutOfHostMemory(absl::string_view call) noexcept {
  try {
    return absl::ResourceExhaustedError(
        absl::StrCat(call, ": out of host memory (std::bad_alloc)"));
  } catch (const std::bad_alloc&) {
    return absl::Status(absl::StatusCode::kResourceExhausted, "");
  }
}

}  // namespace internal
}  // namespace kvcache
