// What the GPU benchmarks (kernel_benchmark, attention_benchmark) share: the
// device copy baseline every "% of copy" is relative to (a 1 GiB
// device-to-device copy, bytes read + written, measured in the same process),
// medians, per-case samples against that baseline, a device-memory arena, the
// timing of a call on a stream and the check that marks a benchmark errored.
// Without a CUDA toolkit only Median and Samples exist.
//
// Thread-safety: none; benchmarks run one at a time. The copy runs are a
// process-wide list (CopyRuns).

#ifndef KVCACHE_BENCHMARKS_BENCH_UTIL_H_
#define KVCACHE_BENCHMARKS_BENCH_UTIL_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "benchmark/benchmark.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache::bench {

// A GPU benchmark binary's main(): Google Benchmark's flags (an unknown one
// is an error: 1), then `register_all`, the run, then `print_summary`.
int BenchmarkMain(int argc, char** argv, void (*register_all)(),
                  void (*print_summary)());

// A build without CUDA: registers the one benchmark such a binary has, which
// reports "kvcache was built without CUDA support" as its error.
void RegisterNoCuda();

// The median (the upper one of an even count); 0 for no values.
double Median(std::vector<double> v);

// GB/s per run of the device copy baseline (BM_DeviceCopy), in run order.
std::vector<double>& CopyRuns();
// Median(CopyRuns()): 0 before the baseline has run.
double CopyBandwidth();

// Samples of one case: time per call, GB/s and % of a baseline.
struct Samples {
  std::vector<double> us, gbps, pct;
  // One timing: `seconds` per call moving `bytes`, against `baseline_gbps`
  // (pct stays 0 when the baseline is 0).
  void Add(double seconds, double bytes, double baseline_gbps);
};

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

inline bool IsOk(cudaError_t e) { return e == cudaSuccess; }
inline bool IsOk(const absl::Status& s) { return s.ok(); }
inline std::string Describe(cudaError_t e) { return cudaGetErrorString(e); }
inline std::string Describe(const absl::Status& s) { return s.ToString(); }

// Inside a benchmark body (with `state` in scope): a failed cudaError_t or
// absl::Status marks the benchmark errored, naming the call, and returns.
#define BENCH_CHECK(call)                                             \
  do {                                                                \
    const auto bench_result_ = (call);                                \
    if (!::kvcache::bench::IsOk(bench_result_)) {                     \
      state.SkipWithError((std::string(#call) + " failed: " +         \
                           ::kvcache::bench::Describe(bench_result_)) \
                              .c_str());                              \
      return;                                                         \
    }                                                                 \
  } while (0)

// Device memory owned for the duration of one benchmark run.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <class T>
  cudaError_t Alloc(T** p, size_t bytes) {
    void* v = nullptr;
    const cudaError_t e = cudaMalloc(&v, bytes);
    if (e == cudaSuccess) ptrs_.push_back(v);
    *p = static_cast<T*>(v);
    return e;
  }

 private:
  std::vector<void*> ptrs_;
};

// Seconds per call of `fn` (which enqueues work on `stream`): events around
// `launches` calls, after one warm-up call.
template <class F>
double TimePerCall(cudaStream_t stream, int launches, F&& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();
  cudaStreamSynchronize(stream);
  cudaEventRecord(a, stream);
  for (int i = 0; i < launches; ++i) fn();
  cudaEventRecord(b, stream);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / 1e3 / launches;
}

// The baseline: a 1 GiB device-to-device cudaMemcpyAsync, timed in 3-copy
// runs per iteration; each iteration's GB/s (2 x bytes / time) goes to
// CopyRuns. Register it first, with manual time:
//   benchmark::RegisterBenchmark("device_copy_1GiB", bench::BM_DeviceCopy)
//       ->UseManualTime();
void BM_DeviceCopy(benchmark::State& state);

#endif  // KVCACHE_HAVE_CUDA_RUNTIME

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCHMARKS_BENCH_UTIL_H_
