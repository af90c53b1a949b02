// Tuning experiment (not a benchmark of record): times launch variants of the
// quantize-write and gather kernels against the previous kernels (v0, kept in
// this folder), a kernel with the same access pattern and no arithmetic, and
// cudaMemcpy of the same bytes, on one GPU, and checks that every variant
// writes the same bytes as v0. Results go to benchmarks/results/NOTES.md.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "benchmarks/experiments/gather_v0.cuh"
#include "benchmarks/experiments/quantize_write_v0.cuh"
#include "kernels/gather.cuh"
#include "kernels/quantize_write.cuh"

namespace kvcache::experiments {
namespace {

using internal::BFloat16Type;
using internal::Fp8E4M3Type;
using internal::Int8Type;

#define X_CHECK(call)                                          \
  do {                                                         \
    cudaError_t e_ = (call);                                   \
    if (e_ != cudaSuccess) {                                   \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, \
                  cudaGetErrorString(e_));                     \
      std::exit(1);                                            \
    }                                                          \
  } while (0)

int g_sms = 0;
double g_copy_gbps = 0;

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void* Alloc(size_t bytes) {
  void* p = nullptr;
  X_CHECK(cudaMalloc(&p, bytes));
  return p;
}

// Fills with Gaussian bf16 values: an 8 MiB random pattern (per seed), tiled.
void FillRandomBf16(void* dst, size_t bytes, uint64_t seed) {
  constexpr size_t kPattern = size_t{8} << 20;
  std::vector<uint16_t> h(kPattern / 2);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0, 1);
  for (auto& x : h) x = internal::PortableFloatToBFloat16(n(rng));
  for (size_t off = 0; off < bytes; off += kPattern) {
    X_CHECK(cudaMemcpy(static_cast<char*>(dst) + off, h.data(),
                       std::min(kPattern, bytes - off),
                       cudaMemcpyHostToDevice));
  }
}

// Median microseconds per launch of `launch(set)` over `sets` launches a rep.
float TimeLaunches(const std::function<void(int)>& launch, int sets, int reps,
                   cudaStream_t s) {
  cudaEvent_t a, b;
  X_CHECK(cudaEventCreate(&a));
  X_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < sets; ++i) launch(i);
  X_CHECK(cudaStreamSynchronize(s));
  std::vector<float> us;
  for (int r = 0; r < reps; ++r) {
    X_CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < sets; ++i) launch(i);
    X_CHECK(cudaEventRecord(b, s));
    X_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    X_CHECK(cudaEventElapsedTime(&ms, a, b));
    us.push_back(ms * 1000 / sets);
  }
  X_CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(us);
}

// Same, as graph replays of 100 launches.
float TimeGraph(const std::function<void(int)>& launch, int sets, int reps,
                cudaStream_t s) {
  cudaGraph_t g;
  cudaGraphExec_t exec;
  X_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < 100; ++i) launch(i % sets);
  X_CHECK(cudaStreamEndCapture(s, &g));
  X_CHECK(cudaGraphInstantiate(&exec, g, 0));
  const float us =
      TimeLaunches([&](int) { X_CHECK(cudaGraphLaunch(exec, s)); }, 1, reps, s);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
  return us / 100;
}

void Row(const std::string& name, double bytes, float us) {
  const double gbps = bytes / (us * 1e-6) / 1e9;
  std::printf("%-58s %9.3f us %8.1f GB/s %6.1f %%\n", name.c_str(), us, gbps,
              100 * gbps / g_copy_gbps);
}

template <class... P, class... A>
void Launch(void (*k)(P...), int64_t blocks, int threads, bool pdl,
            cudaStream_t s, const A&... args) {
  const absl::Status st =
      internal::LaunchKernel(k, blocks, threads, pdl, s, args...);
  if (!st.ok()) {
    std::printf("launch: %s\n", st.ToString().c_str());
    std::exit(1);
  }
}

// Blocks of `kernel` the device holds at once.
int64_t Resident(const void* kernel, int threads) {
  int occ = 0;
  X_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, 0));
  return int64_t{occ} * g_sms;
}

// Reads each row like the write kernel and writes 8 bytes per vector and the
// scales, without the arithmetic: the access pattern's own speed.
__global__ void __launch_bounds__(128)
    PatternKernel(const QuantizeWriteParams p) {
  const CacheLayout& layout = p.cache.layout;
  const int64_t rows = p.num_tokens * layout.num_heads;
  const int lane = threadIdx.x % 16;
  for (int64_t row = blockIdx.x * 8 + threadIdx.x / 16; row < rows;
       row += int64_t{gridDim.x} * 8) {
    const int64_t t = row / 8, h = row % 8;  // H = 8 only.
    const int64_t slot = __ldg(p.slot_mapping + t);
    const uint4 k = __ldg(reinterpret_cast<const uint4*>(
                              static_cast<const uint16_t*>(p.input.key) +
                              t * p.input.key_token_stride + h * 128) +
                          lane);
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(
                              static_cast<const uint16_t*>(p.input.value) +
                              t * p.input.value_token_stride + h * 128) +
                          lane);
    reinterpret_cast<uint2*>(static_cast<int8_t*>(p.cache.key_cache) +
                             layout.key_offset(slot, h))[lane] =
        make_uint2(k.x ^ k.y, k.z ^ k.w);
    reinterpret_cast<uint2*>(static_cast<int8_t*>(p.cache.value_cache) +
                             layout.value_offset(slot, h))[lane] =
        make_uint2(v.x ^ v.y, v.z ^ v.w);
    if (lane < 2) {
      (lane == 0 ? p.cache.key_scale
                 : p.cache.value_scale)[layout.scale_offset(slot, h)] =
          __uint_as_float(k.x);
    }
  }
}

