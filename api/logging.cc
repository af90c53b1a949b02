#include "api/logging.h"

#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/sinks/base_sink.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

namespace kvcache {
namespace internal {
namespace {

spdlog::level::level_enum ToSpdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace:
      return spdlog::level::trace;
    case LogLevel::kDebug:
      return spdlog::level::debug;
    case LogLevel::kInfo:
      return spdlog::level::info;
    case LogLevel::kWarning:
      return spdlog::level::warn;
    case LogLevel::kError:
      return spdlog::level::err;
    case LogLevel::kOff:
      break;
  }
  return spdlog::level::off;
}

LogLevel FromSpdlog(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
      return LogLevel::kTrace;
    case spdlog::level::debug:
      return LogLevel::kDebug;
    case spdlog::level::info:
      return LogLevel::kInfo;
    case spdlog::level::warn:
      return LogLevel::kWarning;
    default:
      return LogLevel::kError;  // err and critical.
  }
}

// Hands each message's text (no time stamp, level or newline) to the sink.
class CallbackSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit CallbackSink(LogSink sink) : sink_(std::move(sink)) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    sink_(FromSpdlog(msg.level),
          absl::string_view(msg.payload.data(), msg.payload.size()));
  }
  void flush_() override {}

 private:
  LogSink sink_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<spdlog::logger>> MakeLogger(
    const KVCacheConfig& config) {
  if (!config.logger_name.empty()) {
    std::shared_ptr<spdlog::logger> logger = spdlog::get(config.logger_name);
    if (logger == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("logger_name \"", config.logger_name,
                       "\" is not a registered spdlog logger; register it "
                       "first or use log_sink"));
    }
    return logger;
  }
  spdlog::sink_ptr sink;
  if (config.log_sink) {
    sink = std::make_shared<CallbackSink>(config.log_sink);
  } else {
    sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  }
  // Not registered: the engine's registry and default logger stay untouched.
  auto logger = std::make_shared<spdlog::logger>("kvcache", std::move(sink));
  logger->set_level(ToSpdlog(config.log_level));
  return logger;
}

}  // namespace internal
}  // namespace kvcache
