// Google Benchmark of the CUDA cache kernels. First measures the device's copy
// bandwidth (a 1 GiB device-to-device cudaMemcpy, bytes read + written); then
// every case reports GB/s (bytes read + written by the kernel, over the median
// device time per launch) and pct_of_copy, its ratio to that copy bandwidth
// measured in the same process. Decode-sized writes are timed as CUDA-graph
// replays of 100 launches (us_per_launch). Inputs rotate over several buffer
// sets so that the working set is far larger than L2. A summary table is
// printed at the end, and a table of each int8/fp8 case with side scales
// beside the same case with inline scales (DESIGN.md section 2). Both
// placements count the same bytes (codes, 4 bytes of scale per row, inputs or
// outputs; not the inline rows' padding), so their %copy compare directly.
//
// The host tier (README "Host tier"): pinned host <-> device copy bandwidth
// (1 GiB cudaMemcpyAsync each way) is measured first, then offload (device
// -> tier) and onboard (tier -> device) batches of whole blocks (a list of
// (block, slot) pairs over the run table of a block's 128 runs) through the
// tier's own copy queue (storage/tier_copier.h), each reported as GB/s and
// as pct_of_copy of the same direction's host copy bandwidth; "ctas=N" rows
// limit the copy kernel to N thread blocks (default: the copier's own), and
// "copy_engines" rows cross the link by the copy engines (whole slots through
// a staging buffer: set_copy_blocks(0)).
//
//   bazel run -c opt //benchmarks:kernel_benchmark   (on a GPU host; or via
//   tools/bundle_gpu.sh)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "benchmarks/bench_util.h"
#include "benchmarks/empty_kernel.h"
#include "core/cache_layout.h"
#include "core/dtype.h"
#include "core/scale_placement.h"
#include "kernels/cuda_kernels.h"
#include "kernels/float_convert.h"
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

using bench::CopyRuns;
using bench::DeviceArena;
using bench::Median;
// Per case: GB/s, % of copy and us per launch (bench::Samples).
using Summary = bench::Samples;
std::map<std::string, Summary>& Summaries() {
  static std::map<std::string, Summary> s;
  return s;
}