__global__ void EmptyKernel() {
  internal::WaitForPriorGrids();
  internal::AllowDependentGrids();
}

struct WriteSetup {
  int64_t T, H, D;
  bool scattered;
  int sets;
  std::vector<QuantizeWriteParams> params;
  double bytes;
};

// Scattered: one random block per token out of region * T blocks (in
// ascending block order when `sorted`); otherwise consecutive slots.
// Inline scales: rows of codes, scale and padding (core/cache_layout.h).
WriteSetup MakeWrite(int64_t T, int64_t H, int64_t D, bool scattered,
                     DType cache_dtype, int max_sets, int region = 2,
                     bool sorted = false,
                     ScalePlacement placement = ScalePlacement::kSide) {
  WriteSetup w{T, H, D, scattered, 0, {}, 0};
  const size_t in_bytes = T * H * D * 2;
  w.sets = static_cast<int>(
      std::clamp<double>(std::ceil((1 << 30) / (2.0 * in_bytes)), 2, max_sets));
  CacheLayout layout;
  layout.block_size = 16;
  layout.num_heads = H;
  layout.head_size = D;
  layout.head_size_v = D;
  layout.cache_dtype = cache_dtype;
  layout.num_blocks = scattered ? T * region : (T + 15) / 16;
  layout.scale_placement = placement;
  LayerCache cache;
  cache.layout = layout;
  cache.key_cache = Alloc(layout.num_blocks * layout.key_block_elems());
  cache.value_cache = Alloc(layout.num_blocks * layout.key_block_elems());
  if (layout.inline_scales()) {
    cache.key_scale = InlineScale(layout, cache.key_cache);
    cache.value_scale = InlineScale(layout, cache.value_cache);
  } else {
    cache.key_scale =
        static_cast<float*>(Alloc(layout.num_slots() * H * sizeof(float)));
    cache.value_scale =
        static_cast<float*>(Alloc(layout.num_slots() * H * sizeof(float)));
  }
  std::mt19937_64 rng(7);
  for (int s = 0; s < w.sets; ++s) {
    std::vector<int64_t> slots(T), blocks(layout.num_blocks);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    if (sorted) std::sort(blocks.begin(), blocks.begin() + T);
    for (int64_t t = 0; t < T; ++t)
      slots[t] = scattered ? blocks[t] * 16 + t % 16 : t;
    QuantizeWriteParams p;
    void* k = Alloc(in_bytes);
    void* v = Alloc(in_bytes);
    void* sl = Alloc(T * 8);
    FillRandomBf16(k, in_bytes, 11 + s);
    FillRandomBf16(v, in_bytes, 101 + s);
    X_CHECK(cudaMemcpy(sl, slots.data(), T * 8, cudaMemcpyHostToDevice));
    p.input = {k, v, DType::kBFloat16, H * D, D, H * D, D};
    p.num_tokens = T;
    p.slot_mapping = static_cast<const int64_t*>(sl);
    p.cache = cache;
    w.params.push_back(p);
  }
  w.bytes = 2.0 * T * H * D * 3 + T * 8.0 + 2.0 * T * H * 4;
  return w;
}

std::vector<uint8_t> Snapshot(const QuantizeWriteParams& p) {
  X_CHECK(cudaDeviceSynchronize());
  const CacheLayout& l = p.cache.layout;
  const size_t c = l.num_blocks * l.key_block_elems();
  const size_t sc = l.inline_scales() ? 0 : l.num_slots() * l.num_heads * 4;
  std::vector<uint8_t> out(2 * c + 2 * sc);
  X_CHECK(cudaMemcpy(out.data(), p.cache.key_cache, c, cudaMemcpyDeviceToHost));
  X_CHECK(cudaMemcpy(out.data() + c, p.cache.value_cache, c,
                     cudaMemcpyDeviceToHost));
  X_CHECK(cudaMemcpy(out.data() + 2 * c, p.cache.key_scale, sc,
                     cudaMemcpyDeviceToHost));
  X_CHECK(cudaMemcpy(out.data() + 2 * c + sc, p.cache.value_scale, sc,
                     cudaMemcpyDeviceToHost));
  return out;
}

void Clear(const QuantizeWriteParams& p) {
  const CacheLayout& l = p.cache.layout;
  const size_t c = l.num_blocks * l.key_block_elems();
  const size_t sc = l.num_slots() * l.num_heads * 4;
  X_CHECK(cudaMemset(p.cache.key_cache, 0xAB, c));
  X_CHECK(cudaMemset(p.cache.value_cache, 0xAB, c));
  if (!l.inline_scales()) {  // Inline scales are in the rows cleared above.
    X_CHECK(cudaMemset(p.cache.key_scale, 0xAB, sc));
    X_CHECK(cudaMemset(p.cache.value_scale, 0xAB, sc));
  }
  X_CHECK(cudaDeviceSynchronize());
}

// The write kernel, checked byte for byte against v0's output `ref`, on the
// production grid (two rows per group plus 1/32; one row per group when that
// fits one wave) and on one row per group.
template <class Cache, int kGroup>
void WriteProduction(WriteSetup& w, const std::string& tag, bool decode,
                     const std::vector<uint8_t>& ref, cudaStream_t s) {
  internal::RowDividers d;
  d.heads = internal::FastDivmod::Make(w.H);
  d.block_size = internal::FastDivmod::Make(16);
  auto k = &internal::QuantizeWriteVecKernel<BFloat16Type, Cache, kGroup, 1,
                                             128, false>;
  const int64_t per_block = 128 / kGroup;
  const int64_t exact = (w.T * w.H + per_block - 1) / per_block;
  const int64_t r2 = (exact + 1) / 2;
  const int64_t production = exact <= int64_t{g_sms} * 8 ? exact : r2 + r2 / 32;
  Clear(w.params[0]);
  Launch(k, production, 128, true, s, w.params[0], d);
  const std::string name = tag + " v3";
  std::printf(
      "%s: %s v0\n", name.c_str(),
      Snapshot(w.params[0]) == ref ? "bit-identical to" : "DIFFERS FROM");
  auto time = [&](int64_t blocks) {
    auto f = [&](int i) { Launch(k, blocks, 128, true, s, w.params[i], d); };
    return decode ? TimeGraph(f, w.sets, 30, s)
                  : TimeLaunches(f, w.sets, 30, s);
  };
  Row(name + " production pdl", w.bytes, time(production));
  if (!decode) Row(name + " exact pdl", w.bytes, time(exact));
}

