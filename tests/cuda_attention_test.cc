// The CUDA decode attention (kernels/attention.cuh) against the float64
// reference (tests/attention_reference.h) over the full matrix of issue #20:
// context lengths 1, 15, 16, 17, 1000 and 32768, batches of 1 to 256 with
// padding entries, shared prefix blocks and forked tails, GQA 1/4/8/16, head
// sizes 64/128/256, int8/fp8/bf16 caches (and fp16), window on and off,
// soft-cap, 1 to 8 query tokens, the launcher's split and forced splits (the
// reduction and empty splits); bar: error beyond the bf16 output's own
// rounding <= 2e-3 x max |o| (tests/attention_test_util.h explains). Also
// CUDA-graph capture and replay with new inputs, and the manager scenario on
// the CUDA backend. Skips without a device; CudaAttentionSanitizerTest.* is
// the small subset for compute-sanitizer. Prints PASS/FAIL per case group.
// Every case of the matrix runs each kernel variant (AttentionParams::variant)
// against the same reference; KVCACHE_ATTENTION_VARIANTS=0,4 restricts them,
// and a line per variant at the end counts its failing checks.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_attention.h"
#include "kernels/cuda_kernels.h"
#include "testing/cuda_test_util.h"
#include "tests/attention_manager_scenario.h"
#include "tests/attention_test_util.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache::testing {
namespace {

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

constexpr double kTolerance = 2e-3;

class Dev {
 public:
  explicit Dev(size_t bytes) : bytes_(bytes) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(bytes, 16)), cudaSuccess);
  }
  template <class T>
  explicit Dev(const std::vector<T>& host) : Dev(host.size() * sizeof(T)) {
    Upload(host);
  }
  ~Dev() { cudaFree(ptr_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  template <class T>
  void Upload(const std::vector<T>& host) {
    if (!host.empty()) {
      EXPECT_EQ(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T),
                           cudaMemcpyHostToDevice),
                cudaSuccess);
    }
  }
  template <class T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  template <class T>
  std::vector<T> Download() const {
    std::vector<T> out(bytes_ / sizeof(T));
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost),
              cudaSuccess);
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// A case's buffers on the device, with a workspace for up to 64 splits.
struct DeviceCase {
  explicit DeviceCase(const AttnCase& a)
      : kc(a.key_cache),
        vc(a.value_cache),
        ks(a.key_scale),
        vs(a.value_scale),
        q(a.q),
        o(a.q.size() / a.layout.head_size * a.layout.head_size_v * 2),
        table(a.flat_table),
        lens(a.seq_lens),
        starts(a.q_start),
        rows(int64_t{a.q_start.back()} * a.num_q_heads * kMaxAttentionSplits),
        partial_o(rows * a.layout.head_size_v * 4),
        partial_lse(rows * 4) {}
  AttentionParams Params(const AttnCase& a) const {
    AttentionParams p = a.Params(
        kc.get(), vc.get(), ks.get<float>(), vs.get<float>(), q.get(), o.get(),
        table.get<int32_t>(), lens.get<int32_t>(), starts.get<int32_t>());
    p.workspace.partial_o = partial_o.get<float>();
    p.workspace.partial_lse = partial_lse.get<float>();
    p.workspace.partial_o_floats = rows * a.layout.head_size_v;
    p.workspace.partial_lse_floats = rows;
    return p;
  }
  Dev kc, vc, ks, vs, q, o, table, lens, starts;
  int64_t rows;
  Dev partial_o, partial_lse;
};

// Checks and failures per kernel variant.
int variant_failures[kNumAttentionVariants] = {};
int variant_checks[kNumAttentionVariants] = {};

