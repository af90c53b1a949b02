// Logging control (issue #19): quiet by default, log_level and log_sink, an
// unknown logger_name is an error, and spdlog's default logger is never used.

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "api/kv_cache_manager.h"
#include "gtest/gtest.h"
#include "spdlog/sinks/ostream_sink.h"
#include "spdlog/spdlog.h"

namespace kvcache {
namespace {

KVCacheConfig SmallConfig() {
  KVCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.head_size = 8;
  c.block_size = 4;
  c.num_blocks = 4;
  return c;
}

struct Collected {
  std::mutex mu;
  std::vector<std::pair<LogLevel, std::string>> messages;
};

LogSink CollectInto(std::shared_ptr<Collected> c) {
  return [c](LogLevel level, absl::string_view message) {
    std::lock_guard<std::mutex> lock(c->mu);
    c->messages.emplace_back(level, std::string(message));
  };
}

// spdlog's default logger, replaced for the test by one writing to `out`.
class DefaultLoggerCapture {
 public:
  DefaultLoggerCapture() : previous_(spdlog::default_logger()) {
    auto logger = std::make_shared<spdlog::logger>(
        "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(out_));
    logger->set_level(spdlog::level::trace);
    spdlog::set_default_logger(logger);
  }
  ~DefaultLoggerCapture() { spdlog::set_default_logger(previous_); }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

TEST(LoggingTest, QuietByDefaultAndNeverTheDefaultLogger) {
  DefaultLoggerCapture capture;
  auto collected = std::make_shared<Collected>();
  KVCacheConfig c = SmallConfig();
  c.log_sink = CollectInto(collected);
  ASSERT_TRUE(KVCacheManager::Create(c).ok());
  EXPECT_TRUE(collected->messages.empty());  // Warnings and errors only.
  c.log_sink = nullptr;
  ASSERT_TRUE(KVCacheManager::Create(c).ok());
  c.log_level = LogLevel::kTrace;
  ASSERT_TRUE(KVCacheManager::Create(c).ok());  // To stderr, not the default.
  EXPECT_EQ(capture.text(), "");
}

TEST(LoggingTest, SinkAtInfoGetsTheLayoutLine) {
  auto collected = std::make_shared<Collected>();
  KVCacheConfig c = SmallConfig();
  c.log_level = LogLevel::kInfo;
  c.log_sink = CollectInto(collected);
  ASSERT_TRUE(KVCacheManager::Create(c).ok());
  ASSERT_EQ(collected->messages.size(), 1u);
  EXPECT_EQ(collected->messages[0].first, LogLevel::kInfo);
  EXPECT_NE(
      collected->messages[0].second.find("kvcache: CPU backend, 1 layers"),
      std::string::npos)
      << collected->messages[0].second;
  c.log_level = LogLevel::kOff;
  collected->messages.clear();
  ASSERT_TRUE(KVCacheManager::Create(c).ok());
  EXPECT_TRUE(collected->messages.empty());
}

TEST(LoggingTest, UnknownLoggerNameIsAnError) {
  KVCacheConfig c = SmallConfig();
  c.logger_name = "no_such_logger_19";
  absl::StatusOr<std::unique_ptr<KVCacheManager>> m = KVCacheManager::Create(c);
  ASSERT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("\"no_such_logger_19\""),
            std::string::npos)
      << m.status();
}

TEST(LoggingTest, RegisteredLoggerIsUsedAsIs) {
  std::ostringstream out;
  auto logger = std::make_shared<spdlog::logger>(
      "logging_test_engine",
      std::make_shared<spdlog::sinks::ostream_sink_mt>(out));
  logger->set_level(spdlog::level::info);
  spdlog::register_logger(logger);
  KVCacheConfig c = SmallConfig();
  c.logger_name = "logging_test_engine";
  ASSERT_TRUE(KVCacheManager::Create(c).ok());
  EXPECT_NE(out.str().find("kvcache: CPU backend"), std::string::npos);
  EXPECT_EQ(logger->level(), spdlog::level::info);  // Left as it was.
  spdlog::drop("logging_test_engine");
}

TEST(LoggingTest, SinkAndLoggerNameTogetherOrBadLevelAreErrors) {
  KVCacheConfig c = SmallConfig();
  c.logger_name = "x";
  c.log_sink = [](LogLevel, absl::string_view) {};
  EXPECT_EQ(KVCacheManager::Create(c).status().code(),
            absl::StatusCode::kInvalidArgument);
  c = SmallConfig();
  c.log_level = static_cast<LogLevel>(0);
  absl::Status s = KVCacheManager::Create(c).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("log_level 0"), std::string::npos) << s;
}

}  // namespace
}  // namespace kvcache
