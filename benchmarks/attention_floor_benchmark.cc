// The floor under decode attention's "% of copy" (attention_benchmark.cc,
// issue #20): how fast the device can read the bytes attention must read,
// with no attention at all. First the 1 GiB device-to-device copy (bytes read
// + written), the baseline of every %, then:
//   linear read      1 GiB of contiguous memory, read once (16-byte loads,
//                    grid sweep): the device's read-only bandwidth;
//   paged read       the attention benchmark's caches (8 KV heads, head size
//                    128, blocks of 16 tokens at shuffled ids; int8 with side
//                    scales, or bf16) read through the block table, every
//                    block's K and V (and scales) once, for 64 x 8k, 8 x 64k
//                    and 256 x 1k tokens, over a sweep of thread blocks per
//                    sequence (splits), threads per block, and heads per
//                    thread block (all 8: whole blocks; 4 or 1, as the
//                    attention kernel's blocks read).
// Each configuration is timed as attention is (20 launches back to back,
// median of 7), and its % uses attention's byte count (codes, scales, q, o,
// block tables and lengths; q, o and tables are 0.1 % of it and not read
// here). Every configuration's first launch is checked: the XOR of its
// outputs must equal the XOR of every word of the cache (random bytes).
// fp8 reads the same bytes as int8. The summary gives each case's best
// configuration, overall and for each heads-per-block: where it sits under the bars (80 % at 64 x 8k and
// 8 x 64k, 70 % at 256 x 1k) says how much of a bar the memory system leaves.
//
//   bazel run -c opt //benchmarks:attention_floor_benchmark  (GPU host)

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "benchmarks/bench_util.h"
#include "benchmarks/read_floor.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache {
namespace {

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

using bench::CopyBandwidth;
using bench::DeviceArena;
using bench::Median;
using bench::TimePerCall;

constexpr int kHeads = 8, kD = 128, kBlock = 16, kGroup = 4;

struct Best {
  double pct = 0, us = 0;
  std::string config;
};
std::map<std::string, Best>& Bests() {
  static std::map<std::string, Best> b;
  return b;
}

// Median seconds per launch of `launch` over 7 rounds of 20 launches.
template <class F>
double MedianPerLaunch(cudaStream_t stream, F&& launch) {
  std::vector<double> t;
  for (int r = 0; r < 7; ++r) t.push_back(TimePerCall(stream, 20, launch));
  return Median(t);
}

void BM_LinearRead(benchmark::State& state) {
  const int64_t bytes = int64_t{1} << 30;
  DeviceArena arena;
  void* data = nullptr;
  uint32_t* out = nullptr;
  int sms = 0;
  BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  BENCH_CHECK(arena.Alloc(&data, bytes));
  BENCH_CHECK(arena.Alloc(&out, sizeof(uint32_t) * sms * 64));
  BENCH_CHECK(cudaMemset(data, 1, bytes));
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Best& best = Bests()["linear read 1 GiB"];
  for (auto _ : state) {
    for (int per_sm : {2, 4, 8, 16, 32, 64}) {
      const int grid = sms * per_sm;
      const double t = MedianPerLaunch(stream, [&] {
        (void)bench::LaunchLinearRead(data, bytes, out, grid, stream);
      });
      const double pct = 100.0 * bytes / t / 1e9 / CopyBandwidth();
      if (pct > best.pct) {
        best = {pct, t * 1e6, std::to_string(per_sm) + " blocks/SM"};
      }
    }
    state.SetIterationTime(best.us / 1e6);
  }
  BENCH_CHECK(cudaGetLastError());
  state.counters["pct_of_copy"] = best.pct;
  cudaStreamDestroy(stream);
}

struct Case {
  bool int8;  // else bf16 (no scales)
  int32_t seqs, ctx;
  double bar;
  std::string Name() const {
    return std::string("paged read ") + (int8 ? "int8" : "bf16") + " " +
           std::to_string(seqs) + "x" + std::to_string(ctx / 1024) + "k";
  }
};

void BM_PagedRead(benchmark::State& state, Case c) {
  const int64_t tokens = int64_t{c.seqs} * c.ctx;
  const int32_t blocks_per_seq = c.ctx / kBlock;
  const int64_t num_blocks = tokens / kBlock;
  const int64_t esize = c.int8 ? 1 : 2;
  bench::PagedReadParams p;
  p.block_bytes = int64_t{kBlock} * kHeads * kD * esize;
  p.scale_bytes = c.int8 ? int64_t{kBlock} * kHeads * 4 : 0;
  p.block_size = kBlock;
  p.num_heads = kHeads;
  DeviceArena arena;
  void *k = nullptr, *v = nullptr, *ks = nullptr, *vs = nullptr;
  // Random bytes, and the XOR of all their 32-bit words: every word is read
  // once per launch, so the XOR of a launch's outputs must equal it (the
  // check that the floor reads what it counts).
  std::mt19937_64 rng(1);
  uint32_t expected = 0;
  auto fill = [&](void* dst, int64_t n) {
    std::vector<uint32_t> host(static_cast<size_t>(n / 4));
    for (uint32_t& w : host) {
      w = static_cast<uint32_t>(rng());
      expected ^= w;
    }
    return cudaMemcpy(dst, host.data(), n, cudaMemcpyHostToDevice);
  };
  BENCH_CHECK(arena.Alloc(&k, num_blocks * p.block_bytes));
  BENCH_CHECK(arena.Alloc(&v, num_blocks * p.block_bytes));
  BENCH_CHECK(fill(k, num_blocks * p.block_bytes));
  BENCH_CHECK(fill(v, num_blocks * p.block_bytes));
  if (c.int8) {
    BENCH_CHECK(arena.Alloc(&ks, num_blocks * p.scale_bytes));
    BENCH_CHECK(arena.Alloc(&vs, num_blocks * p.scale_bytes));
    BENCH_CHECK(fill(ks, num_blocks * p.scale_bytes));
    BENCH_CHECK(fill(vs, num_blocks * p.scale_bytes));
  }
  std::vector<int32_t> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  int32_t* dtable = nullptr;
  uint32_t* out = nullptr;
  BENCH_CHECK(arena.Alloc(&dtable, table.size() * sizeof(int32_t)));
  BENCH_CHECK(cudaMemcpy(dtable, table.data(), table.size() * sizeof(int32_t),
                         cudaMemcpyHostToDevice));
  BENCH_CHECK(arena.Alloc(&out, sizeof(uint32_t) * c.seqs * 1024 * 8));
  p.key = k;
  p.value = v;
  p.key_scale = ks;
  p.value_scale = vs;
  p.block_table = dtable;
  p.num_seqs = c.seqs;
  p.blocks_per_seq = blocks_per_seq;
  p.out = out;
  // Attention's byte count (attention_benchmark.cc).
  const double q_elems = static_cast<double>(c.seqs) * kHeads * kGroup * kD;
  const double bytes = 2.0 * tokens * kHeads * kD * esize +
                       (c.int8 ? 2.0 * tokens * kHeads * 4 : 0) +
                       2.0 * q_elems * 2 + num_blocks * 4.0 + c.seqs * 8.0;
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Head groups: 1 = a thread block reads whole blocks (one contiguous run
  // each), 2 = 4 heads of each token row (the attention kernel's 4-head
  // blocks), 8 = one head (its 1-head blocks).
  Best& best = Bests()[c.Name()];
  for (auto _ : state) {
    for (int groups : {1, 2, 8}) {
      Best& by_groups =
          Bests()[c.Name() + " (" + std::to_string(kHeads / groups) +
                  " heads a block)"];
      p.head_groups = groups;
      for (int threads : {128, 256, 512}) {
        for (int splits = 1; splits <= std::min(blocks_per_seq, 1024);
             splits *= 2) {
          if (int64_t{splits} * c.seqs * groups > 65536) break;
          p.num_splits = splits;
          const int rc = bench::LaunchPagedRead(p, threads, stream);
          if (rc == -1) break;  // No such kernel for this shape.
          if (rc != 0) {
            state.SkipWithError(
                ("LaunchPagedRead: CUDA error " + std::to_string(rc)).c_str());
            return;
          }
          // The first launch's outputs, checked (the stream is non-blocking:
          // a plain cudaMemcpy would not wait for the launch).
          const size_t words = static_cast<size_t>(c.seqs) * groups * splits;
          std::vector<uint32_t> got(words);
          BENCH_CHECK(cudaStreamSynchronize(stream));
          BENCH_CHECK(
              cudaMemcpy(got.data(), out, words * 4, cudaMemcpyDeviceToHost));
          uint32_t all = 0;
          for (uint32_t w : got) all ^= w;
          if (all != expected) {
            state.SkipWithError(("paged read missed bytes at " +
                                 std::to_string(splits) + " splits, " +
                                 std::to_string(threads) + " threads, " +
                                 std::to_string(groups) + " head groups")
                                    .c_str());
            return;
          }
          const double t = MedianPerLaunch(stream, [&] {
            (void)bench::LaunchPagedRead(p, threads, stream);
          });
          const double pct = 100.0 * bytes / t / 1e9 / CopyBandwidth();
          const std::string config = std::to_string(splits) + " splits x " +
                                     std::to_string(threads) + " threads x " +
                                     std::to_string(groups) + " head groups";
          if (pct > by_groups.pct) by_groups = {pct, t * 1e6, config};
          if (pct > best.pct) best = {pct, t * 1e6, config};
        }
      }
    }
    state.SetIterationTime(best.us / 1e6);
  }
  BENCH_CHECK(cudaGetLastError());
  state.counters["pct_of_copy"] = best.pct;
  state.counters["bar"] = c.bar;
  cudaStreamDestroy(stream);
}

void RegisterAll() {
  benchmark::RegisterBenchmark("device_copy_1GiB", bench::BM_DeviceCopy)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->Iterations(10);
  benchmark::RegisterBenchmark("linear read 1 GiB", BM_LinearRead)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->Iterations(1);
  for (bool int8 : {true, false}) {
    for (Case c : {Case{int8, 64, 8192, 80}, Case{int8, 8, 65536, 80},
                   Case{int8, 256, 1024, 70}}) {
      benchmark::RegisterBenchmark(c.Name().c_str(), BM_PagedRead, c)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->Iterations(1);
    }
  }
}

void PrintSummary() {
  std::printf("\n%-28s %9s %10s  %s\n", "case (best configuration)", "%copy",
              "us/launch", "configuration");
  std::printf("%-28s %9.1f %10s  %.1f GB/s (bytes read + written)\n",
              "device copy 1 GiB", 100.0, "", CopyBandwidth());
  for (const auto& [name, b] : Bests()) {
    std::printf("%-28s %9.1f %10.1f  %s\n", name.c_str(), b.pct, b.us,
                b.config.c_str());
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