// Fills `bytes` of device memory with random Gaussian values of dtype (tiling a
// host pattern).
cudaError_t FillRandom(void* dst, size_t bytes, DType dtype, uint64_t seed) {
  static std::vector<uint8_t> pattern;
  static DType pattern_dtype = DType::kInt8;
  constexpr size_t kPattern = size_t{8} << 20;
  if (pattern.empty() || pattern_dtype != dtype) {
    pattern.resize(kPattern);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t e = DTypeSize(dtype);
    for (size_t i = 0; i + e <= kPattern; i += e) {
      const float x = normal(rng);
      if (dtype == DType::kFloat32) {
        std::memcpy(&pattern[i], &x, 4);
      } else {
        const uint16_t h = dtype == DType::kBFloat16
                               ? internal::PortableFloatToBFloat16(x)
                               : internal::PortableFloatToFloat16(x);
        std::memcpy(&pattern[i], &h, 2);
      }
    }
    pattern_dtype = dtype;
  }
  for (size_t off = 0; off < bytes; off += kPattern) {
    const cudaError_t e =
        cudaMemcpy(static_cast<uint8_t*>(dst) + off, pattern.data(),
                   std::min(kPattern, bytes - off), cudaMemcpyHostToDevice);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Fills an inline-scale cache of `rows` rows of `pitch` bytes: random codes
// (and padding) from FillRandom's pattern, then a finite Gaussian scale at
// byte `at` of every row.
cudaError_t FillInlineRows(void* dst, int64_t rows, int64_t pitch, int64_t at,
                           uint64_t seed) {
  std::vector<uint8_t> host(static_cast<size_t>(rows * pitch));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> code(-100, 100);
  std::vector<uint8_t> pattern(size_t{1} << 20);
  for (uint8_t& b : pattern) b = static_cast<uint8_t>(code(rng));
  for (size_t off = 0; off < host.size(); off += pattern.size()) {
    std::memcpy(host.data() + off, pattern.data(),
                std::min(pattern.size(), host.size() - off));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = normal(rng);
    std::memcpy(&host[r * pitch + at], &scale, 4);
  }
  return cudaMemcpy(dst, host.data(), host.size(), cudaMemcpyHostToDevice);
}

// " side" or " inline" for quantized caches (the placement's name in the
// case's name), nothing for bf16/fp16.
std::string PlacementSuffix(DType cache, ScalePlacement placement) {
  if (!IsQuantized(cache)) return "";
  return std::string(" ") + ScalePlacementName(placement);
}

// Sets the layer's cache pointers: K and V caches of the layout's size, and
// side scale tensors or the inline scale pointers.
cudaError_t AllocCache(DeviceArena& arena, LayerCache& cache) {
  const CacheLayout& layout = cache.layout;
  const size_t elem = DTypeSize(layout.cache_dtype);
  const size_t cache_bytes =
      static_cast<size_t>(layout.num_blocks * layout.key_block_elems()) * elem;
  cudaError_t e = arena.Alloc(&cache.key_cache, cache_bytes);
  if (e == cudaSuccess) e = arena.Alloc(&cache.value_cache, cache_bytes);
  if (e != cudaSuccess) return e;
  if (layout.inline_scales()) {
    cache.key_scale = InlineScale(layout, cache.key_cache);
    cache.value_scale = InlineScale(layout, cache.value_cache);
  } else if (layout.side_scales()) {
    const size_t scale_bytes =
        static_cast<size_t>(layout.num_slots() * layout.num_heads) *
        sizeof(float);
    e = arena.Alloc(reinterpret_cast<void**>(&cache.key_scale), scale_bytes);
    if (e == cudaSuccess) {
      e = arena.Alloc(reinterpret_cast<void**>(&cache.value_scale),
                      scale_bytes);
    }
  }
  return e;
}

void Report(benchmark::State& state, const std::string& name,
            double bytes_per_launch,
            const std::vector<double>& seconds_per_launch, bool graph) {
  const double t = Median(seconds_per_launch);
  const double gbps = bytes_per_launch / t / 1e9;
  const double copy = Median(CopyRuns());
  const double pct = copy > 0 ? 100.0 * gbps / copy : 0;
  state.counters["GB/s"] = gbps;
  state.counters["pct_of_copy"] = pct;
  state.counters["us_per_launch"] = t * 1e6;
  Summary& s = Summaries()[name + (graph ? " [graph]" : "")];
  s.gbps.push_back(gbps);
  s.pct.push_back(pct);
  s.us.push_back(t * 1e6);
}

// Pinned host <-> device copy bandwidth, one direction (bytes moved / time).
std::vector<double>& HostCopyRuns(bool to_device) {
  static std::vector<double> runs[2];
  return runs[to_device];
}

void BM_HostCopy(benchmark::State& state, bool to_device) {
  const size_t bytes = size_t{1} << 30;
  DeviceArena arena;
  void* dev = nullptr;
  BENCH_CHECK(arena.Alloc(&dev, bytes));
  void* host = nullptr;
  BENCH_CHECK(cudaMallocHost(&host, bytes));
  std::memset(host, 1, bytes);
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  const cudaMemcpyKind kind =
      to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  void* dst = to_device ? dev : host;
  const void* src = to_device ? host : dev;
  BENCH_CHECK(cudaMemcpy(dst, src, bytes, kind));  // Warm-up.
  std::vector<double> times;
  for (auto _ : state) {
    cudaEventRecord(start);
    cudaMemcpyAsync(dst, src, bytes, kind);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
    times.push_back(ms / 1e3);
  }
  BENCH_CHECK(cudaGetLastError());
  const double gbps = bytes / Median(times) / 1e9;
  HostCopyRuns(to_device).push_back(gbps);
  state.counters["GB/s"] = gbps;
  Summary& s =
      Summaries()[to_device ? "host->device copy 1 GiB (tier baseline)"
                            : "device->host copy 1 GiB (tier baseline)"];
  s.gbps.push_back(gbps);
  s.pct.push_back(100.0);
  s.us.push_back(Median(times) * 1e6);
  cudaFreeHost(host);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

// Host tier: a batch of `blocks` whole blocks (every layer's K, V and
// scales) copied between a Llama-3-8B-like int8 cache and the tier's pinned
// pool by the tier's copy queue, timed on the caller's stream (the batch is
// ordered after `start` and `stop` after the batch).
struct TierCase {
  int64_t blocks;
  bool onboard;
  // Thread blocks of the copy kernel; -1 = the copier's own, 0 = the copy
  // engines (no kernel).
  int ctas = -1;
  std::string Name() const {
    return std::string(onboard ? "tier onboard" : "tier offload") + " " +
           std::to_string(blocks) + " blocks x 32 layers int8 H=8 D=128" +
           (ctas > 0    ? " ctas=" + std::to_string(ctas)
            : ctas == 0 ? " copy_engines"
                        : "");
  }
};

void BM_TierCopy(benchmark::State& state, TierCase c) {
  constexpr int kLayers = 32;
  CacheLayout layout;
  layout.num_blocks = 4 * c.blocks;  // Rotate over 4 sets of blocks.
  layout.block_size = 16;
  layout.num_heads = 8;
  layout.head_size = 128;
  layout.head_size_v = 128;
  layout.cache_dtype = DType::kInt8;
  DeviceArena arena;
  std::vector<LayerCache> layers(kLayers);
  const size_t kv = layout.num_blocks * layout.key_block_elems();
  const size_t sc = layout.num_blocks * layout.scale_block_elems() * 4;
  for (LayerCache& l : layers) {
    void *k, *v, *ks, *vs;
    BENCH_CHECK(arena.Alloc(&k, kv));
    BENCH_CHECK(arena.Alloc(&v, kv));
    BENCH_CHECK(arena.Alloc(&ks, sc));
    BENCH_CHECK(arena.Alloc(&vs, sc));
    l = LayerCache{layout, k, v, static_cast<float*>(ks),
                   static_cast<float*>(vs)};
  }
  // As the host tier lays a block out: every layer's runs of block 0, back
  // to back in the slot.
  std::vector<TierRun> tier_runs;
  int64_t slot_bytes = 0;
  for (const LayerCache& l : layers) {
    ByteRun runs[kMaxBlockRuns];
    const int n = BlockRuns(l, 0, runs);
    for (int i = 0; i < n; ++i) {
      tier_runs.push_back(TierRun{runs[i].data, runs[i].bytes, slot_bytes});
      slot_bytes += runs[i].bytes;
    }
  }
  absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
  BENCH_CHECK(device.status());
  absl::StatusOr<std::unique_ptr<TierCopier>> copier = CreateTierCopier(
      **device, tier_runs, slot_bytes, static_cast<int32_t>(layout.num_blocks));
  BENCH_CHECK(copier.status());
  if (c.ctas >= 0) (*copier)->set_copy_blocks(c.ctas);
  const TierLane lane = c.onboard ? TierLane::kOnboard : TierLane::kOffload;
  // One batch per set of blocks, built once: block b <-> slot b.
  std::vector<std::vector<TierPair>> batches(4);
  for (int set = 0; set < 4; ++set) {
    for (int64_t i = 0; i < c.blocks; ++i) {
      const int32_t b = static_cast<int32_t>(set * c.blocks + i);
      batches[set].push_back(TierPair{b, b});
    }
  }
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (int set = 0; set < 4; ++set) {  // Warm-up (and first touch).
    BENCH_CHECK((*copier)->Enqueue(lane, batches[set], stream, TierDeps()));
  }
  BENCH_CHECK((*copier)->WaitOn(lane, (*copier)->enqueued(lane), stream));
  BENCH_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> times;
  int set = 0;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    const absl::Status queued =
        (*copier)->Enqueue(lane, batches[set], stream, TierDeps());
    const absl::Status waited =
        (*copier)->WaitOn(lane, (*copier)->enqueued(lane), stream);
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    if (!queued.ok() || !waited.ok()) {
      state.SkipWithError((queued.ok() ? waited : queued).ToString().c_str());
      break;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
    times.push_back(ms / 1e3);
    set = (set + 1) % 4;
  }
  BENCH_CHECK(cudaGetLastError());
  const double bytes = static_cast<double>(c.blocks) * slot_bytes;
  const double t = Median(times);
  const double gbps = bytes / t / 1e9;
  const double copy = Median(HostCopyRuns(c.onboard));
  const double pct = copy > 0 ? 100.0 * gbps / copy : 0;
  state.counters["GB/s"] = gbps;
  state.counters["pct_of_copy"] = pct;
  state.counters["us_per_batch"] = t * 1e6;
  Summary& s = Summaries()[c.Name()];
  s.gbps.push_back(gbps);
  s.pct.push_back(pct);
  s.us.push_back(t * 1e6);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

struct WriteCase {
  int64_t tokens, heads, head_size;
  DType input, cache;
  bool scattered;
  bool graph;  // Decode sizes: CUDA-graph replay of 100 launches.
  ScalePlacement placement = ScalePlacement::kSide;
  std::string Name() const {
    return std::string("write ") + std::string(DTypeName(input)) + "->" +
           std::string(DTypeName(cache)) + " T=" + std::to_string(tokens) +
           " H=" + std::to_string(heads) + " D=" + std::to_string(head_size) +
           (scattered ? " scattered" : " contiguous") +
           PlacementSuffix(cache, placement);
  }
};

// Sets of buffers to rotate over so that the total input is >= 1 GiB (2..32
// sets).
int NumSets(double bytes_per_set) {
  return static_cast<int>(
      std::clamp(std::ceil((1 << 30) / bytes_per_set), 2.0, 32.0));
}

void BM_QuantizeWrite(benchmark::State& state, WriteCase c) {
  constexpr int64_t kBlockSize = 16;
  const int64_t T = c.tokens, H = c.heads, D = c.head_size;
  const size_t in_elem = DTypeSize(c.input), cache_elem = DTypeSize(c.cache);
  const size_t in_bytes =
      static_cast<size_t>(T * H * D) * in_elem;  // Per K or V.
  const int sets = c.graph ? 8 : NumSets(2.0 * in_bytes);
  DeviceArena arena;
  std::mt19937_64 rng(7);
  // Cache: one random block per token when scattered, else consecutive slots.
  CacheLayout layout;
  layout.block_size = kBlockSize;
  layout.num_heads = H;
  layout.head_size = D;
  layout.head_size_v = D;
  layout.cache_dtype = c.cache;
  layout.scale_placement = c.placement;
  layout.num_blocks = c.scattered ? T * 2 : (T + kBlockSize - 1) / kBlockSize;
  LayerCache cache;
  cache.layout = layout;
  BENCH_CHECK(AllocCache(arena, cache));
  std::vector<QuantizeWriteParams> params(sets);
  for (int s = 0; s < sets; ++s) {
    std::vector<int64_t> slots(T);
    std::vector<int64_t> blocks(layout.num_blocks);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (int64_t t = 0; t < T; ++t) {
      slots[t] = c.scattered ? blocks[t] * kBlockSize + t % kBlockSize : t;
    }
    QuantizeWriteParams& p = params[s];
    void *k = nullptr, *v = nullptr, *sl = nullptr;
    BENCH_CHECK(arena.Alloc(&k, in_bytes));
    BENCH_CHECK(arena.Alloc(&v, in_bytes));
    BENCH_CHECK(arena.Alloc(&sl, T * sizeof(int64_t)));
    BENCH_CHECK(FillRandom(k, in_bytes, c.input, 11));
    BENCH_CHECK(FillRandom(v, in_bytes, c.input, 11));
    BENCH_CHECK(cudaMemcpy(sl, slots.data(), T * sizeof(int64_t),
                           cudaMemcpyHostToDevice));
    p.input = {k, v, c.input, H * D, D, H * D, D};
    p.num_tokens = T;
    p.slot_mapping = static_cast<const int64_t*>(sl);
    p.cache = cache;
  }
  const double bytes = 2.0 * T * H * D * (in_elem + cache_elem) + T * 8.0 +
                       (IsQuantized(c.cache) ? 2.0 * T * H * 4 : 0);
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (int s = 0; s < sets; ++s)
    BENCH_CHECK(QuantizeWriteCuda(params[s], stream));  // Warm-up.
  BENCH_CHECK(cudaStreamSynchronize(stream));

  constexpr int kGraphLaunches = 100;
  cudaGraphExec_t exec = nullptr;
  if (c.graph) {
    cudaGraph_t graph;
    BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < kGraphLaunches; ++i) {
      BENCH_CHECK(QuantizeWriteCuda(params[i % sets], stream));
    }
    BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
    BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    BENCH_CHECK(cudaGraphDestroy(graph));
    BENCH_CHECK(cudaGraphLaunch(exec, stream));  // Warm-up.
    BENCH_CHECK(cudaStreamSynchronize(stream));
  }
  std::vector<double> per_launch;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    int launches = 0;
    if (c.graph) {
      cudaGraphLaunch(exec, stream);
      launches = kGraphLaunches;
    } else {
      for (int s = 0; s < sets; ++s) {
        (void)QuantizeWriteCuda(params[s], stream);
        ++launches;
      }
    }
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
    per_launch.push_back(ms / 1e3 / launches);
  }
  BENCH_CHECK(cudaGetLastError());
  Report(state, c.Name(), bytes, per_launch, c.graph);
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

// Baseline of the decode rows: a graph of 100 launches of an empty kernel.
void BM_EmptyLaunchGraph(benchmark::State& state) {
  constexpr int kGraphLaunches = 100;
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  cudaGraph_t graph;
  cudaGraphExec_t exec = nullptr;
  BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < kGraphLaunches; ++i) {
    BENCH_CHECK(static_cast<cudaError_t>(bench::LaunchEmptyKernel(stream)));
  }
  BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
  BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  BENCH_CHECK(cudaGraphDestroy(graph));
  BENCH_CHECK(cudaGraphLaunch(exec, stream));  // Warm-up.
  BENCH_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> per_launch;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    cudaGraphLaunch(exec, stream);
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
    per_launch.push_back(ms / 1e3 / kGraphLaunches);
  }
  BENCH_CHECK(cudaGetLastError());
  const double t = Median(per_launch);
  state.counters["us_per_launch"] = t * 1e6;
  Summaries()["empty kernel (launch baseline) [graph]"].us.push_back(t * 1e6);
  Summaries()["empty kernel (launch baseline) [graph]"].gbps.push_back(0);
  Summaries()["empty kernel (launch baseline) [graph]"].pct.push_back(0);
  cudaGraphExecDestroy(exec);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

struct GatherCase {
  int64_t tokens, heads, head_size;
  DType cache, output;
  ScalePlacement placement = ScalePlacement::kSide;
  std::string Name() const {
    return std::string("gather ") + std::string(DTypeName(cache)) + "->" +
           std::string(DTypeName(output)) + " T=" + std::to_string(tokens) +
           " H=" + std::to_string(heads) + " D=" + std::to_string(head_size) +
           " block table" + PlacementSuffix(cache, placement);
  }
};

void BM_Gather(benchmark::State& state, GatherCase c) {
  constexpr int64_t kBlockSize = 16;
  const int64_t T = c.tokens, H = c.heads, D = c.head_size;
  const size_t out_elem = DTypeSize(c.output), cache_elem = DTypeSize(c.cache);
  const size_t out_bytes = static_cast<size_t>(T * H * D) * out_elem;
  const int sets = NumSets(2.0 * out_bytes);
  const int64_t blocks_per_set = (T + kBlockSize - 1) / kBlockSize;
  DeviceArena arena;
  CacheLayout layout;
  layout.block_size = kBlockSize;
  layout.num_heads = H;
  layout.head_size = D;
  layout.head_size_v = D;
  layout.cache_dtype = c.cache;
  layout.scale_placement = c.placement;
  layout.num_blocks = blocks_per_set * sets;
  LayerCache cache;
  cache.layout = layout;
  BENCH_CHECK(AllocCache(arena, cache));
  const size_t cache_bytes =
      static_cast<size_t>(layout.num_blocks * layout.key_block_elems()) *
      cache_elem;
  const size_t scale_bytes =
      static_cast<size_t>(layout.num_slots() * H) * sizeof(float);
  if (layout.inline_scales()) {
    const int64_t rows = layout.num_slots() * H;
    const int64_t pitch = layout.key_row_pitch();
    const int64_t at = layout.scale_byte_offset();
    BENCH_CHECK(FillInlineRows(cache.key_cache, rows, pitch, at, 3));
    BENCH_CHECK(FillInlineRows(cache.value_cache, rows, pitch, at, 4));
  } else {
    BENCH_CHECK(FillRandom(cache.key_cache, cache_bytes, DType::kInt8, 3));
    BENCH_CHECK(FillRandom(cache.value_cache, cache_bytes, DType::kInt8, 3));
    if (IsQuantized(c.cache)) {
      BENCH_CHECK(FillRandom(cache.key_scale, scale_bytes, DType::kFloat32, 5));
      BENCH_CHECK(
          FillRandom(cache.value_scale, scale_bytes, DType::kFloat32, 5));
    }
  }
  std::mt19937_64 rng(9);
  std::vector<int32_t> all(layout.num_blocks);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<GatherParams> params(sets);
  for (int s = 0; s < sets; ++s) {
    void *k = nullptr, *v = nullptr, *table = nullptr;
    BENCH_CHECK(arena.Alloc(&k, out_bytes));
    BENCH_CHECK(arena.Alloc(&v, out_bytes));
    BENCH_CHECK(arena.Alloc(&table, blocks_per_set * sizeof(int32_t)));
    BENCH_CHECK(cudaMemcpy(table, all.data() + s * blocks_per_set,
                           blocks_per_set * sizeof(int32_t),
                           cudaMemcpyHostToDevice));
    GatherParams& p = params[s];
    p.cache = cache;
    p.block_table = static_cast<const int32_t*>(table);
    p.block_table_len = blocks_per_set;
    p.num_tokens = T;
    p.output = {k, v, c.output, H * D, D, H * D, D};
  }
  const double bytes = 2.0 * T * H * D * (out_elem + cache_elem) +
                       blocks_per_set * 4.0 +
                       (IsQuantized(c.cache) ? 2.0 * T * H * 4 : 0);
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (int s = 0; s < sets; ++s) BENCH_CHECK(GatherCuda(params[s], stream));
  BENCH_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> per_launch;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    for (int s = 0; s < sets; ++s) (void)GatherCuda(params[s], stream);
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
    per_launch.push_back(ms / 1e3 / sets);
  }
  BENCH_CHECK(cudaGetLastError());
  Report(state, c.Name(), bytes, per_launch, false);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

void RegisterAll() {
  benchmark::RegisterBenchmark("device_copy_1GiB", bench::BM_DeviceCopy)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.3);
  for (bool to_device : {true, false}) {
    benchmark::RegisterBenchmark(
        to_device ? "host_to_device_copy_1GiB" : "device_to_host_copy_1GiB",
        BM_HostCopy, to_device)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(0.3);
  }
  for (int64_t blocks : {16, 256}) {
    for (bool onboard : {false, true}) {
      for (int ctas : {-1, 0, 8, 16, 32, 64, 1056}) {
        if (blocks == 16 && ctas > 0) continue;
        const TierCase c{blocks, onboard, ctas};
        benchmark::RegisterBenchmark(c.Name().c_str(), BM_TierCopy, c)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(0.2);
      }
    }
  }
  std::vector<WriteCase> writes;
  for (int64_t t : {16384, 65536}) {
    for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
      for (bool scattered : {true, false}) {
        writes.push_back(
            {t, 8, 128, DType::kBFloat16, cache, scattered, false});
      }
    }
  }
  for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
    for (int64_t d : {64, 256}) {
      writes.push_back({16384, 8, d, DType::kBFloat16, cache, true, false});
      writes.push_back({16384, 8, d, DType::kBFloat16, cache, false, false});
    }
    writes.push_back({16384, 32, 128, DType::kBFloat16, cache, true, false});
    writes.push_back({16384, 8, 128, DType::kFloat32, cache, true, false});
  }
  writes.push_back(
      {16384, 8, 128, DType::kBFloat16, DType::kBFloat16, true, false});
  benchmark::RegisterBenchmark("empty_kernel_graph", BM_EmptyLaunchGraph)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.1);
  for (int64_t t : {1, 16, 64, 256}) {
    for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
      writes.push_back({t, 8, 128, DType::kBFloat16, cache, true, true});
    }
  }
  // Every int8/fp8 case again with inline scales, registered right after it.
  std::vector<WriteCase> both;
  for (const WriteCase& c : writes) {
    both.push_back(c);
    if (IsQuantized(c.cache)) {
      WriteCase inline_case = c;
      inline_case.placement = ScalePlacement::kInline;
      both.push_back(inline_case);
    }
  }
  for (const WriteCase& c : both) {
    benchmark::RegisterBenchmark((c.Name() + (c.graph ? " graph" : "")).c_str(),
                                 BM_QuantizeWrite, c)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(0.2);
  }
  for (int64_t t : {16384, 65536}) {
    for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
      for (ScalePlacement placement :
           {ScalePlacement::kSide, ScalePlacement::kInline}) {
        const GatherCase g{t, 8, 128, cache, DType::kBFloat16, placement};
        benchmark::RegisterBenchmark(g.Name().c_str(), BM_Gather, g)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(0.2);
      }
    }
  }
}