template <class Cache, int kGroup>
void WriteAll(WriteSetup& w, const std::string& tag, bool decode,
              cudaStream_t s) {
  const int64_t rows = w.T * w.H;
  auto v0 = &v0::QuantizeWriteVecKernel<BFloat16Type, Cache, kGroup, 1>;
  const int64_t v0_blocks = std::min<int64_t>(
      (rows + 128 / kGroup - 1) / (128 / kGroup), int64_t{g_sms} * 64);
  Clear(w.params[0]);
  v0<<<v0_blocks, 128, 0, s>>>(w.params[0]);
  const auto ref = Snapshot(w.params[0]);
  auto f = [&](int i) { v0<<<v0_blocks, 128, 0, s>>>(w.params[i]); };
  Row(tag + " v0", w.bytes,
      decode ? TimeGraph(f, w.sets, 30, s) : TimeLaunches(f, w.sets, 30, s));
  WriteProduction<Cache, kGroup>(w, tag, decode, ref, s);
}

void PatternAndMemcpy(WriteSetup& w, const std::string& tag, cudaStream_t s) {
  const int64_t rows = w.T * w.H;
  const int64_t blocks = std::min<int64_t>((rows + 7) / 8, int64_t{g_sms} * 64);
  Row(tag + " access pattern only", w.bytes,
      TimeLaunches(
          [&](int i) { PatternKernel<<<blocks, 128, 0, s>>>(w.params[i]); },
          w.sets, 30, s));
  static void* src = Alloc(size_t{1} << 30);
  static void* dst = Alloc(size_t{1} << 30);
  const size_t half = static_cast<size_t>(w.bytes / 2);
  Row(tag + " cudaMemcpy same bytes", w.bytes,
      TimeLaunches(
          [&](int i) {
            X_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + (i % 4) * half,
                                    static_cast<char*>(src) + (i % 4) * half,
                                    half, cudaMemcpyDeviceToDevice, s));
          },
          8, 30, s));
}

struct GatherSetup {
  int sets;
  std::vector<GatherParams> ps;
  double bytes;
  size_t out_bytes;
};

// Gather of T tokens (H = 8, D = 128, block size 16) through block tables of
// random blocks, one table per rotating set.
GatherSetup MakeGather(int64_t T, DType cache_dtype,
                       ScalePlacement placement = ScalePlacement::kSide) {
  const int64_t H = 8, D = 128, bs = 16;
  const size_t out_bytes = T * H * D * 2;
  const int sets = static_cast<int>(
      std::clamp<double>(std::ceil((1 << 30) / (2.0 * out_bytes)), 2, 32));
  const int64_t per_set = (T + bs - 1) / bs;
  CacheLayout layout;
  layout.block_size = bs;
  layout.num_heads = H;
  layout.head_size = D;
  layout.head_size_v = D;
  layout.cache_dtype = cache_dtype;
  layout.num_blocks = per_set * sets;
  layout.scale_placement = placement;
  LayerCache cache;
  cache.layout = layout;
  const size_t cb = layout.num_blocks * layout.key_block_elems();
  const size_t sb = layout.num_slots() * H * 4;
  cache.key_cache = Alloc(cb);
  cache.value_cache = Alloc(cb);
  FillRandomBf16(cache.key_cache, cb, 3);
  FillRandomBf16(cache.value_cache, cb, 4);
  std::vector<float> sc(sb / 4);
  {
    std::mt19937 rng(5);
    for (auto& x : sc) x = 1e-3f * (1 + rng() % 1000);
  }
  if (layout.inline_scales()) {
    // The scales into their rows: one 4-byte column of pitch-byte rows.
    cache.key_scale = InlineScale(layout, cache.key_cache);
    cache.value_scale = InlineScale(layout, cache.value_cache);
    const size_t pitch = layout.key_row_pitch();
    for (float* dst : {cache.key_scale, cache.value_scale}) {
      X_CHECK(cudaMemcpy2D(dst, pitch, sc.data(), 4, 4, sc.size(),
                           cudaMemcpyHostToDevice));
    }
  } else {
    cache.key_scale = static_cast<float*>(Alloc(sb));
    cache.value_scale = static_cast<float*>(Alloc(sb));
    X_CHECK(cudaMemcpy(cache.key_scale, sc.data(), sb, cudaMemcpyHostToDevice));
    X_CHECK(
        cudaMemcpy(cache.value_scale, sc.data(), sb, cudaMemcpyHostToDevice));
  }
  std::vector<int32_t> all(layout.num_blocks);
  std::iota(all.begin(), all.end(), 0);
  std::mt19937_64 rng(9);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<GatherParams> ps(sets);
  for (int i = 0; i < sets; ++i) {
    void* table = Alloc(per_set * 4);
    X_CHECK(cudaMemcpy(table, all.data() + i * per_set, per_set * 4,
                       cudaMemcpyHostToDevice));
    ps[i].cache = cache;
    ps[i].block_table = static_cast<const int32_t*>(table);
    ps[i].block_table_len = per_set;
    ps[i].num_tokens = T;
    ps[i].output = {Alloc(out_bytes),
                    Alloc(out_bytes),
                    DType::kBFloat16,
                    H * D,
                    D,
                    H * D,
                    D};
  }
  const double bytes = 2.0 * T * H * D * 3 + per_set * 4.0 + 2.0 * T * H * 4;
  return GatherSetup{sets, ps, bytes, out_bytes};
}

