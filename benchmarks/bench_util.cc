#include "benchmarks/bench_util.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kvcache::bench {

int BenchmarkMain(int argc, char** argv, void (*register_all)(),
                  void (*print_summary)()) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  print_summary();
  return 0;
}

void RegisterNoCuda() {
  benchmark::RegisterBenchmark("no_cuda", [](benchmark::State& state) {
    for (auto _ : state) {
    }
    state.SkipWithError("kvcache was built without CUDA support");
  });
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<double>& CopyRuns() {
  static std::vector<double> runs;
  return runs;
}

double CopyBandwidth() { return Median(CopyRuns()); }

void Samples::Add(double seconds, double bytes, double baseline_gbps) {
  const double g = seconds > 0 ? bytes / seconds / 1e9 : 0;
  us.push_back(seconds * 1e6);
  gbps.push_back(g);
  pct.push_back(baseline_gbps > 0 ? 100.0 * g / baseline_gbps : 0);
}

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

void BM_DeviceCopy(benchmark::State& state) {
  const size_t bytes = size_t{1} << 30;
  DeviceArena arena;
  uint8_t *src = nullptr, *dst = nullptr;
  BENCH_CHECK(arena.Alloc(&src, bytes));
  BENCH_CHECK(arena.Alloc(&dst, bytes));
  BENCH_CHECK(cudaMemset(src, 1, bytes));
  for (auto _ : state) {
    const double t = TimePerCall(nullptr, 3, [&] {
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice);
    });
    state.SetIterationTime(t);
    CopyRuns().push_back(2.0 * bytes / t / 1e9);
  }
  BENCH_CHECK(cudaGetLastError());
  state.counters["GB/s"] = CopyBandwidth();
}

#endif  // KVCACHE_HAVE_CUDA_RUNTIME

}  // namespace kvcache::bench