void PrintSummary() {
  std::printf("\n%-62s %10s %8s %12s\n", "case (median over repetitions)",
              "GB/s", "%copy", "us/launch");
  const double copy = bench::CopyBandwidth();
  std::printf("%-62s %10.1f %8.1f %12.3f\n", "device copy 1 GiB (baseline)",
              copy, 100.0, copy > 0 ? 2.0 * (1 << 30) / copy / 1e3 : 0.0);
  for (const auto& [name, s] : Summaries()) {
    std::printf("%-62s %10.1f %8.1f %12.3f\n", name.c_str(), Median(s.gbps),
                Median(s.pct), Median(s.us));
  }
  // Side and inline scales of the same case, side by side.
  std::printf("\n%-62s %9s %9s %9s %9s %8s\n",
              "case: side vs inline scales (medians)", "side %", "inline %",
              "side us", "inline us", "t ratio");
  const std::string side = " side", inl = " inline";
  for (const auto& [name, s] : Summaries()) {
    const size_t at = name.find(side);
    if (at == std::string::npos) continue;
    std::string other = name;
    other.replace(at, side.size(), inl);
    const auto it = Summaries().find(other);
    if (it == Summaries().end()) continue;
    std::string base = name;
    base.erase(at, side.size());
    const double ts = Median(s.us), ti = Median(it->second.us);
    std::printf("%-62s %9.1f %9.1f %9.3f %9.3f %8.3f\n", base.c_str(),
                Median(s.pct), Median(it->second.pct), ts, ti,
                ts > 0 ? ti / ts : 0.0);
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