// One kernel variant with the launcher's split and with `forced` splits.
bool CheckVariant(const AttnCase& a, const AttnCaseConfig& config,
                  DeviceCase& d, const std::vector<double>& ref,
                  int32_t variant, int forced) {
  bool ok = true;
  for (int splits : {0, forced}) {
    SCOPED_TRACE(::testing::Message() << "num_splits " << splits);
    std::vector<uint16_t> poison(ref.size(), 0x7FC1);
    d.o.Upload(poison);
    AttentionParams p = d.Params(a);
    p.num_splits = splits;
    p.variant = variant;
    const absl::Status s = AttentionCuda(p, nullptr);
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const AttnError e =
        CompareAttention(d.o.Download<uint16_t>(), config.q_dtype, ref);
    EXPECT_TRUE(e.finite) << "an output element was not written (or NaN)";
    EXPECT_LE(e.relative(), kTolerance)
        << "error beyond output rounding " << e.max_excess << ", raw "
        << e.max_abs << ", max |o| " << e.max_ref;
    const bool pass = s.ok() && e.finite && e.relative() <= kTolerance;
    ++variant_checks[variant];
    variant_failures[variant] += pass ? 0 : 1;
    ok = ok && pass;
    if (forced == 0) break;
  }
  return ok;
}

// The kernel variants to test: all, or KVCACHE_ATTENTION_VARIANTS (a comma
// list).
const std::vector<int32_t>& TestedVariants() {
  static const std::vector<int32_t> variants = [] {
    std::vector<int32_t> v;
    const char* env = std::getenv("KVCACHE_ATTENTION_VARIANTS");
    if (env != nullptr && *env != '\0') {
      std::string list = env;
      size_t pos = 0;
      while (pos < list.size()) {
        size_t end = list.find(',', pos);
        if (end == std::string::npos) end = list.size();
        const int n = std::atoi(list.substr(pos, end - pos).c_str());
        if (n >= 0 && n < kNumAttentionVariants) v.push_back(n);
        pos = end + 1;
      }
    }
    if (v.empty()) {
      for (int32_t i = 0; i < kNumAttentionVariants; ++i) v.push_back(i);
    }
    return v;
  }();
  return variants;
}

// Prints each tested variant's failing checks after all tests.
class VariantSummary : public ::testing::Environment {
 public:
  void TearDown() override {
    for (int32_t v : TestedVariants()) {
      if (variant_checks[v] == 0) continue;
      std::printf("%s variant %d (%s): %d of %d checks failed\n",
                  variant_failures[v] == 0 ? "PASS" : "FAIL", v,
                  kAttentionVariantNames[v], variant_failures[v],
                  variant_checks[v]);
    }
  }
};
[[maybe_unused]] ::testing::Environment* const variant_summary =
    ::testing::AddGlobalTestEnvironment(new VariantSummary);

// Runs a case with the launcher's split and with `forced` splits, with every
// tested kernel variant; all must meet the bar. Returns false on failure
// (already reported).
bool CheckCase(const AttnCaseConfig& config, std::mt19937_64& rng,
               int forced = 0) {
  SCOPED_TRACE(config.Name());
  const AttnCase a = MakeAttnCase(config, rng);
  DeviceCase d(a);
  const std::vector<double> ref = ReferenceAttention(a.Ref());
  bool ok = true;
  for (int32_t variant : TestedVariants()) {
    SCOPED_TRACE(::testing::Message()
                 << "variant " << variant << " ("
                 << kAttentionVariantNames[variant] << ")");
    ok &= CheckVariant(a, config, d, ref, variant, forced);
  }
  return ok;
}

void Verdict(const char* group, bool ok) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", group);
}

TEST(CudaAttentionTest, ShapeMatrix) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(30);
  bool ok = true;
  int n = 0;
  for (DType cache : {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16}) {
    for (int64_t d : {64, 128, 256}) {
      for (int32_t g : {1, 4, 8, 16}) {
        for (int32_t window : {0, 300}) {
          AttnCaseConfig c;
          c.head_size = d;
          c.group = g;
          c.num_kv_heads = g == 16 ? 1 : 2;
          c.cache_dtype = cache;
          c.q_dtype = n % 2 ? DType::kFloat16 : DType::kBFloat16;
          c.block_size = n % 3 == 0 ? 16 : (n % 3 == 1 ? 32 : 7);
          c.seq_lens = {1, 15, 16, 0, 17, 1000};
          c.num_query = {1 + n % 8, 8, 2, 1, 5, 1 + (n + 3) % 8};
          if (n % 6 == 0) {  // A long context in every sixth batch.
            c.seq_lens.push_back(32768);
            c.num_query.push_back(1);
          }
          c.window = window;
          c.soft_cap = n % 4 == 3 ? 5.0f : 0.0f;
          c.share_prefix = n % 5 == 0;
          ok &= CheckCase(c, rng, 2 + n % 40);
          ++n;
        }
      }
    }
  }
  Verdict("CudaAttentionTest.ShapeMatrix (72 batches)", ok);
}

