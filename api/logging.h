// The library's logger for one manager (KVCacheConfig's log_level, log_sink
// and logger_name; see kv_cache_config.h). Internal to api/.
//
// The library never changes spdlog's global state: it does not register its
// loggers, install sinks on other loggers, or set the default logger's level.

#ifndef KVCACHE_API_LOGGING_H_
#define KVCACHE_API_LOGGING_H_

#include <memory>

#include "absl/status/statusor.h"
#include "api/kv_cache_config.h"
#include "spdlog/logger.h"

namespace kvcache {
namespace internal {

// A logger of the library's own (level log_level, forwarding to log_sink, or
// to stderr), or the engine's registered logger `logger_name`.
// InvalidArgument naming logger_name when no logger is registered under it.
absl::StatusOr<std::shared_ptr<spdlog::logger>> MakeLogger(
    const KVCacheConfig& config);

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_API_LOGGING_H_
