#include "benchmarks/replay/progress.h"

#include <unistd.h>

#include <string>

namespace kvcache::replay {
namespace {

constexpr int kBarWidth = 30;
constexpr double kTerminalInterval = 0.2;

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

Progress::Progress(std::FILE* out, int64_t total, double interval_s)
    : Progress(out, total, interval_s, isatty(fileno(out)) != 0) {}

Progress::Progress(std::FILE* out, int64_t total, double interval_s,
                   bool terminal)
    : out_(out),
      total_(total),
      interval_s_(interval_s),
      terminal_(terminal),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

void Progress::Update(int64_t done, int64_t tokens) {
  const auto now = std::chrono::steady_clock::now();
  if (Seconds(now - last_) < (terminal_ ? kTerminalInterval : interval_s_)) {
    return;
  }
  last_ = now;
  Print(done, tokens, /*final_line=*/false);
}

void Progress::Finish(int64_t done, int64_t tokens) {
  Print(done, tokens, /*final_line=*/true);
}

void Progress::Print(int64_t done, int64_t tokens, bool final_line) {
  const double elapsed = Seconds(std::chrono::steady_clock::now() - start_);
  const double rate = elapsed > 0.0 ? static_cast<double>(tokens) / elapsed : 0;
  if (terminal_) {
    const int filled =
        total_ > 0 ? static_cast<int>(kBarWidth * done / total_) : kBarWidth;
    const std::string bar =
        std::string(filled, '#') + std::string(kBarWidth - filled, '.');
    std::fprintf(out_, "\r[%s] %lld/%lld requests  %.0f tokens/s  %.0f s%s",
                 bar.c_str(), static_cast<long long>(done),
                 static_cast<long long>(total_), rate, elapsed,
                 final_line ? "\n" : "");
  } else {
    std::fprintf(out_, "progress: %lld/%lld requests, %.0f tokens/s, %.0f s\n",
                 static_cast<long long>(done), static_cast<long long>(total_),
                 rate, elapsed);
  }
  std::fflush(out_);
}

}  // namespace kvcache::replay