// Narrow 8-bit tiles (swapped operands) on 4 and 8 KV heads, so blocks of
// 1, 2 and 4 heads: rows per head (tokens x group) up to 8, odd block sizes,
// windows, soft-cap, padding, shared prefixes and a long context.
TEST(CudaAttentionTest, NarrowTilesOnManyHeads) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(34);
  bool ok = true;
  int n = 0;
  for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
    for (int64_t d : {64, 128, 256}) {
      for (int32_t g : {1, 4, 8}) {
        AttnCaseConfig c;
        c.head_size = d;
        c.group = g;
        c.num_kv_heads = n % 2 ? 8 : 4;
        c.cache_dtype = cache;
        c.q_dtype = n % 2 ? DType::kFloat16 : DType::kBFloat16;
        c.block_size = n % 3 == 0 ? 16 : (n % 3 == 1 ? 32 : 7);
        const int32_t t = 8 / g;  // Most query tokens with <= 8 rows.
        c.seq_lens = {1, 15, 16, 0, 17, 1000};
        c.num_query = {t, 1, 1 + n % t, 1, t, 1};
        if (n % 3 == 0) {
          c.seq_lens.push_back(32768);
          c.num_query.push_back(1);
        }
        c.window = n % 4 == 1 ? 300 : 0;
        c.soft_cap = n % 4 == 2 ? 5.0f : 0.0f;
        c.share_prefix = n % 5 == 0;
        ok &= CheckCase(c, rng, 2 + n % 40);
        ++n;
      }
    }
  }
  Verdict("CudaAttentionTest.NarrowTilesOnManyHeads (18 batches)", ok);
}

TEST(CudaAttentionTest, LongContextsAndBigBatches) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(31);
  bool ok = true;
  for (DType cache :
       {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16, DType::kFloat16}) {
    AttnCaseConfig c;  // 32768 tokens, 8 speculative queries, GQA 16.
    c.head_size = 256;
    c.group = 16;
    c.num_kv_heads = 1;
    c.cache_dtype = cache;
    c.q_dtype = cache == DType::kFloat16 ? DType::kFloat16 : DType::kBFloat16;
    c.seq_lens = {32768};
    c.num_query = {8};
    ok &= CheckCase(c, rng);
    c.window = 4096;
    ok &= CheckCase(c, rng, 5);
  }
  for (int batch : {1, 2, 64, 256}) {
    AttnCaseConfig c;
    c.head_size = 128;
    c.group = 4;
    c.num_kv_heads = 8;
    c.share_prefix = true;
    std::uniform_int_distribution<int> len(1, 3000);
    for (int i = 0; i < batch; ++i) {
      c.seq_lens.push_back(i % 19 == 7 ? 0 : len(rng));
    }
    c.num_query = {1, 1, 2, 8, 1};
    ok &= CheckCase(c, rng);
  }
  Verdict("CudaAttentionTest.LongContextsAndBigBatches", ok);
}

