// Progress reports a long replay on stderr: on a terminal, one line redrawn
// in place ("\r") with a bar, requests done of total and tokens per second;
// otherwise a plain line every `interval_s` seconds. Not thread-safe.

#ifndef KVCACHE_BENCHMARKS_REPLAY_PROGRESS_H_
#define KVCACHE_BENCHMARKS_REPLAY_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace kvcache::replay {

class Progress {
 public:
  // `out` is written to; whether it is a terminal picks the style.
  Progress(std::FILE* out, int64_t total, double interval_s);
  Progress(std::FILE* out, int64_t total, double interval_s, bool terminal);

  // Called after every step; prints at most every 0.2 s on a terminal.
  void Update(int64_t done, int64_t tokens);
  // Prints the last state and ends the line.
  void Finish(int64_t done, int64_t tokens);

 private:
  void Print(int64_t done, int64_t tokens, bool final_line);

  std::FILE* out_;
  int64_t total_;
  double interval_s_;
  bool terminal_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_PROGRESS_H_
