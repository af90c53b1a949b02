// Status propagation macros for functions returning absl::Status or
// absl::StatusOr<T>:
//
//   KVCACHE_RETURN_IF_ERROR(expr);        expr is an absl::Status; returns it
//                                         when it is not OK.
//   KVCACHE_ASSIGN_OR_RETURN(lhs, expr);  expr is an absl::StatusOr<T>;
//                                         returns its status when not OK,
//                                         else moves the value into lhs
//                                         (which may be a declaration).
//
// Prefixed with KVCACHE_ so that they never clash with an engine's own
// RETURN_IF_ERROR. Annotate(status, context) prefixes a failed status's
// message with where it happened.

#ifndef KVCACHE_CORE_STATUS_MACROS_H_
#define KVCACHE_CORE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#define KVCACHE_RETURN_IF_ERROR(expr)                  \
  do {                                                 \
    absl::Status kvcache_status_ = (expr);             \
    if (!kvcache_status_.ok()) return kvcache_status_; \
  } while (0)

#define KVCACHE_STATUS_CONCAT_INNER_(a, b) a##b
#define KVCACHE_STATUS_CONCAT_(a, b) KVCACHE_STATUS_CONCAT_INNER_(a, b)

#define KVCACHE_ASSIGN_OR_RETURN(lhs, expr) \
  KVCACHE_ASSIGN_OR_RETURN_IMPL_(           \
      KVCACHE_STATUS_CONCAT_(kvcache_statusor_, __LINE__), lhs, expr)

#define KVCACHE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = std::move(statusor).value()

namespace kvcache::internal {

// `status` with its message prefixed by "context: "; OK stays OK.
inline absl::Status Annotate(const absl::Status& status,
                             absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

}  // namespace kvcache::internal

#endif  // KVCACHE_CORE_STATUS_MACROS_H_
