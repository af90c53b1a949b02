// Google Benchmark of what host tier copies cost the caller's own kernels:
// the quantize-and-write kernel (an Append's launch) timed alone and while a
// background copy between device memory and pinned host memory runs on
// another stream, the ratio of the two medians (`slowdown`) measured in the
// same run. Backgrounds:
//
//   none                  the baseline of each write case
//   kernel offload/onboard N
//                         the host tier's copy queue (storage/tier_copier.h):
//                         batches of 256 whole blocks (32 layers of an int8
//                         Llama-3-8B-like cache) between random device blocks
//                         and random slots of a 16 GiB pinned pool, with the
//                         copy kernel limited to N thread blocks
//   tier offload/onboard by copy engines
//                         the same batches by the copy engines through a
//                         staging buffer (set_copy_blocks(0))
//   engine d2h/h2d        1 GiB cudaMemcpyAsync on a stream of the lowest
//                         priority: the copy engines, no multiprocessor at all
//
// "(high priority)" rows run the writes on a stream of the greatest priority
// (the others, like the copies, on the default, which is the lowest).
//
// The writes are bf16 -> int8 with side scales, 8 heads of 128, to random
// blocks of a 117,560-block layer (the H200 replay's pool), T = 256 tokens
// (a decode step: CUDA-graph replays of 100 launches) and T = 8192 (a
// prefill step of the replay's token budget). Each iteration times one
// graph (or 8 launches); the background is queued before the first and must
// still run after the last (`covered` = 1, else the row says so). Each
// iteration then also times the host: 32 launches of the write, each
// followed by an event record, as a replay step enqueues its layers
// (`host_us_per_launch`, wall time of the enqueue alone).
//
//   bazel run -c opt //benchmarks:tier_interference_benchmark  (GPU host)

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "benchmarks/bench_util.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "kernels/cuda_kernels.h"
#include "kernels/kernel_params.h"
#include "storage/block_runs.h"
#include "storage/device.h"
#include "storage/tier_copier.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache {
namespace {

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

using bench::DeviceArena;
using bench::Median;

enum class Background { kNone, kOffload, kOnboard, kEngineD2H, kEngineH2D };

struct Case {
  int64_t tokens;
  Background background;
  int ctas = 0;  // Copy kernel thread blocks (kOffload, kOnboard).
  bool high_priority = false;  // The writes' stream at the greatest priority.
  std::string BackgroundName() const {
    switch (background) {
      case Background::kNone:
        return "none";
      case Background::kOffload:
        return ctas == 0 ? "tier offload by copy engines"
                         : "kernel offload ctas=" + std::to_string(ctas);
      case Background::kOnboard:
        return ctas == 0 ? "tier onboard by copy engines"
                         : "kernel onboard ctas=" + std::to_string(ctas);
      case Background::kEngineD2H:
        return "engine d2h";
      case Background::kEngineH2D:
        return "engine h2d";
    }
    return "?";
  }
  std::string Name() const {
    return "write T=" + std::to_string(tokens) +
           (high_priority ? " (high priority)" : "") + " under " +
           BackgroundName();
  }
};

// Median host microseconds per launch + event record of each case, by name.
std::map<std::string, std::vector<double>>& HostResults() {
  static std::map<std::string, std::vector<double>> r;
  return r;
}

// Median microseconds per write launch of each case, by name.
std::map<std::string, std::vector<double>>& Results() {
  static std::map<std::string, std::vector<double>> r;
  return r;
}

// The background's device and host memory, made once for every case (the
// 16 GiB pool takes seconds to pin) and kept for the process's life.
struct Rig {
  static constexpr int kLayers = 32;
  static constexpr int32_t kDeviceBlocks = 4096;  // 4 GiB of cache.
  static constexpr int32_t kSlots = 16384;        // 16 GiB of slots.
  static constexpr int64_t kBatchBlocks = 256;
  static constexpr int kBatches = 16;  // Distinct batches, reused in turn.

