// The decode step in a CUDA graph (issue #14), on a GPU host: a 4-layer decode
// step whose Appends are captured once in a CUDA graph (padded to the captured
// token count), then 200 steps of a scenario with batches of 1..captured size
// (padding), forks (copy-on-write in ReserveGraphStep, before the replay) and
// prefix hits, each step ReserveGraphStep + copy of the step's K/V into the
// graph's fixed input buffers + graph launch + Commit. The caches and scales
// must be byte-identical to the same steps without a graph (plain Reserve /
// Append / Commit on CUDA) and to the CPU backend. Also with layer groups
// (three sliding-window layers and a full one, one block table each): each
// captured Append reads its layer's table's fixed slot mapping. Prints PASS
// or FAIL per case. KVCACHE_TEST_SEED=<n> reruns one seed.

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "testing/cuda_test_util.h"
#include "testing/test_seed.h"
#include "tests/graph_step_scenario.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache {
namespace {

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

using testing::ScenarioOptions;
using testing::StepKV;

absl::Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

// K/V of up to `rows` tokens per layer in device memory.
class DeviceKV {
 public:
  DeviceKV(const ScenarioOptions& o, int64_t rows) : o_(o), rows_(rows) {
    for (int l = 0; l < o.num_layers; ++l) {
      void* k = nullptr;
      void* v = nullptr;
      cudaMalloc(&k, KBytes(rows));
      cudaMalloc(&v, VBytes(rows));
      k_.push_back(k);
      v_.push_back(v);
    }
  }
  ~DeviceKV() {
    for (void* p : k_) cudaFree(p);
    for (void* p : v_) cudaFree(p);
  }
  absl::Status Upload(const StepKV& kv, cudaStream_t stream) {
    if (kv.rows > rows_) return absl::InternalError("too many rows");
    for (int l = 0; l < o_.num_layers; ++l) {
      if (absl::Status s =
              Cuda(cudaMemcpyAsync(k_[l], kv.k[l].data(), KBytes(kv.rows),
                                   cudaMemcpyHostToDevice, stream),
                   "K upload");
          !s.ok()) {
        return s;
      }
      if (absl::Status s =
              Cuda(cudaMemcpyAsync(v_[l], kv.v[l].data(), VBytes(kv.rows),
                                   cudaMemcpyHostToDevice, stream),
                   "V upload");
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  TensorView K(int l, int64_t rows) const {
    return TensorView::Contiguous(k_[l], DType::kBFloat16,
                                  {rows, o_.num_kv_heads, o_.head_size},
                                  MemoryKind::kCuda);
  }
  TensorView V(int l, int64_t rows) const {
    return TensorView::Contiguous(v_[l], DType::kBFloat16,
                                  {rows, o_.num_kv_heads, o_.head_size_v},
                                  MemoryKind::kCuda);
  }

 private:
  size_t KBytes(int64_t rows) const {
    return rows * o_.num_kv_heads * o_.head_size * 2;
  }
  size_t VBytes(int64_t rows) const {
    return rows * o_.num_kv_heads * o_.head_size_v * 2;
  }
  const ScenarioOptions o_;
  const int64_t rows_;
  std::vector<void*> k_, v_;
};

// Plain steps on the CPU (host K/V) or on CUDA (K/V uploaded first).
class PlainRunner : public testing::StepRunner {
 public:
  PlainRunner(const ScenarioOptions& o, bool cuda, cudaStream_t stream)
      : o_(o), cuda_(cuda), stream_(stream), kv_(o, 64) {}
  absl::Status Prefill(KVCacheManager& m,
                       absl::Span<const ReserveRequest> batch,
                       const StepKV& kv) override {
    absl::StatusOr<StepPlanInfo> plan = m.Reserve(batch, stream_);
    if (!plan.ok()) return plan.status();
    const int64_t t = plan->num_tokens;
    if (cuda_) {
      if (absl::Status s = kv_.Upload(kv, stream_); !s.ok()) return s;
    }
    for (int l = 0; l < o_.num_layers; ++l) {
      TensorView k = cuda_ ? kv_.K(l, t) : Host(kv.k[l], t, o_.head_size);
      TensorView v = cuda_ ? kv_.V(l, t) : Host(kv.v[l], t, o_.head_size_v);
      if (absl::Status s = m.Append(plan->id, l, k, v, stream_); !s.ok()) {
        return s;
      }
    }
    return m.Commit(plan->id);
  }
  absl::Status Decode(KVCacheManager& m, absl::Span<const ReserveRequest> batch,
                      int64_t, const StepKV& kv) override {
    return Prefill(m, batch, kv);
  }

 protected:
  TensorView Host(const std::vector<uint16_t>& x, int64_t rows, int d) const {
    return TensorView::Contiguous(const_cast<uint16_t*>(x.data()),
                                  DType::kBFloat16, {rows, o_.num_kv_heads, d});
  }
  const ScenarioOptions o_;
  const bool cuda_;
  cudaStream_t stream_;
  DeviceKV kv_;
};

// Decode steps through one CUDA graph captured at the first decode step.
class GraphRunner : public PlainRunner {
 public:
  GraphRunner(const ScenarioOptions& o, cudaStream_t stream)
      : PlainRunner(o, true, stream), graph_kv_(o, o.capture_tokens) {}
  ~GraphRunner() override {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
  }
  absl::Status Decode(KVCacheManager& m, absl::Span<const ReserveRequest> batch,
                      int64_t padded, const StepKV& kv) override {
    absl::StatusOr<StepPlanInfo> plan =
        m.ReserveGraphStep(batch, padded, stream_);
    if (!plan.ok()) return plan.status();
    // The step's K/V into the graph's fixed inputs (an engine's forward
    // writes them there).
    if (absl::Status s = graph_kv_.Upload(kv, stream_); !s.ok()) return s;
    if (exec_ == nullptr) {
      if (absl::Status s = Capture(m, plan->id, padded); !s.ok()) return s;
    }
    if (absl::Status s = Cuda(cudaGraphLaunch(exec_, stream_), "launch");
        !s.ok()) {
      return s;
    }
    ++replays;
    return m.Commit(plan->id);
  }
  int64_t replays = 0;

 private:
  absl::Status Capture(KVCacheManager& m, uint64_t plan, int64_t padded) {
    if (absl::Status s = Cuda(
            cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
            "begin capture");
        !s.ok()) {
      return s;
    }
    absl::Status appended;
    for (int l = 0; l < o_.num_layers && appended.ok(); ++l) {
      appended = m.Append(plan, l, graph_kv_.K(l, padded),
                          graph_kv_.V(l, padded), stream_);
    }
    absl::Status ended =
        Cuda(cudaStreamEndCapture(stream_, &graph_), "end capture");
    if (!appended.ok()) return appended;
    if (!ended.ok()) return ended;
    return Cuda(cudaGraphInstantiate(&exec_, graph_, 0), "instantiate");
  }

  DeviceKV graph_kv_;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

struct Case {
  DType cache;
  int32_t sliding_window;  // > 0: layer groups (graph_step_scenario.h).
};

class GraphStepCudaTest : public ::testing::TestWithParam<Case> {};

TEST_P(GraphStepCudaTest, CapturedStepMatchesPlainStepsAndTheCpuBackend) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const uint64_t seed = kvcache::testing::TestSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  ScenarioOptions o;
  o.seed = seed;
  o.steps = 200;
  o.num_layers = 4;
  o.capture_tokens = 8;
  o.head_size = 128;
  o.head_size_v = 64;
  o.cache_dtype = GetParam().cache;
  o.sliding_window = GetParam().sliding_window;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
            cudaSuccess);
  auto cpu =
      KVCacheManager::Create(testing::ScenarioConfig(o, Backend::kCpu, false));
  auto plain =
      KVCacheManager::Create(testing::ScenarioConfig(o, Backend::kCuda, false));
  auto graph =
      KVCacheManager::Create(testing::ScenarioConfig(o, Backend::kCuda, true));
  ASSERT_TRUE(cpu.ok() && plain.ok() && graph.ok())
      << cpu.status() << plain.status() << graph.status();
  testing::ScenarioCounts counts[3];
  {
    PlainRunner cpu_runner(o, false, nullptr);
    PlainRunner plain_runner(o, true, stream);
    GraphRunner graph_runner(o, stream);
    absl::Status s = testing::RunScenario(o, **cpu, cpu_runner, &counts[0]);
    ASSERT_TRUE(s.ok()) << "CPU: " << s;
    s = testing::RunScenario(o, **plain, plain_runner, &counts[1]);
    ASSERT_TRUE(s.ok()) << "CUDA plain: " << s;
    s = testing::RunScenario(o, **graph, graph_runner, &counts[2]);
    ASSERT_TRUE(s.ok()) << "CUDA graph: " << s;
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(graph_runner.replays, o.steps);
  }
  EXPECT_GT(counts[2].padded_steps, 0);
  EXPECT_GT(counts[2].forks, 0);
  EXPECT_GT(counts[2].prefix_hit_tokens, 0);
  EXPECT_GT(counts[2].block_copies, 0);
  auto device_copy = [](void* dst, const void* src, size_t bytes) {
    return Cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "copy");
  };
  auto host_copy = [](void* dst, const void* src, size_t bytes) {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  };
  auto cpu_bytes = testing::CacheBytes(**cpu, host_copy);
  auto plain_bytes = testing::CacheBytes(**plain, device_copy);
  auto graph_bytes = testing::CacheBytes(**graph, device_copy);
  ASSERT_TRUE(cpu_bytes.ok() && plain_bytes.ok() && graph_bytes.ok());
  const bool same_as_plain = *graph_bytes == *plain_bytes;
  const bool same_as_cpu = *graph_bytes == *cpu_bytes;
  EXPECT_TRUE(same_as_plain) << "graph caches differ from plain CUDA steps";
  EXPECT_TRUE(same_as_cpu) << "graph caches differ from the CPU backend";
  std::printf(
      "graph_step_cuda_test %s%s: %lld steps (%lld padded), %lld forks, %lld "
      "block copies, %lld prefix-hit tokens: graph == plain %s, graph == CPU "
      "%s: %s\n",
      std::string(DTypeName(o.cache_dtype)).c_str(),
      o.sliding_window > 0 ? " (layer groups)" : "",
      static_cast<long long>(counts[2].decode_steps),
      static_cast<long long>(counts[2].padded_steps),
      static_cast<long long>(counts[2].forks),
      static_cast<long long>(counts[2].block_copies),
      static_cast<long long>(counts[2].prefix_hit_tokens),
      same_as_plain ? "yes" : "NO", same_as_cpu ? "yes" : "NO",
      same_as_plain && same_as_cpu ? "PASS" : "FAIL");
  EXPECT_TRUE((*graph)->Validate().ok());
  cudaStreamDestroy(stream);
}

INSTANTIATE_TEST_SUITE_P(CacheDTypes, GraphStepCudaTest,
                         ::testing::Values(Case{DType::kInt8, 0},
                                           Case{DType::kFp8E4M3, 0},
                                           Case{DType::kBFloat16, 0},
                                           Case{DType::kInt8, 6},
                                           Case{DType::kFp8E4M3, 6}));

#else

TEST(GraphStepCudaTest, NeedsCuda) {
  GTEST_SKIP() << "skipped: kvcache was built without CUDA support";
}

#endif

}  // namespace
}  // namespace kvcache