// Captures one launch (with splits) in a graph, then replays it with new
// queries, new lengths and new block tables written into the same buffers.
TEST(CudaAttentionTest, GraphCaptureAndReplay) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(32);
  AttnCaseConfig c;
  c.seq_lens = {4000, 100, 0, 2500};
  c.num_query = {1, 2, 1, 4};
  AttnCase a = MakeAttnCase(c, rng);
  DeviceCase d(a);
  AttentionParams p = d.Params(a);
  p.max_seq_len = 4096;  // A bound, as an engine captures it.
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
            cudaSuccess);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal),
            cudaSuccess);
  const absl::Status s = AttentionCuda(p, stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  bool ok = true;
  for (int replay = 0; replay < 3; ++replay) {
    SCOPED_TRACE(::testing::Message() << "replay " << replay);
    if (replay > 0) {  // New inputs in the same buffers.
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (uint16_t& h : a.q) h = ToHalf(c.q_dtype, normal(rng));
      a.seq_lens = {4000 - replay * 7, 3, 0, 2500 - replay};
      std::swap(a.flat_table[0], a.flat_table[a.table_stride]);
      for (int i = 0; i < 4; ++i) {
        a.tables[i].assign(a.flat_table.begin() + i * a.table_stride,
                           a.flat_table.begin() + (i + 1) * a.table_stride);
      }
      ASSERT_LE(a.seq_lens[0], a.table_stride * 16);
      d.q.Upload(a.q);
      d.lens.Upload(a.seq_lens);
      d.table.Upload(a.flat_table);
    }
    for (int i = 0; i < 4; ++i) {
      for (int32_t& b : a.tables[i]) {
        if (b < 0) b = 0;  // Padding columns are never read by the reference.
      }
    }
    d.o.Upload(std::vector<uint16_t>(a.q.size(), 0x7FC1));
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const AttnError e = CompareAttention(d.o.Download<uint16_t>(), c.q_dtype,
                                         ReferenceAttention(a.Ref()));
    EXPECT_TRUE(e.finite);
    EXPECT_LE(e.relative(), kTolerance) << "raw " << e.max_abs;
    ok = ok && e.finite && e.relative() <= kTolerance;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  Verdict("CudaAttentionTest.GraphCaptureAndReplay", ok);
}

MemOps CudaOps() {
  MemOps ops;
  ops.backend = Backend::kCuda;
  ops.memory = MemoryKind::kCuda;
  ops.alloc = [](size_t n) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, n), cudaSuccess);
    return p;
  };
  ops.release = [](void* p) { cudaFree(p); };
  ops.to_backend = [](void* d, const void* s, size_t n) {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(d, s, n, cudaMemcpyHostToDevice), cudaSuccess);
  };
  ops.to_host = [](void* d, const void* s, size_t n) {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(d, s, n, cudaMemcpyDeviceToHost), cudaSuccess);
  };
  return ops;
}

TEST(CudaAttentionTest, ManagerSharedPrefixAndFork) {
  KVCACHE_SKIP_WITHOUT_GPU();
  for (DType cache : {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16}) {
    RunAttentionManagerScenario(cache, CudaOps());
  }
  Verdict("CudaAttentionTest.ManagerSharedPrefixAndFork", !HasFailure());
}

// Small cases for compute-sanitizer (memcheck, racecheck): one and several
// splits, padding, windows, every cache dtype.
TEST(CudaAttentionSanitizerTest, Small) {
  KVCACHE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(33);
  bool ok = true;
  for (DType cache : {DType::kInt8, DType::kFp8E4M3, DType::kBFloat16}) {
    AttnCaseConfig c;
    c.head_size = cache == DType::kInt8 ? 128 : 64;
    c.group = 4;
    c.cache_dtype = cache;
    c.seq_lens = {1, 0, 600, 33};
    c.num_query = {1, 2, 8, 3};
    c.window = cache == DType::kFp8E4M3 ? 100 : 0;
    c.share_prefix = true;
    ok &= CheckCase(c, rng, 3);
  }
  // Narrow 8-bit tiles (swapped operands) on 8 KV heads.
  for (DType cache : {DType::kInt8, DType::kFp8E4M3}) {
    AttnCaseConfig c;
    c.head_size = 128;
    c.num_kv_heads = 8;
    c.group = 4;
    c.cache_dtype = cache;
    c.block_size = cache == DType::kInt8 ? 16 : 7;
    c.seq_lens = {1, 0, 600, 33};
    c.num_query = {1, 2, 2, 1};
    c.window = cache == DType::kFp8E4M3 ? 100 : 0;
    c.share_prefix = true;
    ok &= CheckCase(c, rng, 3);
  }
  Verdict("CudaAttentionSanitizerTest.Small", ok);
}

#else

TEST(CudaAttentionTest, NeedsCuda) {
  GTEST_SKIP() << "skipped: kvcache was built without CUDA support";
}

#endif

}  // namespace
}  // namespace kvcache::testing