// The gather kernel's arithmetic with the index math of the pattern kernel:
// H = 8, D = 128, block size 16, dense outputs and a block table, all fixed at
// compile time (32-bit row math). Shows what the generic index math costs.
template <class Cache>
__global__ void __launch_bounds__(128) GatherFixedKernel(const GatherParams p) {
  using CacheVec = internal::Vec<typename Cache::T, 8>;
  using OutVec = internal::Vec<uint16_t, 8>;
  internal::WaitForPriorGrids();
  internal::AllowDependentGrids();
  const uint32_t rows = static_cast<uint32_t>(p.num_tokens) * 8;
  const int lane = threadIdx.x % 16;
  OutVec* key = static_cast<OutVec*>(p.output.key);
  OutVec* value = static_cast<OutVec*>(p.output.value);
  const CacheVec* kc = static_cast<const CacheVec*>(p.cache.key_cache);
  const CacheVec* vc = static_cast<const CacheVec*>(p.cache.value_cache);
  for (uint32_t row = blockIdx.x * 8 + threadIdx.x / 16; row < rows;
       row += gridDim.x * 8) {
    const uint32_t t = row / 8, h = row % 8;
    const int32_t block = __ldg(p.block_table + t / 16);
    const bool valid = block >= 0;
    const uint32_t slot = (valid ? block : 0) * 16u + t % 16;
    const uint32_t srow = slot * 8 + h;  // Scale index; codes at srow * 128.
    const CacheVec k = internal::LoadVec(kc + srow * 16 + lane);
    const CacheVec v = internal::LoadVec(vc + srow * 16 + lane);
    const float ks = __ldg(p.cache.key_scale + srow);
    const float vs = __ldg(p.cache.value_scale + srow);
    bool fast = false;
    if constexpr (std::is_same_v<Cache, Int8Type>) {
      fast = valid && internal::AbsBits(ks) < 0x7F800000u &&
             internal::AbsBits(vs) < 0x7F800000u;
    }
    key[row * 16 + lane] =
        internal::ConvertVec<Cache, BFloat16Type, CacheVec, OutVec>(
            k, ks, valid, fast);
    value[row * 16 + lane] =
        internal::ConvertVec<Cache, BFloat16Type, CacheVec, OutVec>(
            v, vs, valid, fast);
  }
}

// The production gather kernel (one row per group of 16 lanes, block table,
// runtime layout and strides) with every index in 32 bits: valid when the
// cache, the outputs and the rows each have fewer than 2^31 elements.
template <class Cache>
__global__ void __launch_bounds__(128)
    GatherIndex32Kernel(const GatherParams p, const internal::RowDividers d) {
  using CacheVec = internal::Vec<typename Cache::T, 8>;
  using OutVec = internal::Vec<uint16_t, 8>;
  internal::WaitForPriorGrids();
  internal::AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const uint32_t H = static_cast<uint32_t>(layout.num_heads);
  const uint32_t kvecs = static_cast<uint32_t>(layout.head_size / 8);
  const uint32_t vvecs = static_cast<uint32_t>(layout.head_size_v / 8);
  const uint32_t bs = static_cast<uint32_t>(layout.block_size);
  const int32_t num_blocks = static_cast<int32_t>(layout.num_blocks);
  const uint32_t rows = static_cast<uint32_t>(p.num_tokens) * H;
  const uint32_t begin = static_cast<uint32_t>(p.token_begin);
  const uint32_t kts = static_cast<uint32_t>(p.output.key_token_stride / 8);
  const uint32_t khs = static_cast<uint32_t>(p.output.key_head_stride / 8);
  const uint32_t vts = static_cast<uint32_t>(p.output.value_token_stride / 8);
  const uint32_t vhs = static_cast<uint32_t>(p.output.value_head_stride / 8);
  const uint32_t lane = threadIdx.x % 16;
  OutVec* key = static_cast<OutVec*>(p.output.key);
  OutVec* value = static_cast<OutVec*>(p.output.value);
  const CacheVec* kc = static_cast<const CacheVec*>(p.cache.key_cache);
  const CacheVec* vc = static_cast<const CacheVec*>(p.cache.value_cache);
  for (uint32_t row = blockIdx.x * 8 + threadIdx.x / 16; row < rows;
       row += gridDim.x * 8) {
    uint32_t t, h, bi, off;
    d.heads.Divmod(row, &t, &h);
    d.block_size.Divmod(begin + t, &bi, &off);
    const int32_t block = __ldg(p.block_table + bi);
    const bool valid = block >= 0 && block < num_blocks;
    const uint32_t srow = ((valid ? block : 0) * bs + off) * H + h;
    CacheVec k, v;
    if (lane < kvecs) k = internal::LoadVec(kc + srow * kvecs + lane);
    if (lane < vvecs) v = internal::LoadVec(vc + srow * vvecs + lane);
    const float ks = __ldg(p.cache.key_scale + srow);
    const float vs = __ldg(p.cache.value_scale + srow);
    bool fast = false;
    if constexpr (std::is_same_v<Cache, Int8Type>) {
      fast = valid && internal::AbsBits(ks) < 0x7F800000u &&
             internal::AbsBits(vs) < 0x7F800000u;
    }
    if (lane < kvecs) {
      key[t * kts + h * khs + lane] =
          internal::ConvertVec<Cache, BFloat16Type, CacheVec, OutVec>(
              k, ks, valid, fast);
    }
    if (lane < vvecs) {
      value[t * vts + h * vhs + lane] =
          internal::ConvertVec<Cache, BFloat16Type, CacheVec, OutVec>(
              v, vs, valid, fast);
    }
  }
}

