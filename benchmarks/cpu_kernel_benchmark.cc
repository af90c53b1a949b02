// Google Benchmark of the CPU cache kernels (kernels/cpu_kernels.h) against a
// one-thread memcpy of the same bytes, timed in the same run.
//
// Every case first times std::memcpy of half its bytes (so the copy reads and
// writes as many bytes as the kernel moves; median of 11 runs, one thread) and
// then the kernel. Counters:
//   GBps            bytes the kernel must read + write (input, slots or block
//                   table, cache, scales, output) / wall time per call
//   memcpy_GBps     the same for the memcpy
//   threads         threads the kernel used for the call
//   pct_of_memcpy   100 * GBps / memcpy_GBps / threads
//   us_per_call     wall time per call
// Shape: H=8 KV heads, D=Dv=128, bf16 input (write) and bf16 output (gather),
// int8 or fp8 cache. Large cases (T=16384) use sequential slots and a
// shuffled block table, on a pool of 1 or 2 threads, with the AVX2 rows (where
// the CPU has them) or the scalar rows (last argument 1); decode cases (T=1,
// 4, 16, 64) one slot per block, on a pool of 2 (they run on the caller's
// thread alone).
//
//   bazel run -c opt //benchmarks:cpu_kernel_benchmark --
//       --benchmark_repetitions=9 --benchmark_report_aggregates_only=true

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "core/dtype.h"
#include "kernels/cpu_kernels.h"
#include "kernels/float_convert.h"
#include "kernels/kernel_params.h"
#include "kernels/thread_pool.h"

