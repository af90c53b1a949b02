// NoBadAlloc: the one place where std::bad_alloc (host memory exhausted inside
// a standard container or string) becomes a ResourceExhausted status, so that
// no exception crosses the C++ or the C API. Internal to api/.

#ifndef KVCACHE_API_NO_BAD_ALLOC_H_
#define KVCACHE_API_NO_BAD_ALLOC_H_

#include <new>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvcache {
namespace internal {

// ResourceExhausted for a call that ran out of host memory; never throws (the
// message is dropped when even it cannot be allocated).
absl::Status OutOfHostMemory(absl::string_view call) noexcept;

// Runs a public entry point's body: std::bad_alloc becomes ResourceExhausted
// instead of crossing the API. The bodies allocate before they change
// anything, so the manager is left as it was.
template <typename F>
auto NoBadAlloc(absl::string_view call, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return OutOfHostMemory(call);
  }
}

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_API_NO_BAD_ALLOC_H_