// The K output of set 0 after `launch()` (into a poisoned buffer).
std::vector<uint8_t> GatherKeyOutput(const GatherSetup& g,
                                     const std::function<void()>& launch) {
  std::vector<uint8_t> out(g.out_bytes);
  X_CHECK(cudaMemset(g.ps[0].output.key, 0xAB, g.out_bytes));
  X_CHECK(cudaDeviceSynchronize());
  launch();
  X_CHECK(cudaDeviceSynchronize());
  X_CHECK(cudaMemcpy(out.data(), g.ps[0].output.key, g.out_bytes,
                     cudaMemcpyDeviceToHost));
  return out;
}

// The gather kernel on grids of resident blocks (production), one row per group
// and two rows per group, checked byte for byte against v0.
template <class Cache>
void GatherProduction(GatherSetup& g, int64_t T, const std::string& tag,
                      const std::vector<uint8_t>& ref, cudaStream_t s) {
  internal::RowDividers d;
  d.heads = internal::FastDivmod::Make(8);
  d.block_size = internal::FastDivmod::Make(16);
  auto k = &internal::GatherVecKernel<Cache, BFloat16Type, 16, 1, 128, false>;
  const int64_t exact = (T * 8 + 7) / 8;
  const int64_t resident =
      std::min<int64_t>(exact, Resident(reinterpret_cast<const void*>(k), 128));
  auto report = [&](const std::string& name,
                    const std::function<void()>& launch) {
    std::printf("%s: %s v0\n", name.c_str(),
                GatherKeyOutput(g, launch) == ref ? "bit-identical to"
                                                  : "DIFFERS FROM");
  };
  const std::string name = tag + " v3";
  report(name, [&] { Launch(k, resident, 128, true, s, g.ps[0], d); });
  struct G {
    const char* name;
    int64_t blocks;
  } grids[] = {
      {"resident", resident}, {"exact", exact}, {"r2", (exact + 1) / 2}};
  for (const G& grid : grids) {
    Row(name + " " + grid.name + " pdl", g.bytes,
        TimeLaunches(
            [&](int i) { Launch(k, grid.blocks, 128, true, s, g.ps[i], d); },
            g.sets, 30, s));
  }
  auto fk = &GatherFixedKernel<Cache>;
  const int64_t fixed_resident = std::min<int64_t>(
      exact, Resident(reinterpret_cast<const void*>(fk), 128));
  report(tag + " fixed",
         [&] { Launch(fk, fixed_resident, 128, true, s, g.ps[0]); });
  auto ik = &GatherIndex32Kernel<Cache>;
  const int64_t i32_resident = std::min<int64_t>(
      exact, Resident(reinterpret_cast<const void*>(ik), 128));
  report(tag + " index32",
         [&] { Launch(ik, i32_resident, 128, true, s, g.ps[0], d); });
  for (int64_t blocks : {i32_resident, exact}) {
    Row(tag + " index32 " + (blocks == exact ? "exact" : "resident") + " pdl",
        g.bytes,
        TimeLaunches(
            [&](int i) { Launch(ik, blocks, 128, true, s, g.ps[i], d); },
            g.sets, 30, s));
  }
  for (int64_t blocks : {fixed_resident, exact}) {
    Row(tag + " fixed index math " + (blocks == exact ? "exact" : "resident") +
            " pdl",
        g.bytes,
        TimeLaunches([&](int i) { Launch(fk, blocks, 128, true, s, g.ps[i]); },
                     g.sets, 30, s));
  }
}

template <class Cache>
void GatherVariants(int64_t T, const std::string& tag, cudaStream_t s) {
  GatherSetup g = MakeGather(T, Cache::kDType);
  const int64_t rows = T * 8;
  auto v0 = &v0::GatherVecKernel<Cache, BFloat16Type, 16, 1>;
  const int64_t v0_blocks =
      std::min<int64_t>((rows + 7) / 8, int64_t{g_sms} * 64);
  const std::vector<uint8_t> ref =
      GatherKeyOutput(g, [&] { v0<<<v0_blocks, 128, 0, s>>>(g.ps[0]); });
  Row(tag + " v0", g.bytes,
      TimeLaunches([&](int i) { v0<<<v0_blocks, 128, 0, s>>>(g.ps[i]); },
                   g.sets, 30, s));
  GatherProduction<Cache>(g, T, tag, ref, s);
}

// ---- Floors: what the memory system gives each access pattern. ----

// Copies n 16-byte vectors; each thread loads kUnroll vectors before storing.
template <int kUnroll>
__global__ void __launch_bounds__(128)
    CopyKernel(const uint4* __restrict__ src, uint4* __restrict__ dst,
               int64_t n) {
  internal::WaitForPriorGrids();
  internal::AllowDependentGrids();
  const int64_t stride = int64_t{gridDim.x} * 128 * kUnroll;
  for (int64_t base = int64_t{blockIdx.x} * 128 * kUnroll + threadIdx.x;
       base < n; base += stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * 128 < n) v[u] = __ldg(src + base + u * 128);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * 128 < n) dst[base + u * 128] = v[u];
    }
  }
}

