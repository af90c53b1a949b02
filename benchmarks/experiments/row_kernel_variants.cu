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

void FillRandomBf16(void* dst, size_t bytes, uint64_t seed) {
  std::vector<uint16_t> h(bytes / 2);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0, 1);
  for (auto& x : h) x = internal::PortableFloatToBFloat16(n(rng));
  X_CHECK(cudaMemcpy(dst, h.data(), bytes, cudaMemcpyHostToDevice));
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

WriteSetup MakeWrite(int64_t T, int64_t H, int64_t D, bool scattered,
                     DType cache_dtype, int max_sets) {
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
  layout.num_blocks = scattered ? T * 2 : (T + 15) / 16;
  LayerCache cache;
  cache.layout = layout;
  cache.key_cache = Alloc(layout.num_blocks * layout.key_block_elems());
  cache.value_cache = Alloc(layout.num_blocks * layout.key_block_elems());
  cache.key_scale =
      static_cast<float*>(Alloc(layout.num_slots() * H * sizeof(float)));
  cache.value_scale =
      static_cast<float*>(Alloc(layout.num_slots() * H * sizeof(float)));
  std::mt19937_64 rng(7);
  for (int s = 0; s < w.sets; ++s) {
    std::vector<int64_t> slots(T), blocks(layout.num_blocks);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
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
  const size_t sc = l.num_slots() * l.num_heads * 4;
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
  X_CHECK(cudaMemset(p.cache.key_scale, 0xAB, sc));
  X_CHECK(cudaMemset(p.cache.value_scale, 0xAB, sc));
  X_CHECK(cudaDeviceSynchronize());
}

template <class Cache, int kGroup, int kThreads>
void WriteVariants(WriteSetup& w, const std::string& tag, bool decode,
                   bool all_grids, cudaStream_t s) {
  internal::RowDividers d;
  d.heads = internal::FastDivmod::Make(w.H);
  d.block_size = internal::FastDivmod::Make(16);
  const int64_t rows = w.T * w.H;
  auto v0 = &v0::QuantizeWriteVecKernel<BFloat16Type, Cache, kGroup, 1>;
  auto v1 = &internal::QuantizeWriteVecKernel<BFloat16Type, Cache, kGroup, 1,
                                              kThreads>;
  const int per_block = kThreads / kGroup;
  const int64_t exact = (rows + per_block - 1) / per_block;
  const int64_t cap64 = std::min<int64_t>(exact, int64_t{g_sms} * 64);
  const int64_t v0_blocks = std::min<int64_t>(
      (rows + 128 / kGroup - 1) / (128 / kGroup), int64_t{g_sms} * 64);
  auto time = [&](const std::function<void(int)>& f) {
    return decode ? TimeGraph(f, w.sets, 30, s)
                  : TimeLaunches(f, w.sets, 30, s);
  };
  const std::string name = tag + " v1 t" + std::to_string(kThreads);
  {
    Clear(w.params[0]);
    v0<<<v0_blocks, 128, 0, s>>>(w.params[0]);
    const auto ref = Snapshot(w.params[0]);
    for (int rep = 0; rep < 2; ++rep) {
      Clear(w.params[0]);
      Launch(v1, rep == 0 ? cap64 : exact, kThreads, true, s, w.params[0], d);
      const auto got = Snapshot(w.params[0]);
      std::printf("%s: v1 %s v0\n", tag.c_str(),
                  ref == got ? "bit-identical to" : "DIFFERS FROM");
    }
    Row(tag + " v0", w.bytes,
        time([&](int i) { v0<<<v0_blocks, 128, 0, s>>>(w.params[i]); }));
    Row(name + " cap64 no-pdl", w.bytes, time([&](int i) {
          Launch(v1, cap64, kThreads, false, s, w.params[i], d);
        }));
  }
  struct G {
    const char* name;
    int64_t blocks;
  };
  std::vector<G> grids = {{"cap64", cap64}};
  if (all_grids) {
    const int64_t r2 = (exact + 1) / 2;
    grids.push_back({"exact", exact});
    grids.push_back({"r2", r2});
    grids.push_back({"r2+3%", r2 + r2 / 32});
    grids.push_back({"r2+6%", r2 + r2 / 16});
    grids.push_back({"r2+12%", r2 + r2 / 8});
  }
  for (const G& g : grids) {
    Row(name + " " + g.name + " pdl", w.bytes, time([&](int i) {
          Launch(v1, g.blocks, kThreads, true, s, w.params[i], d);
        }));
  }
}

template <class Cache, int kGroup>
void WriteAll(WriteSetup& w, const std::string& tag, bool decode,
              cudaStream_t s) {
  WriteVariants<Cache, kGroup, 128>(w, tag, decode, !decode, s);
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

template <class Cache, int kThreads>
void GatherVariants(int64_t T, const std::string& tag, cudaStream_t s) {
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
  layout.cache_dtype = Cache::kDType;
  layout.num_blocks = per_set * sets;
  LayerCache cache;
  cache.layout = layout;
  const size_t cb = layout.num_blocks * layout.key_block_elems();
  const size_t sb = layout.num_slots() * H * 4;
  cache.key_cache = Alloc(cb);
  cache.value_cache = Alloc(cb);
  cache.key_scale = static_cast<float*>(Alloc(sb));
  cache.value_scale = static_cast<float*>(Alloc(sb));
  FillRandomBf16(cache.key_cache, cb, 3);
  FillRandomBf16(cache.value_cache, cb, 4);
  {
    std::vector<float> sc(sb / 4);
    std::mt19937 rng(5);
    for (auto& x : sc) x = 1e-3f * (1 + rng() % 1000);
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
  internal::RowDividers d;
  d.heads = internal::FastDivmod::Make(H);
  d.block_size = internal::FastDivmod::Make(bs);
  const int64_t rows = T * H;
  auto v0 = &v0::GatherVecKernel<Cache, BFloat16Type, 16, 1>;
  auto v1 = &internal::GatherVecKernel<Cache, BFloat16Type, 16, 1, kThreads>;
  const int per_block = kThreads / 16;
  int occ = 0;
  X_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, v1, kThreads, 0));
  const int64_t exact = (rows + per_block - 1) / per_block;
  const int64_t cap64 = std::min<int64_t>(exact, int64_t{g_sms} * 64);
  const int64_t persistent = std::min<int64_t>(exact, int64_t{g_sms} * occ);
  const int64_t v0_blocks =
      std::min<int64_t>((rows + 7) / 8, int64_t{g_sms} * 64);
  {
    std::vector<uint8_t> a(out_bytes), b(out_bytes);
    X_CHECK(cudaMemset(ps[0].output.key, 0xAB, out_bytes));
    X_CHECK(cudaDeviceSynchronize());
    v0<<<v0_blocks, 128, 0, s>>>(ps[0]);
    X_CHECK(cudaDeviceSynchronize());
    X_CHECK(cudaMemcpy(a.data(), ps[0].output.key, out_bytes,
                       cudaMemcpyDeviceToHost));
    X_CHECK(cudaMemset(ps[0].output.key, 0xAB, out_bytes));
    X_CHECK(cudaDeviceSynchronize());
    Launch(v1, cap64, kThreads, true, s, ps[0], d);
    X_CHECK(cudaDeviceSynchronize());
    X_CHECK(cudaMemcpy(b.data(), ps[0].output.key, out_bytes,
                       cudaMemcpyDeviceToHost));
    std::printf("%s: v1 %s v0\n", tag.c_str(),
                a == b ? "bit-identical to" : "DIFFERS FROM");
    {
      Row(tag + " v0", bytes,
          TimeLaunches([&](int i) { v0<<<v0_blocks, 128, 0, s>>>(ps[i]); },
                       sets, 30, s));
    }
  }
  struct G {
    const char* name;
    int64_t blocks;
  } grids[] = {{"cap64", cap64},
               {"persistent", persistent},
               {"r2", (exact + 1) / 2},
               {"r4", (exact + 3) / 4}};
  for (const G& g : grids) {
    for (bool pdl : {false, true}) {
      if (!pdl && g.blocks != persistent) continue;
      Row(tag + " v3 " + g.name + (pdl ? " pdl" : ""), bytes,
          TimeLaunches(
              [&](int i) { Launch(v1, g.blocks, kThreads, pdl, s, ps[i], d); },
              sets, 30, s));
    }
  }
}

void Run() {
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
  for (int64_t T : {1, 64, 256}) {
    WriteSetup w = MakeWrite(T, 8, 128, true, DType::kInt8, 8);
    WriteAll<Int8Type, 16>(w, "decode int8 T=" + std::to_string(T), true, s);
  }
  GatherVariants<Int8Type, 128>(16384, "gather int8 T=16384", s);
  GatherVariants<Fp8E4M3Type, 128>(16384, "gather fp8 T=16384", s);
  GatherVariants<Int8Type, 128>(65536, "gather int8 T=65536", s);
}

}  // namespace
}  // namespace kvcache::experiments

int RunRowKernelVariants() {
  kvcache::experiments::Run();
  return 0;
}