  DeviceArena arena;
  std::unique_ptr<Device> device;
  std::unique_ptr<TierCopier> copier;
  std::vector<std::vector<TierPair>> batches;
  void* engine_device = nullptr;
  void* engine_host = nullptr;
  cudaStream_t engine_stream = nullptr;
  cudaStream_t after_stream = nullptr;  // Idle: orders nothing.
  std::string error;
};

Rig* GetRig() {
  static Rig* rig = [] {
    auto* r = new Rig;
    auto fail = [r](const std::string& what) {
      r->error = what + " (" + cudaGetErrorString(cudaGetLastError()) + ")";
      return r;
    };
    CacheLayout layout;
    layout.num_blocks = Rig::kDeviceBlocks;
    layout.block_size = 16;
    layout.num_heads = 8;
    layout.head_size = 128;
    layout.head_size_v = 128;
    layout.cache_dtype = DType::kInt8;
    std::vector<TierRun> runs;
    int64_t slot_bytes = 0;
    const size_t kv = layout.num_blocks * layout.key_block_elems();
    const size_t sc = layout.num_blocks * layout.scale_block_elems() * 4;
    for (int i = 0; i < Rig::kLayers; ++i) {
      void *k, *v, *ks, *vs;
      if (r->arena.Alloc(&k, kv) != cudaSuccess ||
          r->arena.Alloc(&v, kv) != cudaSuccess ||
          r->arena.Alloc(&ks, sc) != cudaSuccess ||
          r->arena.Alloc(&vs, sc) != cudaSuccess) {
        return fail("cudaMalloc of the background's cache");
      }
      const LayerCache l{layout, k, v, static_cast<float*>(ks),
                         static_cast<float*>(vs)};
      ByteRun block_runs[kMaxBlockRuns];
      const int n = BlockRuns(l, 0, block_runs);
      for (int j = 0; j < n; ++j) {
        runs.push_back(
            TierRun{block_runs[j].data, block_runs[j].bytes, slot_bytes});
        slot_bytes += block_runs[j].bytes;
      }
    }
    absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
    if (!device.ok()) return fail(device.status().ToString());
    r->device = *std::move(device);
    absl::StatusOr<std::unique_ptr<TierCopier>> copier =
        CreateTierCopier(*r->device, runs, slot_bytes, Rig::kSlots);
    if (!copier.ok()) return fail(copier.status().ToString());
    r->copier = *std::move(copier);
    // Random device blocks and slots, as a replay's evictions and hits.
    std::mt19937 rng(17);
    std::vector<int32_t> blocks(Rig::kDeviceBlocks), slots(Rig::kSlots);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::iota(slots.begin(), slots.end(), 0);
    for (int b = 0; b < Rig::kBatches; ++b) {
      std::shuffle(blocks.begin(), blocks.end(), rng);
      std::shuffle(slots.begin(), slots.end(), rng);
      std::vector<TierPair> batch;
      for (int64_t i = 0; i < Rig::kBatchBlocks; ++i) {
        batch.push_back(TierPair{blocks[i], slots[i]});
      }
      r->batches.push_back(std::move(batch));
    }
    const size_t gib = size_t{1} << 30;
    if (r->arena.Alloc(&r->engine_device, gib) != cudaSuccess ||
        cudaMallocHost(&r->engine_host, gib) != cudaSuccess) {
      return fail("the copy engines' 1 GiB buffers");
    }
    std::fill_n(static_cast<char*>(r->engine_host), gib, 1);
    int least = 0, greatest = 0;
    if (cudaDeviceGetStreamPriorityRange(&least, &greatest) != cudaSuccess ||
        cudaStreamCreateWithPriority(&r->engine_stream, cudaStreamNonBlocking,
                                     least) != cudaSuccess ||
        cudaStreamCreateWithFlags(&r->after_stream, cudaStreamNonBlocking) !=
            cudaSuccess) {
      return fail("streams");
    }
    // First touch of every slot and block the batches use.
    for (const auto& batch : r->batches) {
      if (!r->copier->Enqueue(TierLane::kOffload, batch, r->after_stream, {})
               .ok()) {
        return fail("warm-up offload");
      }
    }
    if (!r->copier->Synchronize(TierLane::kOffload).ok()) {
      return fail("warm-up offload");
    }
    return r;
  }();
  return rig;
}

// Queues at least `seconds` of background work (by the background's own
// bandwidth, an underestimate is caught by `covered`), returns once queued.
absl::Status StartBackground(Rig& rig, const Case& c, double seconds) {
  const size_t gib = size_t{1} << 30;
  switch (c.background) {
    case Background::kNone:
      return absl::OkStatus();
    case Background::kEngineD2H:
    case Background::kEngineH2D: {
      // ~19 ms per GiB at 55 GB/s.
      const int copies = std::max(1, static_cast<int>(seconds / 0.019) + 1);
      for (int i = 0; i < copies; ++i) {
        const bool h2d = c.background == Background::kEngineH2D;
        const cudaError_t e = cudaMemcpyAsync(
            h2d ? rig.engine_device : rig.engine_host,
            h2d ? rig.engine_host : rig.engine_device, gib,
            h2d ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost,
            rig.engine_stream);
        if (e != cudaSuccess) return absl::InternalError("cudaMemcpyAsync");
      }
      return absl::OkStatus();
    }
    case Background::kOffload:
    case Background::kOnboard: {
      rig.copier->set_copy_blocks(c.ctas);
      const TierLane lane = c.background == Background::kOnboard
                                ? TierLane::kOnboard
                                : TierLane::kOffload;
      // A batch is 256 MiB; assume at most 55 GB/s.
      const int batches = std::max(
          1, static_cast<int>(seconds * 55e9 / (256.0 * (1 << 20))) + 1);
      for (int i = 0; i < batches; ++i) {
        const auto& batch = rig.batches[i % Rig::kBatches];
        if (absl::Status s =
                rig.copier->Enqueue(lane, batch, rig.after_stream, {});
            !s.ok()) {
          return s;
        }
      }
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

// Whether the background still runs (true for none), then waits for it.
bool StillRunningThenFinish(Rig& rig, const Case& c) {
  bool running = true;
  switch (c.background) {
    case Background::kNone:
      break;
    case Background::kEngineD2H:
    case Background::kEngineH2D:
      running = cudaStreamQuery(rig.engine_stream) == cudaErrorNotReady;
      cudaStreamSynchronize(rig.engine_stream);
      break;
    case Background::kOffload:
    case Background::kOnboard: {
      const TierLane lane = c.background == Background::kOnboard
                                ? TierLane::kOnboard
                                : TierLane::kOffload;
      running = rig.copier->completed(lane) < rig.copier->enqueued(lane);
      (void)rig.copier->Synchronize(lane);
      break;
    }
  }
  return running;
}

void BM_WriteUnder(benchmark::State& state, Case c) {
  Rig* rig = GetRig();
  if (!rig->error.empty()) {
    state.SkipWithError(rig->error.c_str());
    return;
  }
  constexpr int64_t kBlockSize = 16, kHeads = 8, kHeadSize = 128;
  constexpr int64_t kPoolBlocks = 117560;
  constexpr int kSets = 8;
  const int64_t T = c.tokens;
  const bool graph = T <= 256;
  DeviceArena arena;
  CacheLayout layout;
  layout.block_size = kBlockSize;
  layout.num_heads = kHeads;
  layout.head_size = kHeadSize;
  layout.head_size_v = kHeadSize;
  layout.cache_dtype = DType::kInt8;
  layout.num_blocks = kPoolBlocks;
  LayerCache cache;
  cache.layout = layout;
  const size_t cache_bytes = kPoolBlocks * layout.key_block_elems();
  const size_t scale_bytes = layout.num_slots() * kHeads * sizeof(float);
  BENCH_CHECK(arena.Alloc(&cache.key_cache, cache_bytes));
  BENCH_CHECK(arena.Alloc(&cache.value_cache, cache_bytes));
  BENCH_CHECK(
      arena.Alloc(reinterpret_cast<void**>(&cache.key_scale), scale_bytes));
  BENCH_CHECK(
      arena.Alloc(reinterpret_cast<void**>(&cache.value_scale), scale_bytes));
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int64_t> block(0, kPoolBlocks - 1);
  std::vector<QuantizeWriteParams> params(kSets);
  const size_t in_bytes = T * kHeads * kHeadSize * 2;  // bf16, K or V.
  for (QuantizeWriteParams& p : params) {
    std::vector<int64_t> slots(T);
    for (int64_t t = 0; t < T; ++t) {
      if (t % kBlockSize == 0)
        slots[t] = block(rng) * kBlockSize;
      else
        slots[t] = slots[t - 1] + 1;
    }
    void *k = nullptr, *v = nullptr, *sl = nullptr;
    BENCH_CHECK(arena.Alloc(&k, in_bytes));
    BENCH_CHECK(arena.Alloc(&v, in_bytes));
    BENCH_CHECK(arena.Alloc(&sl, T * sizeof(int64_t)));
    BENCH_CHECK(cudaMemset(k, 0x3c, in_bytes));  // bf16 ~0.01 everywhere.
    BENCH_CHECK(cudaMemset(v, 0x3c, in_bytes));
    BENCH_CHECK(cudaMemcpy(sl, slots.data(), T * sizeof(int64_t),
                           cudaMemcpyHostToDevice));
    p.input = {k,
               v,
               DType::kBFloat16,
               kHeads * kHeadSize,
               kHeadSize,
               kHeads * kHeadSize,
               kHeadSize};
    p.num_tokens = T;
    p.slot_mapping = static_cast<const int64_t*>(sl);
    p.cache = cache;
  }
  cudaStream_t stream;
  int least = 0, greatest = 0;
  BENCH_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  BENCH_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking,
                                           c.high_priority ? greatest : least));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (const QuantizeWriteParams& p : params) {
    BENCH_CHECK(QuantizeWriteCuda(p, stream));  // Warm-up.
  }
  constexpr int kGraphLaunches = 100;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < kGraphLaunches; ++i) {
      BENCH_CHECK(QuantizeWriteCuda(params[i % kSets], stream));
    }
    BENCH_CHECK(cudaStreamEndCapture(stream, &g));
    BENCH_CHECK(cudaGraphInstantiate(&exec, g, 0));
    BENCH_CHECK(cudaGraphDestroy(g));
    BENCH_CHECK(cudaGraphLaunch(exec, stream));
  }
  BENCH_CHECK(cudaStreamSynchronize(stream));
  // The timed iterations' length alone (no background), for the background's
  // size: one untimed round.
  BENCH_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < 4; ++i) {
    if (graph) {
      BENCH_CHECK(cudaGraphLaunch(exec, stream));
    } else {
      for (const QuantizeWriteParams& p : params) {
        BENCH_CHECK(QuantizeWriteCuda(p, stream));
      }
    }
  }
  BENCH_CHECK(cudaEventRecord(stop, stream));
  BENCH_CHECK(cudaEventSynchronize(stop));
  float round_ms = 0;
  BENCH_CHECK(cudaEventElapsedTime(&round_ms, start, stop));
  const double seconds = round_ms / 4e3 * state.max_iterations * 3 + 0.01;
  BENCH_CHECK(StartBackground(*rig, c, seconds));
  constexpr int kHostLaunches = 32;
  cudaEvent_t marks[kHostLaunches];
  for (cudaEvent_t& e : marks) BENCH_CHECK(cudaEventCreate(&e));
  std::vector<double> per_launch, host_per_launch;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    int launches = 0;
    if (graph) {
      cudaGraphLaunch(exec, stream);
      launches = kGraphLaunches;
    } else {
      for (const QuantizeWriteParams& p : params) {
        (void)QuantizeWriteCuda(p, stream);
        ++launches;
      }
    }
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
    per_launch.push_back(ms / 1e3 / launches);
    const auto host_start = std::chrono::steady_clock::now();
    for (int i = 0; i < kHostLaunches; ++i) {
      (void)QuantizeWriteCuda(params[i % kSets], stream);
      cudaEventRecord(marks[i], stream);
    }
    const std::chrono::duration<double> host =
        std::chrono::steady_clock::now() - host_start;
    cudaEventSynchronize(marks[kHostLaunches - 1]);
    host_per_launch.push_back(host.count() / kHostLaunches);
  }
  const bool covered = StillRunningThenFinish(*rig, c);
  BENCH_CHECK(cudaGetLastError());
  const double us = Median(per_launch) * 1e6;
  const double host_us = Median(host_per_launch) * 1e6;
  state.counters["us_per_launch"] = us;
  state.counters["host_us_per_launch"] = host_us;
  state.counters["covered"] = covered ? 1 : 0;
  if (covered) {
    Results()[c.Name()].push_back(us);
    HostResults()[c.Name()].push_back(host_us);
  }
  for (cudaEvent_t e : marks) cudaEventDestroy(e);
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