// The write kernel's loads and stores (group of kGroup lanes per row of
// D = 8 * kGroup bf16 elements, 8 code bytes per lane, scales by lanes 0/1)
// with no arithmetic. A block takes tiles of kRows * (128 / kGroup) rows and a
// group loads its kRows rows of the tile before storing any.
template <int kGroup, int kRows, bool kScales = true>
__global__ void __launch_bounds__(128)
    WritePatternKernel(const QuantizeWriteParams p) {
  internal::WaitForPriorGrids();
  internal::AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int64_t H = layout.num_heads, D = layout.head_size;
  const int64_t rows = p.num_tokens * H;
  const int lane = threadIdx.x % kGroup;
  constexpr int kPerBlock = 128 / kGroup;
  constexpr int64_t kTile = int64_t{kPerBlock} * kRows;
  for (int64_t tile = blockIdx.x; tile * kTile < rows; tile += gridDim.x) {
    uint4 k[kRows], v[kRows];
    int64_t slot[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row =
          min(tile * kTile + r * kPerBlock + threadIdx.x / kGroup, rows - 1);
      const int64_t t = row / H, h = row % H;
      slot[r] = __ldg(p.slot_mapping + t);
      k[r] = __ldg(reinterpret_cast<const uint4*>(
                       static_cast<const uint16_t*>(p.input.key) +
                       t * p.input.key_token_stride + h * D) +
                   lane);
      v[r] = __ldg(reinterpret_cast<const uint4*>(
                       static_cast<const uint16_t*>(p.input.value) +
                       t * p.input.value_token_stride + h * D) +
                   lane);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = tile * kTile + r * kPerBlock + threadIdx.x / kGroup;
      if (row >= rows) break;
      const int64_t h = row % H;
      reinterpret_cast<uint2*>(static_cast<int8_t*>(p.cache.key_cache) +
                               layout.key_offset(slot[r], h))[lane] =
          make_uint2(k[r].x ^ k[r].y, k[r].z ^ k[r].w);
      reinterpret_cast<uint2*>(static_cast<int8_t*>(p.cache.value_cache) +
                               layout.value_offset(slot[r], h))[lane] =
          make_uint2(v[r].x ^ v[r].y, v[r].z ^ v[r].w);
      if (kScales && lane < 2) {
        float* scale = (lane == 0 ? p.cache.key_scale : p.cache.value_scale) +
                       layout.scale_offset(slot[r], h);
        const float x = __uint_as_float(k[r].x);
        if (layout.inline_scales()) {
          // With the row's padding, as the write kernel stores it.
          internal::StoreInlineScale(reinterpret_cast<char*>(scale), x,
                                     layout.scale_pad_bytes());
        } else {
          *scale = x;
        }
      }
    }
  }
}

// The gather kernel's loads and stores (H = 8, D = 128, block size 16: 8 code
// bytes in, 16 bytes out per lane, one scale per row) with no arithmetic,
// kRows rows per group loaded before any is stored (tiles as above).
template <int kRows>
__global__ void __launch_bounds__(128)
    GatherPatternKernel(const GatherParams p) {
  internal::WaitForPriorGrids();
  internal::AllowDependentGrids();
  const CacheLayout& layout = p.cache.layout;
  const int64_t rows = p.num_tokens * 8;
  const int lane = threadIdx.x % 16;
  uint16_t* key = static_cast<uint16_t*>(p.output.key);
  uint16_t* value = static_cast<uint16_t*>(p.output.value);
  constexpr int64_t kTile = int64_t{8} * kRows;
  for (int64_t tile = blockIdx.x; tile * kTile < rows; tile += gridDim.x) {
    uint2 k[kRows], v[kRows];
    uint32_t ks[kRows], vs[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row =
          min(tile * kTile + r * 8 + threadIdx.x / 16, rows - 1);
      const int64_t t = row / 8, h = row % 8;
      const int64_t slot = int64_t{__ldg(p.block_table + t / 16)} * 16 + t % 16;
      k[r] = __ldg(reinterpret_cast<const uint2*>(
                       static_cast<const int8_t*>(p.cache.key_cache) +
                       layout.key_offset(slot, h)) +
                   lane);
      v[r] = __ldg(reinterpret_cast<const uint2*>(
                       static_cast<const int8_t*>(p.cache.value_cache) +
                       layout.value_offset(slot, h)) +
                   lane);
      ks[r] = __float_as_uint(
          __ldg(p.cache.key_scale + layout.scale_offset(slot, h)));
      vs[r] = __float_as_uint(
          __ldg(p.cache.value_scale + layout.scale_offset(slot, h)));
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = tile * kTile + r * 8 + threadIdx.x / 16;
      if (row >= rows) break;
      const int64_t t = row / 8, h = row % 8;
      reinterpret_cast<uint4*>(key + t * 1024 + h * 128)[lane] =
          make_uint4(k[r].x, k[r].y ^ ks[r], k[r].x ^ k[r].y, ks[r]);
      reinterpret_cast<uint4*>(value + t * 1024 + h * 128)[lane] =
          make_uint4(v[r].x, v[r].y ^ vs[r], v[r].x ^ v[r].y, vs[r]);
    }
  }
}

