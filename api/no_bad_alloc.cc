#include "api/no_bad_alloc.h"

#include <stdexcept>
#include <system_error>

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

absl::Status FromException(absl::string_view call,
                           const std::exception& e) noexcept {
  absl::StatusCode code = absl::StatusCode::kInternal;
  if (dynamic_cast<const std::length_error*>(&e) != nullptr) {
    code = absl::StatusCode::kInvalidArgument;
  } else if (dynamic_cast<const std::system_error*>(&e) != nullptr) {
    code = absl::StatusCode::kResourceExhausted;
  }
  try {
    return absl::Status(code, absl::StrCat(call, ": ", e.what()));
  } catch (...) {
    return absl::Status(code, "");
  }
}

absl::Status FromUnknownException(absl::string_view call) noexcept {
  try {
    return absl::InternalError(absl::StrCat(call, ": unknown exception"));
  } catch (...) {
    return absl::Status(absl::StatusCode::kInternal, "");
  }
}

}  // namespace internal
}  // namespace kvcache