namespace kvcache {
namespace {

constexpr int64_t kHeads = 8;
constexpr int64_t kHeadSize = 128;
constexpr int64_t kBlockSize = 16;
constexpr int64_t kDecodeBlocks = 1024;

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// Bandwidth (bytes read + written) of a one-thread memcpy moving `moved` bytes:
// median of 11 copies of moved / 2 bytes between warm buffers.
double MemcpyGbps(int64_t moved) {
  const size_t n = static_cast<size_t>(std::max<int64_t>(moved / 2, 64));
  std::vector<char> src(n, 1), dst(n, 2);
  std::vector<double> runs;
  for (int i = 0; i < 12; ++i) {
    const Clock::time_point start = Clock::now();
    std::memcpy(dst.data(), src.data(), n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
    if (i > 0) runs.push_back(Seconds(Clock::now() - start));
  }
  std::sort(runs.begin(), runs.end());
  return 2.0 * static_cast<double>(n) / runs[runs.size() / 2] / 1e9;
}

// Threads of a call of `items` rows of `per_item` elements on a pool of
// `threads` (the kernels' rule: below 2^18 elements, the caller's alone).
int64_t ThreadsUsed(int64_t threads, int64_t items, int64_t per_item) {
  return items * per_item < (int64_t{1} << 18) ? 1 : threads;
}

// One layer's caches and a K/V input of T tokens.
struct Setup {
  int64_t tokens = 0;
  CacheLayout layout;
  std::vector<uint16_t> input;  // K [T, H, D] then V.
  std::vector<int64_t> slots;
  std::vector<int32_t> block_table;
  std::vector<uint8_t> key_cache, value_cache;
  std::vector<float> key_scale, value_scale;
  std::vector<uint16_t> output;

  Setup(int64_t t, DType cache_dtype) : tokens(t) {
    const bool decode = t < kBlockSize * 4;
    layout.num_blocks = decode ? kDecodeBlocks : t / kBlockSize;
    layout.block_size = kBlockSize;
    layout.num_heads = kHeads;
    layout.head_size = kHeadSize;
    layout.head_size_v = kHeadSize;
    layout.cache_dtype = cache_dtype;
    const int64_t row = kHeads * kHeadSize;
    std::mt19937_64 rng(42);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    input.resize(static_cast<size_t>(2 * t * row));
    for (uint16_t& x : input) {
      x = internal::PortableFloatToBFloat16(normal(rng));
    }
    for (int64_t i = 0; i < t; ++i) {
      slots.push_back(decode ? i * kBlockSize + 5 : i);
    }
    block_table.resize(static_cast<size_t>(layout.num_blocks));
    std::iota(block_table.begin(), block_table.end(), 0);
    std::shuffle(block_table.begin(), block_table.end(), rng);
    key_cache.assign(static_cast<size_t>(layout.num_slots() * row), 0);
    value_cache.assign(key_cache.size(), 0);
    key_scale.assign(static_cast<size_t>(layout.num_slots() * kHeads), 0.0f);
    value_scale.assign(key_scale.size(), 0.0f);
    output.assign(static_cast<size_t>(2 * t * row), 0);
  }

  LayerCache Cache() {
    LayerCache c;
    c.layout = layout;
    c.key_cache = key_cache.data();
    c.value_cache = value_cache.data();
    c.key_scale = key_scale.data();
    c.value_scale = value_scale.data();
    return c;
  }

  DenseKV Dense(void* base) const {
    const int64_t row = kHeads * kHeadSize;
    DenseKV d;
    d.key = base;
    d.value = static_cast<uint16_t*>(base) + tokens * row;
    d.dtype = DType::kBFloat16;
    d.key_token_stride = d.value_token_stride = row;
    d.key_head_stride = d.value_head_stride = kHeadSize;
    return d;
  }

  QuantizeWriteParams Write() {
    QuantizeWriteParams p;
    p.input = Dense(input.data());
    p.num_tokens = tokens;
    p.slot_mapping = slots.data();
    p.cache = Cache();
    return p;
  }

  GatherParams Gather() {
    GatherParams p;
    p.cache = Cache();
    if (tokens < kBlockSize * 4) {
      p.slots = slots.data();
    } else {
      p.block_table = block_table.data();
      p.block_table_len = static_cast<int64_t>(block_table.size());
    }
    p.num_tokens = tokens;
    p.output = Dense(output.data());
    return p;
  }

  // Elements of K and V in T tokens.
  int64_t Elems() const { return 2 * tokens * kHeads * kHeadSize; }
  int64_t ScaleBytes() const { return 2 * tokens * kHeads * 4; }
};

DType CacheDType(int64_t arg) {
  return arg == 0 ? DType::kInt8 : DType::kFp8E4M3;
}

void Report(benchmark::State& state, int64_t bytes, double seconds,
            int64_t threads) {
  const double calls = static_cast<double>(state.iterations());
  const double gbps = static_cast<double>(bytes) * calls / seconds / 1e9;
  const double copy = MemcpyGbps(bytes);
  state.counters["GBps"] = gbps;
  state.counters["memcpy_GBps"] = copy;
  state.counters["threads"] = static_cast<double>(threads);
  state.counters["pct_of_memcpy"] =
      100.0 * gbps / copy / static_cast<double>(threads);
  state.counters["us_per_call"] = seconds / calls * 1e6;
}

// Args: tokens, cache dtype (0 int8, 1 fp8), pool threads, path (0 AVX2
// where available, 1 scalar).
void BM_Write(benchmark::State& state) {
  Setup s(state.range(0), CacheDType(state.range(1)));
  const QuantizeWriteParams p = s.Write();
  internal::ThreadPool pool(static_cast<int>(state.range(2)));
  internal::ForceScalarCpuRowsForTesting(state.range(3) == 1);
  const Clock::time_point start = Clock::now();
  for (auto _ : state) {
    if (!QuantizeWriteCpu(p, &pool).ok())
      state.SkipWithError("QuantizeWriteCpu");
  }
  const double seconds = Seconds(Clock::now() - start);
  const int64_t bytes = s.Elems() * 3 + s.tokens * 8 + s.ScaleBytes();
  internal::ForceScalarCpuRowsForTesting(false);
  Report(state, bytes, seconds,
         ThreadsUsed(pool.num_threads(), s.tokens * kHeads,
                     s.Elems() / s.tokens / kHeads));
}

void BM_Gather(benchmark::State& state) {
  Setup s(state.range(0), CacheDType(state.range(1)));
  const GatherParams p = s.Gather();
  internal::ThreadPool pool(static_cast<int>(state.range(2)));
  internal::ForceScalarCpuRowsForTesting(state.range(3) == 1);
  const Clock::time_point start = Clock::now();
  for (auto _ : state) {
    if (!GatherCpu(p, &pool).ok()) state.SkipWithError("GatherCpu");
  }
  const double seconds = Seconds(Clock::now() - start);
  const int64_t index_bytes =
      p.slots != nullptr ? s.tokens * 8 : s.tokens / kBlockSize * 4;
  const int64_t bytes = s.Elems() * 3 + index_bytes + s.ScaleBytes();
  internal::ForceScalarCpuRowsForTesting(false);
  Report(state, bytes, seconds,
         ThreadsUsed(pool.num_threads(), s.tokens * kHeads,
                     s.Elems() / s.tokens / kHeads));
}

// Copy-on-write: block copies of `pairs` int8 blocks (data and scales).
void BM_BlockCopy(benchmark::State& state) {
  const int64_t pairs = state.range(0);
  Setup s(2 * pairs * kBlockSize, DType::kInt8);
  std::vector<int64_t> list;
  for (int64_t i = 0; i < pairs; ++i) {
    list.push_back(i);
    list.push_back(pairs + i);
  }
  BlockCopyParams p;
  p.cache = s.Cache();
  p.pairs = list.data();
  p.num_pairs = pairs;
  internal::ThreadPool pool(static_cast<int>(state.range(1)));
  const Clock::time_point start = Clock::now();
  for (auto _ : state) {
    if (!BlockCopyCpu(p, &pool).ok()) state.SkipWithError("BlockCopyCpu");
  }
  const double seconds = Seconds(Clock::now() - start);
  const int64_t block_bytes = 2 * kBlockSize * kHeads * (kHeadSize + 4);
  const int64_t bytes = 2 * pairs * block_bytes + pairs * 16;
  Report(state, bytes, seconds,
         ThreadsUsed(pool.num_threads(), pairs,
                     2 * kBlockSize * kHeads * kHeadSize));
}

void LargeArgs(benchmark::internal::Benchmark* b) {
  for (int64_t threads : {1, 2}) {
    for (int64_t dtype : {0, 1}) b->Args({16384, dtype, threads, 0});
  }
  for (int64_t dtype : {0, 1}) b->Args({16384, dtype, 1, 1});
}
void DecodeArgs(benchmark::internal::Benchmark* b) {
  for (int64_t dtype : {0, 1}) {
    for (int64_t t : {1, 4, 16, 64}) b->Args({t, dtype, 2, 0});
  }
}

BENCHMARK(BM_Write)->Apply(LargeArgs)->UseRealTime()->Unit(
    benchmark::kMillisecond);
BENCHMARK(BM_Gather)->Apply(LargeArgs)->UseRealTime()->Unit(
    benchmark::kMillisecond);
BENCHMARK(BM_BlockCopy)
    ->Args({512, 1})
    ->Args({512, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Write)
    ->Apply(DecodeArgs)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gather)
    ->Apply(DecodeArgs)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvcache

BENCHMARK_MAIN();