// Copy kernels over `sets` rotating buffer pairs of `bytes` (read + written
// counted), with a resident and a one-vector-per-thread grid.
void CopyFloor(double bytes, const std::string& tag, cudaStream_t s) {
  const size_t half = static_cast<size_t>(bytes / 2) / 16 * 16;
  const int sets = static_cast<int>(
      std::clamp<double>(std::ceil((1 << 30) / double(half)), 2, 32));
  std::vector<void*> src(sets), dst(sets);
  for (int i = 0; i < sets; ++i) {
    src[i] = Alloc(half);
    dst[i] = Alloc(half);
    X_CHECK(cudaMemset(src[i], 1, half));
  }
  const int64_t n = half / 16;
  auto k4 = &CopyKernel<4>;
  auto k1 = &CopyKernel<1>;
  const int64_t r4 = std::min<int64_t>(
      Resident(reinterpret_cast<const void*>(k4), 128), (n + 511) / 512);
  const int64_t e1 = (n + 127) / 128;
  const int64_t e4 = (n + 511) / 512;
  auto run = [&](auto k, int64_t blocks, bool pdl, const char* name) {
    Row(tag + " copy kernel " + name, 2.0 * half,
        TimeLaunches(
            [&](int i) {
              Launch(k, blocks, 128, pdl, s, static_cast<const uint4*>(src[i]),
                     static_cast<uint4*>(dst[i]), n);
            },
            sets, 30, s));
  };
  auto k8 = &CopyKernel<8>;
  run(k8, (n + 1023) / 1024, true, "x8 exact pdl");
  run(k4, r4, true, "x4 resident pdl");
  run(k4, e4, true, "x4 exact pdl");
  run(k1, e1, true, "x1 exact pdl");
  run(k1, e1, false, "x1 exact");
  Row(tag + " cudaMemcpy", 2.0 * half,
      TimeLaunches(
          [&](int i) {
            X_CHECK(cudaMemcpyAsync(dst[i], src[i], half,
                                    cudaMemcpyDeviceToDevice, s));
          },
          sets, 30, s));
  for (int i = 0; i < sets; ++i) {
    cudaFree(src[i]);
    cudaFree(dst[i]);
  }
}

// The production write launch (two rows per group + 1/32, PDL) against its
// access pattern alone.
template <int kGroup>
void WriteFloor(WriteSetup& w, const std::string& tag, cudaStream_t s) {
  internal::RowDividers d;
  d.heads = internal::FastDivmod::Make(w.H);
  d.block_size = internal::FastDivmod::Make(16);
  const int64_t rows = w.T * w.H;
  const int per_block = 128 / kGroup;
  const int64_t exact = (rows + per_block - 1) / per_block;
  const int64_t r2 = (exact + 1) / 2;
  auto k = w.params[0].cache.layout.inline_scales()
               ? &internal::QuantizeWriteInlineVecKernel<BFloat16Type, Int8Type,
                                                         kGroup, 1, 128, false>
               : &internal::QuantizeWriteVecKernel<BFloat16Type, Int8Type,
                                                   kGroup, 1, 128, false>;
  Row(tag + " kernel", w.bytes,
      TimeLaunches(
          [&](int i) { Launch(k, r2 + r2 / 32, 128, true, s, w.params[i], d); },
          w.sets, 30, s));
  auto pattern = [&](auto rows_per_group) {
    constexpr int kRows = decltype(rows_per_group)::value;
    auto pk = &WritePatternKernel<kGroup, kRows>;
    const int64_t tiles = (rows + per_block * kRows - 1) / (per_block * kRows);
    Row(tag + " pattern rows" + std::to_string(kRows) + " exact pdl", w.bytes,
        TimeLaunches(
            [&](int i) { Launch(pk, tiles, 128, true, s, w.params[i]); },
            w.sets, 30, s));
  };
  pattern(std::integral_constant<int, 1>{});
  pattern(std::integral_constant<int, 2>{});
  pattern(std::integral_constant<int, 4>{});
  // Without the scale stores (bytes counted as with them): what the 32-byte
  // scale sectors cost.
  auto ns = &WritePatternKernel<kGroup, 1, false>;
  Row(tag + " pattern rows1 no scales", w.bytes,
      TimeLaunches([&](int i) { Launch(ns, exact, 128, true, s, w.params[i]); },
                   w.sets, 30, s));
}

// The production gather launch (resident grid, PDL) against its access pattern
// alone and a copy of the same bytes.
void GatherFloor(int64_t T, const std::string& tag, cudaStream_t s,
                 ScalePlacement placement = ScalePlacement::kSide) {
  GatherSetup g = MakeGather(T, DType::kInt8, placement);
  internal::RowDividers d;
  d.heads = internal::FastDivmod::Make(8);
  d.block_size = internal::FastDivmod::Make(16);
  const int64_t rows = T * 8;
  auto k =
      &internal::GatherVecKernel<Int8Type, BFloat16Type, 16, 1, 128, false>;
  const int64_t resident = std::min<int64_t>(
      Resident(reinterpret_cast<const void*>(k), 128), (rows + 7) / 8);
  Row(tag + " kernel", g.bytes,
      TimeLaunches(
          [&](int i) { Launch(k, resident, 128, true, s, g.ps[i], d); }, g.sets,
          30, s));
  auto pattern = [&](auto rows_per_group) {
    constexpr int kRows = decltype(rows_per_group)::value;
    auto pk = &GatherPatternKernel<kRows>;
    const int64_t tiles = (rows + 8 * kRows - 1) / (8 * kRows);
    const int64_t res = std::min<int64_t>(
        Resident(reinterpret_cast<const void*>(pk), 128), tiles);
    Row(tag + " pattern rows" + std::to_string(kRows) + " exact pdl", g.bytes,
        TimeLaunches([&](int i) { Launch(pk, tiles, 128, true, s, g.ps[i]); },
                     g.sets, 30, s));
    Row(tag + " pattern rows" + std::to_string(kRows) + " resident pdl",
        g.bytes,
        TimeLaunches([&](int i) { Launch(pk, res, 128, true, s, g.ps[i]); },
                     g.sets, 30, s));
  };
  pattern(std::integral_constant<int, 1>{});
  pattern(std::integral_constant<int, 2>{});
  pattern(std::integral_constant<int, 4>{});
  CopyFloor(g.bytes, tag, s);
}

