// CUDA kernels against the CPU kernels, bit for bit, on the same random cases
// over the whole matrix of tests/cpu_kernels_test.cc (whose CPU results are
// checked against the scalar reference), plus the exhaustive device conversion
// sweep, round-trip error bounds and block copy. Skips without a device.
// CudaKernelsSanitizerTest.* is the small subset run under compute-sanitizer.

#include "kernels/cuda_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_kernels.h"
#include "testing/cuda_test_util.h"
#include "tests/conversion_sweep.h"
#include "tests/kernel_reference.h"
#include "tests/kernel_test_util.h"
#include "tests/record_reference.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache::testing {
namespace {

uint64_t Seed() {
  static const uint64_t seed = [] {
    const uint64_t s = TestSeed();
    std::printf("cuda_kernels_test seed: KVCACHE_TEST_SEED=%llu\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

// A device copy of a host vector; copies back on request.
class DeviceBuffer {
 public:
  template <class T>
  explicit DeviceBuffer(const std::vector<T>& host)
      : bytes_(host.size() * sizeof(T)) {
    if (bytes_ == 0) return;
    EXPECT_EQ(cudaMalloc(&ptr_, bytes_), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <class T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  template <class T>
  std::vector<T> Download() const {
    std::vector<T> out(bytes_ / sizeof(T));
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (bytes_ > 0) {
      EXPECT_EQ(cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost),
                cudaSuccess);
    }
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

template <class T>
int64_t FirstDiff(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return -2;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0)
      return static_cast<int64_t>(i);
  }
  return -1;
}

// Write + three gathers of one case on both backends; every output equal byte
// for byte.
void CheckCase(const CaseConfig& config, std::mt19937_64& rng) {
  SCOPED_TRACE(config.Name());
  HostCase hc = MakeCase(config, rng);
  const bool quantized = IsQuantized(config.cache_dtype);
  DeviceBuffer d_input(hc.input), d_slots(hc.slots), d_kc(hc.key_cache),
      d_vc(hc.value_cache), d_ks(hc.key_scale), d_vs(hc.value_scale);
  QuantizeWriteParams gpu =
      hc.Params(d_input.get(), d_slots.get<int64_t>(), d_kc.get(), d_vc.get(),
                d_ks.get<float>(), d_vs.get<float>());
  ASSERT_TRUE(QuantizeWriteCuda(gpu, nullptr).ok());
  QuantizeWriteParams cpu = hc.Params(
      hc.input.data(), hc.slots.data(), hc.key_cache.data(),
      hc.value_cache.data(), quantized ? hc.key_scale.data() : nullptr,
      quantized ? hc.value_scale.data() : nullptr);
  ASSERT_TRUE(QuantizeWriteCpu(cpu).ok());
  ASSERT_EQ(FirstDiff(d_kc.Download<uint8_t>(), hc.key_cache), -1);
  ASSERT_EQ(FirstDiff(d_vc.Download<uint8_t>(), hc.value_cache), -1);
  ASSERT_EQ(FirstDiff(d_ks.Download<float>(), hc.key_scale), -1);
  ASSERT_EQ(FirstDiff(d_vs.Download<float>(), hc.value_scale), -1);

  const DType outs[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (int variant = 0; variant < kGatherVariants; ++variant) {
    const DType out = outs[(variant + rng() % 3) % 3];
    GatherCase g = MakeGatherCase(hc, out, variant, rng);
    SCOPED_TRACE(::testing::Message()
                 << "gather variant " << variant << " out " << DTypeName(out));
    DeviceBuffer d_out(g.output), d_gslots(g.slots), d_table(g.block_table);
    ASSERT_TRUE(
        GatherCuda(g.Params(gpu.cache, d_out.get(), d_gslots.get<int64_t>(),
                            d_table.get<int32_t>()),
                   nullptr)
            .ok());
    ASSERT_TRUE(GatherCpu(g.Params(cpu.cache, g.output.data(), g.slots.data(),
                                   g.block_table.data()))
                    .ok());
    ASSERT_EQ(FirstDiff(d_out.Download<uint8_t>(), g.output), -1);
  }
}

class CudaKernelMatrixTest
    : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t>> {};

TEST_P(CudaKernelMatrixTest, WriteAndGatherMatchCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const auto [d, heads, block_size] = GetParam();
  std::mt19937_64 rng(Seed() ^ (d * 1000003 + heads * 101 + block_size));
  const int64_t dv = block_size == 16 ? d : OtherHeadSize(d);
  int i = 0;
  for (const DTypePair& pair : WriteDTypePairs()) {
    for (ScalePlacement placement : PlacementsFor(pair.cache)) {
      for (int64_t budget : {int64_t{3000}, int64_t{400000}}) {
        CaseConfig c;
        c.head_size = d;
        c.head_size_v = dv;
        c.num_heads = heads;
        c.block_size = block_size;
        c.num_tokens = TokensFor(heads, d, dv, budget);
        c.input_dtype = pair.input;
        c.cache_dtype = pair.cache;
        c.placement = placement;
        c.layout = static_cast<InputLayout>((i++ + d / 8) % 4);
        CheckCase(c, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, CudaKernelMatrixTest,
    ::testing::Combine(::testing::ValuesIn(MatrixHeadSizes()),
                       ::testing::Values(1, 8, 32),
                       ::testing::Values(1, 16, 64)),
    [](const auto& info) {
      return "D" + std::to_string(std::get<0>(info.param)) + "_H" +
             std::to_string(std::get<1>(info.param)) + "_bs" +
             std::to_string(std::get<2>(info.param));
    });

// K-only (latent, MLA) caches, head_size_v 0, against the CPU (itself checked
// against the reference in cpu_kernels_test): vector and scalar paths, both
// placements, every dtype pair. 576 = 512 + 64 is DeepSeek's latent.
class CudaKernelKOnlyTest
    : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t>> {};

TEST_P(CudaKernelKOnlyTest, WriteAndGatherMatchCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const auto [d, heads, block_size] = GetParam();
  std::mt19937_64 rng(Seed() ^ (d * 7919 + heads * 131 + block_size + 17));
  int i = 0;
  for (const DTypePair& pair : WriteDTypePairs()) {
    for (ScalePlacement placement : PlacementsFor(pair.cache)) {
      for (int64_t budget : {int64_t{3000}, int64_t{400000}}) {
        CaseConfig c;
        c.head_size = d;
        c.head_size_v = 0;
        c.num_heads = heads;
        c.block_size = block_size;
        c.num_tokens = TokensFor(heads, d, 0, budget);
        c.input_dtype = pair.input;
        c.cache_dtype = pair.cache;
        c.placement = placement;
        c.layout = static_cast<InputLayout>(i++ % 4);
        CheckCase(c, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    KOnly, CudaKernelKOnlyTest,
    ::testing::Combine(::testing::Values(8, 64, 128, 512, 576),
                       ::testing::Values(1, 4, 16),
                       ::testing::Values(1, 16, 64)),
    [](const auto& info) {
      return "D" + std::to_string(std::get<0>(info.param)) + "_H" +
             std::to_string(std::get<1>(info.param)) + "_bs" +
             std::to_string(std::get<2>(info.param));
    });

// The inline write against the CPU on the shapes where its stores are most
// awkward: scales at 8 mod 16 bytes (pad 4, the last chunk holds codes and the
// scale), K and V of different lengths (the gap before the shorter one's
// scale), K-only rows, 1 to 8 vectors per lane, decode-sized and odd token
// counts, all input layouts, every quantized dtype pair.
TEST(CudaKernelsTest, InlineWriteAwkwardShapesMatchCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 11);
  int i = 0;
  for (auto [d, dv] : {std::pair<int, int>{8, 8},
                       {24, 24},
                       {64, 64},
                       {72, 0},
                       {128, 128},
                       {136, 136},
                       {128, 200},
                       {200, 64},
                       {256, 256},
                       {520, 520},
                       {576, 0},
                       {1000, 1000},
                       {1024, 8}}) {
    for (const DTypePair& pair : WriteDTypePairs()) {
      if (!IsQuantized(pair.cache)) continue;
      CaseConfig c;
      c.head_size = d;
      c.head_size_v = dv;
      c.num_heads = 1 + i % 5;
      c.block_size = i % 3 == 0 ? 1 : 16;
      c.num_tokens = i % 2 == 0 ? 1 + i % 7 : 13 + i % 29;
      c.input_dtype = pair.input;
      c.cache_dtype = pair.cache;
      c.placement = ScalePlacement::kInline;
      c.layout = static_cast<InputLayout>(i % 4);
      ++i;
      CheckCase(c, rng);
      if (HasFatalFailure()) return;
    }
  }
}

// Gathers of caches holding every code (all 256 byte values, random order) with
// random finite scales, into every output dtype: covers codes quantization
// never writes (int8 -128, fp8 NaN) on the paired decode paths.
TEST(CudaKernelsTest, GatherOfEveryCodeMatchesCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 6);
  for (int k = 0; k < 4; ++k) {
    const DType cache = k % 2 == 0 ? DType::kInt8 : DType::kFp8E4M3;
    CaseConfig c;
    c.cache_dtype = cache;
    c.placement = k < 2 ? ScalePlacement::kSide : ScalePlacement::kInline;
    c.num_tokens = 64;
    HostCase hc = MakeCase(c, rng);
    for (std::vector<uint8_t>* codes : {&hc.key_cache, &hc.value_cache}) {
      for (size_t i = 0; i < codes->size(); ++i) (*codes)[i] = i % 256;
      std::shuffle(codes->begin(), codes->end(), rng);
    }
    // Random finite scales (inline ones overwrite the bytes in their rows).
    std::uniform_real_distribution<float> log_scale(-20.0f, 20.0f);
    ref::Caches caches{hc.key_cache, hc.value_cache, hc.key_scale,
                       hc.value_scale};
    const ref::Placement place(hc);
    for (int64_t slot = 0; slot < hc.layout.num_slots(); ++slot) {
      for (int64_t h = 0; h < c.num_heads; ++h) {
        for (bool key : {true, false}) {
          place.SetScale(caches, key, slot, h, c.num_heads,
                         std::exp2(log_scale(rng)));
        }
      }
    }
    hc.key_cache = caches.key_cache;
    hc.value_cache = caches.value_cache;
    hc.key_scale = caches.key_scale;
    hc.value_scale = caches.value_scale;
    DeviceBuffer d_kc(hc.key_cache), d_vc(hc.value_cache), d_ks(hc.key_scale),
        d_vs(hc.value_scale);
    const LayerCache gpu_cache =
        hc.Cache(d_kc.get(), d_vc.get(), d_ks.get<float>(), d_vs.get<float>());
    const LayerCache cpu_cache =
        hc.Cache(hc.key_cache.data(), hc.value_cache.data(),
                 hc.key_scale.data(), hc.value_scale.data());
    for (DType out : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
      for (int variant = 0; variant < kGatherVariants; ++variant) {
        SCOPED_TRACE(::testing::Message()
                     << DTypeName(cache) << " -> " << DTypeName(out) << " "
                     << ScalePlacementName(c.placement) << " variant "
                     << variant);
        GatherCase g = MakeGatherCase(hc, out, variant, rng);
        DeviceBuffer d_out(g.output), d_slots(g.slots), d_table(g.block_table);
        ASSERT_TRUE(
            GatherCuda(g.Params(gpu_cache, d_out.get(), d_slots.get<int64_t>(),
                                d_table.get<int32_t>()),
                       nullptr)
                .ok());
        ASSERT_TRUE(GatherCpu(g.Params(cpu_cache, g.output.data(),
                                       g.slots.data(), g.block_table.data()))
                        .ok());
        ASSERT_EQ(FirstDiff(d_out.Download<uint8_t>(), g.output), -1);
      }
    }
  }
}

TEST(CudaKernelsTest, LargeWriteMatchesCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 1);
  for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
    for (ScalePlacement placement : PlacementsFor(cache)) {
      CaseConfig c;
      c.num_tokens = 20000;  // Several waves of the grid-stride loop.
      c.cache_dtype = cache;
      c.placement = placement;
      CheckCase(c, rng);
    }
  }
}

TEST(CudaKernelsTest, ConversionsMatchPortableOnEveryFloat) {
  KVCACHE_SKIP_WITHOUT_GPU();
  absl::StatusOr<ConversionMismatches> m = SweepConversionsOnDevice();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->fp8_encode, 0u)
      << "first mismatch at float bits 0x" << std::hex << m->first_fp8_encode;
  EXPECT_EQ(m->bf16_encode, 0u);
  EXPECT_EQ(m->fp16_encode, 0u);
  EXPECT_EQ(m->fp8_decode, 0u);
  EXPECT_EQ(m->fp16_widen, 0u);
}

// k = 4..7: K-only MLA latents (576 = 512 + 64, one head); the int8 bound is
// 8e-3 there (cpu_kernels_test's KOnlyRoundTripErrorIsBounded says why).
TEST(CudaKernelsTest, RoundTripErrorIsBounded) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 3);
  for (int k = 0; k < 8; ++k) {
    const DType cache = k % 2 == 0 ? DType::kInt8 : DType::kFp8E4M3;
    const bool k_only = k >= 4;
    CaseConfig c;
    if (k_only) {
      c.head_size = 576;
      c.head_size_v = 0;
      c.num_heads = 1;
    }
    c.num_tokens = 1024;
    c.cache_dtype = cache;
    c.placement = k % 4 < 2 ? ScalePlacement::kSide : ScalePlacement::kInline;
    c.specials = false;
    c.padding = 0;
    c.gaussian = true;
    HostCase hc = MakeCase(c, rng);
    DeviceBuffer d_input(hc.input), d_slots(hc.slots), d_kc(hc.key_cache),
        d_vc(hc.value_cache), d_ks(hc.key_scale), d_vs(hc.value_scale);
    QuantizeWriteParams p =
        hc.Params(d_input.get(), d_slots.get<int64_t>(), d_kc.get(), d_vc.get(),
                  d_ks.get<float>(), d_vs.get<float>());
    ASSERT_TRUE(QuantizeWriteCuda(p, nullptr).ok());
    GatherCase g = MakeGatherCase(hc, DType::kFloat32, 0, rng);
    DeviceBuffer d_out(g.output);
    ASSERT_TRUE(GatherCuda(g.Params(p.cache, d_out.get(),
                                    d_slots.get<int64_t>(), nullptr),
                           nullptr)
                    .ok());
    const std::vector<float> out = d_out.Download<float>();
    double err = 0, norm = 0;
    for (int64_t t = 0; t < c.num_tokens; ++t) {
      for (int64_t h = 0; h < c.num_heads; ++h) {
        for (int64_t i = 0; i < c.head_size; ++i) {
          uint16_t raw;
          std::memcpy(&raw, hc.Row(true, t, h) + i * 2, 2);
          const double x = internal::PortableBFloat16ToFloat(raw);
          const double y = out[(t * c.num_heads + h) * c.head_size + i];
          err += (x - y) * (x - y);
          norm += x * x;
        }
      }
    }
    const double rel = std::sqrt(err / norm);
    std::printf("GPU round trip%s %s, %s scales: relative L2 error %.4g\n",
                k_only ? " (K only, 576)" : "", DTypeName(cache).data(),
                ScalePlacementName(c.placement), rel);
    EXPECT_LE(rel, cache == DType::kInt8 ? (k_only ? 8e-3 : 7e-3) : 2.7e-2);
  }
}

// head_size_v 0: a K-only cache (no V regions).
void CheckBlockCopy(DType cache, ScalePlacement placement, std::mt19937_64& rng,
                    int64_t head_size_v = 64) {
  CaseConfig c;
  c.cache_dtype = cache;
  c.placement = placement;
  c.head_size = 80;
  c.head_size_v = head_size_v;
  SCOPED_TRACE(c.Name());
  c.num_heads = 3;
  c.block_size = 5;  // Block bytes not a multiple of 16: narrower accesses.
  c.num_tokens = 40;
  HostCase hc = MakeCase(c, rng);
  const bool quantized = IsQuantized(cache);
  DeviceBuffer d_kc(hc.key_cache), d_vc(hc.value_cache), d_ks(hc.key_scale),
      d_vs(hc.value_scale);
  const std::vector<int64_t> pairs = {0, 3, 2, 1, 4, hc.layout.num_blocks - 1};
  DeviceBuffer d_pairs(pairs);
  BlockCopyParams p;
  p.cache =
      hc.Cache(d_kc.get(), d_vc.get(), d_ks.get<float>(), d_vs.get<float>());
  p.pairs = d_pairs.get<int64_t>();
  p.num_pairs = 3;
  ASSERT_TRUE(BlockCopyCuda(p, nullptr).ok());
  p.cache = hc.Cache(hc.key_cache.data(), hc.value_cache.data(),
                     quantized ? hc.key_scale.data() : nullptr,
                     quantized ? hc.value_scale.data() : nullptr);
  p.pairs = pairs.data();
  ASSERT_TRUE(BlockCopyCpu(p).ok());
  EXPECT_EQ(FirstDiff(d_kc.Download<uint8_t>(), hc.key_cache), -1);
  EXPECT_EQ(FirstDiff(d_vc.Download<uint8_t>(), hc.value_cache), -1);
  EXPECT_EQ(FirstDiff(d_ks.Download<float>(), hc.key_scale), -1);
  EXPECT_EQ(FirstDiff(d_vs.Download<float>(), hc.value_scale), -1);
}

TEST(CudaKernelsTest, BlockCopyMatchesCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 4);
  for (DType cache :
       {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16, DType::kFloat16}) {
    for (ScalePlacement placement : PlacementsFor(cache)) {
      CheckBlockCopy(cache, placement, rng);
      CheckBlockCopy(cache, placement, rng, /*head_size_v=*/0);
    }
  }
}

// Records (layer groups of several cache shapes): write, gathers and block
// copy on CUDA leave the same record bytes and outputs as on the CPU (whose
// records tests/cpu_kernels_test.cc checks against the reference). Vector and
// scalar inputs, K/V and K-only, side and inline, every dtype pair.
void CheckRecordCase(const CaseConfig& config, std::mt19937_64& rng) {
  SCOPED_TRACE(config.Name());
  HostCase hc = MakeCase(config, rng);
  const int64_t extra = 16 * static_cast<int64_t>(rng() % 2);
  ref::Records cpu = ref::ToRecords(
      hc, {hc.key_cache, hc.value_cache, hc.key_scale, hc.value_scale}, extra,
      rng());
  DeviceBuffer d_input(hc.input), d_slots(hc.slots), d_rec(cpu.bytes);
  QuantizeWriteParams gpu = hc.Params(d_input.get(), d_slots.get<int64_t>(),
                                      nullptr, nullptr, nullptr, nullptr);
  gpu.cache = cpu.Cache(hc, d_rec.get());
  ASSERT_TRUE(QuantizeWriteCuda(gpu, nullptr).ok());
  QuantizeWriteParams host = hc.Params(hc.input.data(), hc.slots.data(),
                                       nullptr, nullptr, nullptr, nullptr);
  host.cache = cpu.Cache(hc, cpu.bytes.data());
  ASSERT_TRUE(QuantizeWriteCpu(host).ok());
  ASSERT_EQ(FirstDiff(d_rec.Download<uint8_t>(), cpu.bytes), -1);

  const DType outs[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (int variant = 0; variant < kGatherVariants; ++variant) {
    const DType out = outs[(variant + rng() % 3) % 3];
    GatherCase g = MakeGatherCase(hc, out, variant, rng);
    SCOPED_TRACE(::testing::Message()
                 << "gather variant " << variant << " out " << DTypeName(out));
    DeviceBuffer d_out(g.output), d_gslots(g.slots), d_table(g.block_table);
    ASSERT_TRUE(
        GatherCuda(g.Params(gpu.cache, d_out.get(), d_gslots.get<int64_t>(),
                            d_table.get<int32_t>()),
                   nullptr)
            .ok());
    ASSERT_TRUE(GatherCpu(g.Params(host.cache, g.output.data(), g.slots.data(),
                                   g.block_table.data()))
                    .ok());
    ASSERT_EQ(FirstDiff(d_out.Download<uint8_t>(), g.output), -1);
  }

  const int64_t blocks = hc.layout.num_blocks;
  if (blocks < 2) return;
  std::vector<int64_t> pairs = {0, blocks - 1};
  if (blocks >= 4) pairs.insert(pairs.end(), {2, 1});
  DeviceBuffer d_pairs(pairs);
  BlockCopyParams copy;
  copy.num_pairs = static_cast<int64_t>(pairs.size()) / 2;
  copy.cache = gpu.cache;
  copy.pairs = d_pairs.get<int64_t>();
  ASSERT_TRUE(BlockCopyCuda(copy, nullptr).ok());
  copy.cache = host.cache;
  copy.pairs = pairs.data();
  ASSERT_TRUE(BlockCopyCpu(copy).ok());
  ASSERT_EQ(FirstDiff(d_rec.Download<uint8_t>(), cpu.bytes), -1);
}

TEST(CudaKernelsTest, RecordsMatchCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 6);
  struct Shape {
    int64_t d, dv, heads, block_size;
  };
  const Shape shapes[] = {{128, 128, 8, 16}, {256, 256, 4, 16},
                          {576, 0, 1, 16},   {64, 128, 3, 1},
                          {128, 64, 2, 16},  {512, 512, 2, 4}};
  int i = 0;
  for (const Shape& shape : shapes) {
    for (const DTypePair& pair : WriteDTypePairs()) {
      for (ScalePlacement placement : PlacementsFor(pair.cache)) {
        CaseConfig c;
        c.head_size = shape.d;
        c.head_size_v = shape.dv;
        c.num_heads = shape.heads;
        c.block_size = shape.block_size;
        c.num_tokens = TokensFor(shape.heads, shape.d, shape.dv, 60000);
        c.input_dtype = pair.input;
        c.cache_dtype = pair.cache;
        c.placement = placement;
        c.layout = static_cast<InputLayout>(i++ % 4);
        CheckRecordCase(c, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(CudaKernelsTest, LaunchersRejectBadArgumentsBeforeLaunching) {
  KVCACHE_SKIP_WITHOUT_GPU();
  QuantizeWriteParams p;
  p.num_tokens = 1;
  EXPECT_EQ(QuantizeWriteCuda(p, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GatherCuda(GatherParams{}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BlockCopyCuda(BlockCopyParams{}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// Small cases for compute-sanitizer memcheck/racecheck: vector and scalar paths
// of every kernel, decode-sized and odd shapes.
TEST(CudaKernelsSanitizerTest, SmallCasesMatchCpu) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(Seed() + 5);
  int i = 0;
  for (const DTypePair& pair : WriteDTypePairs()) {
    for (auto [d, dv, heads, bs, tokens] :
         {std::tuple<int, int, int, int, int>{128, 128, 8, 16, 1},
          {8, 576, 3, 1, 5},
          {192, 128, 32, 64, 7},
          {1024, 1024, 1, 16, 2},
          {576, 0, 1, 16, 9},  // K only (MLA latent).
          {72, 0, 3, 1, 4}}) {
      CaseConfig c;
      c.head_size = d;
      c.head_size_v = dv;
      c.num_heads = heads;
      c.block_size = bs;
      c.num_tokens = tokens;
      c.input_dtype = pair.input;
      c.cache_dtype = pair.cache;
      c.layout = static_cast<InputLayout>(i % 4);
      // Inline scales on every other quantized case.
      if (IsQuantized(pair.cache) && (i / 4 + i) % 2 == 1) {
        c.placement = ScalePlacement::kInline;
      }
      ++i;
      CheckCase(c, rng);
      if (HasFatalFailure()) return;
    }
  }
  CheckBlockCopy(DType::kInt8, ScalePlacement::kSide, rng);
  CheckBlockCopy(DType::kInt8, ScalePlacement::kInline, rng);
  CheckBlockCopy(DType::kBFloat16, ScalePlacement::kSide, rng);
  CheckBlockCopy(DType::kInt8, ScalePlacement::kInline, rng, 0);
}

#else  // !KVCACHE_HAVE_CUDA_RUNTIME

TEST(CudaKernelsTest, BuiltWithoutCuda) {
  QuantizeWriteParams p;
  EXPECT_EQ(QuantizeWriteCuda(p, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(GatherCuda(GatherParams{}, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(BlockCopyCuda(BlockCopyParams{}, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  GTEST_SKIP() << "skipped: kvcache was built without CUDA support";
}

#endif

}  // namespace
}  // namespace kvcache::testing