std::vector<Case>& Cases() {
  static std::vector<Case> cases;
  return cases;
}

void RegisterAll() {
  for (int64_t t : {256, 8192}) {
    Cases().push_back({t, Background::kNone});
    for (Background b : {Background::kOffload, Background::kOnboard}) {
      for (int ctas : {0, 1, 4, 16, 32}) Cases().push_back({t, b, ctas});
    }
    for (Background b : {Background::kOffload, Background::kOnboard}) {
      for (int ctas : {4, 32}) Cases().push_back({t, b, ctas, true});
    }
    Cases().push_back({t, Background::kEngineD2H});
    Cases().push_back({t, Background::kEngineH2D});
    Cases().push_back({t, Background::kNone});  // The baseline again, last.
  }
  for (const Case& c : Cases()) {
    benchmark::RegisterBenchmark(c.Name().c_str(), BM_WriteUnder, c)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->Iterations(c.tokens <= 256 ? 100 : 200);
  }
}

// Per write size: each background's median us per launch (device, and the
// host's enqueue) and their ratios to the medians of the baseline rows (both
// "none" rows, every repetition).
void PrintSummary() {
  std::printf("\n%-48s %12s %9s %10s %9s %6s\n",
              "case (median over repetitions)", "us/launch", "slowdown",
              "host us", "host x", "reps");
  std::map<int64_t, double> baseline, host_baseline;
  for (const Case& c : Cases()) {
    if (c.background != Background::kNone) continue;
    baseline[c.tokens] = Median(Results()[c.Name()]);
    host_baseline[c.tokens] = Median(HostResults()[c.Name()]);
  }
  std::map<std::string, bool> printed;
  for (const Case& c : Cases()) {
    const std::string name = c.Name();
    if (printed[name]) continue;
    printed[name] = true;
    const std::vector<double>& r = Results()[name];
    const double us = Median(r);
    const double base = baseline[c.tokens];
    const double host = Median(HostResults()[name]);
    const double host_base = host_baseline[c.tokens];
    std::printf("%-48s %12.3f %9.3f %10.3f %9.3f %6zu\n", name.c_str(), us,
                base > 0 && us > 0 ? us / base : 0.0, host,
                host_base > 0 && host > 0 ? host / host_base : 0.0, r.size());
  }
}

#else  // !KVCACHE_HAVE_CUDA_RUNTIME

void RegisterAll() { bench::RegisterNoCuda(); }
void PrintSummary() {}

#endif

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) {
  return kvcache::bench::BenchmarkMain(argc, argv, kvcache::RegisterAll,
                                       kvcache::PrintSummary);
}