// Each case's access pattern alone (no arithmetic, 1 to 4 rows per lane group
// in flight) against the production kernel and copies of the same bytes; with
// `all`, also scattered slots in ascending block order and over a cache of 8T
// blocks instead of 2T (both measured within 0.3 points of plain scattered).
// Every case runs with side scales and again with inline ones ("inline" in
// the tag; the pattern kernels address both through CacheLayout, and the same
// bytes are counted, so each kernel compares with its own placement's floor).
void Floors(cudaStream_t s, bool all) {
  CopyFloor(double{1 << 30} * 2, "1 GiB", s);
  struct W {
    const char* tag;
    int64_t T, D;
    bool scattered;
    int region;
    bool sorted;
    bool copy;
  } writes[] = {
      {"write T=16384 scat", 16384, 128, true, 2, false, true},
      {"write T=16384 scat sorted", 16384, 128, true, 2, true, false},
      {"write T=16384 scat region8", 16384, 128, true, 8, false, false},
      {"write T=16384 contig", 16384, 128, false, 2, false, false},
      {"write T=65536 scat", 65536, 128, true, 2, false, all},
      {"write T=65536 contig", 65536, 128, false, 2, false, all},
      {"write D=64 T=16384 scat", 16384, 64, true, 2, false, true},
      {"write D=64 T=16384 contig", 16384, 64, false, 2, false, false},
  };
  for (ScalePlacement placement :
       {ScalePlacement::kSide, ScalePlacement::kInline}) {
    const bool inl = placement == ScalePlacement::kInline;
    for (const W& c : writes) {
      if (!all && (c.sorted || c.region != 2)) continue;
      const std::string tag = std::string(c.tag) + (inl ? " inline" : "");
      WriteSetup w = MakeWrite(c.T, 8, c.D, c.scattered, DType::kInt8, 32,
                               c.region, c.sorted, placement);
      if (c.D == 128) {
        WriteFloor<16>(w, tag, s);
      } else {
        WriteFloor<8>(w, tag, s);
      }
      if (c.copy && !inl) CopyFloor(w.bytes, tag, s);
    }
    GatherFloor(16384, inl ? "gather T=16384 inline" : "gather T=16384", s,
                placement);
    GatherFloor(65536, inl ? "gather T=65536 inline" : "gather T=65536", s,
                placement);
  }
}

void AllGatherVariants(cudaStream_t s) {
  GatherVariants<Int8Type>(16384, "gather int8 T=16384", s);
  GatherVariants<Fp8E4M3Type>(16384, "gather fp8 T=16384", s);
  GatherVariants<Int8Type>(65536, "gather int8 T=65536", s);
  GatherVariants<Fp8E4M3Type>(65536, "gather fp8 T=65536", s);
}

void Run(const std::string& mode) {
  int dev = 0;
  cudaDeviceProp prop;
  X_CHECK(cudaGetDeviceProperties(&prop, dev));
  g_sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs, L2 %d MB\n", prop.name, g_sms,
              prop.l2CacheSize >> 20);
  cudaStream_t s;
  X_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  {
    void* a = Alloc(size_t{1} << 30);
    void* b = Alloc(size_t{1} << 30);
    const float us = TimeLaunches(
        [&](int) {
          X_CHECK(cudaMemcpyAsync(b, a, size_t{1} << 30,
                                  cudaMemcpyDeviceToDevice, s));
        },
        1, 20, s);
    g_copy_gbps = 2.0 * (1 << 30) / (us * 1e-6) / 1e9;
    std::printf("copy 1 GiB: %.1f GB/s\n", g_copy_gbps);
    cudaFree(a);
    cudaFree(b);
  }
  if (mode == "floors" || mode == "floors-all") {
    Floors(s, mode == "floors-all");
    return;
  }
  if (mode == "gather") {
    AllGatherVariants(s);
    GatherFloor(16384, "gather T=16384", s);
    return;
  }
  for (bool pdl : {false, true}) {
    Row(std::string("empty kernel graph") + (pdl ? " pdl" : ""), 0,
        TimeGraph([&](int) { Launch(&EmptyKernel, 1, 32, pdl, s); }, 1, 30, s));
  }
  {
    WriteSetup w = MakeWrite(16384, 8, 128, true, DType::kInt8, 32);
    WriteAll<Int8Type, 16>(w, "int8 T=16384 scat", false, s);
    PatternAndMemcpy(w, "int8 T=16384 scat", s);
  }
  {
    WriteSetup w = MakeWrite(16384, 8, 128, false, DType::kInt8, 32);
    WriteAll<Int8Type, 16>(w, "int8 T=16384 contig", false, s);
  }
  {
    WriteSetup w = MakeWrite(65536, 8, 128, false, DType::kInt8, 32);
    WriteAll<Int8Type, 16>(w, "int8 T=65536 contig", false, s);
  }
  {
    WriteSetup w = MakeWrite(65536, 8, 128, true, DType::kFp8E4M3, 32);
    WriteAll<Fp8E4M3Type, 16>(w, "fp8 T=65536 scat", false, s);
  }
  {
    WriteSetup w = MakeWrite(16384, 8, 64, true, DType::kInt8, 32);
    WriteAll<Int8Type, 8>(w, "int8 D=64 T=16384 scat", false, s);
  }
  {
    WriteSetup w = MakeWrite(16384, 8, 64, false, DType::kInt8, 32);
    WriteAll<Int8Type, 8>(w, "int8 D=64 T=16384 contig", false, s);
  }
  {
    WriteSetup w = MakeWrite(16384, 8, 128, true, DType::kFp8E4M3, 32);
    WriteAll<Fp8E4M3Type, 16>(w, "fp8 T=16384 scat", false, s);
  }
  for (int64_t T : {1, 64, 256}) {
    WriteSetup w = MakeWrite(T, 8, 128, true, DType::kInt8, 8);
    WriteAll<Int8Type, 16>(w, "decode int8 T=" + std::to_string(T), true, s);
  }
  AllGatherVariants(s);
}

}  // namespace
}  // namespace kvcache::experiments

int RunRowKernelVariants(const char* mode) {
  kvcache::experiments::Run(mode);
  return 0;
}
