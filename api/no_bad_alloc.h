// NoBadAlloc: the one place where an exception becomes a status, so that none
// crosses the C++ or the C API. std::bad_alloc (host memory exhausted inside a
// standard container or string) is expected and becomes ResourceExhausted;
// anything else is a last resort (issue #12: std::length_error from a hostile
// size, std::system_error from a thread that could not start): length_error
// becomes InvalidArgument, system_error ResourceExhausted, any other
// exception Internal, each with its what(). Internal to api/.

#ifndef KVCACHE_API_NO_BAD_ALLOC_H_
#define KVCACHE_API_NO_BAD_ALLOC_H_

#include <exception>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvcache {
namespace internal {

// ResourceExhausted for a call that ran out of host memory; never throws (the
// message is dropped when even it cannot be allocated).
absl::Status OutOfHostMemory(absl::string_view call) noexcept;
// The status of any other exception a call let escape (see above).
absl::Status FromException(absl::string_view call,
                           const std::exception& e) noexcept;
absl::Status FromUnknownException(absl::string_view call) noexcept;

// Runs a public entry point's body: std::bad_alloc becomes ResourceExhausted
// instead of crossing the API. The bodies allocate before they change
// anything, so the manager is left as it was.
template <typename F>
auto NoBadAlloc(absl::string_view call, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return OutOfHostMemory(call);
  } catch (const std::exception& e) {
    return FromException(call, e);
  } catch (...) {
    return FromUnknownException(call);
  }
}

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_API_NO_BAD_ALLOC_H_
