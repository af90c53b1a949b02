// The decode step at the cost of launches (issue #14), on a GPU host, all
// figures from one run (medians; host times by steady_clock, GPU times by CUDA
// events):
//
//   1. Append host time per layer (checks, bookkeeping, launch; a decode step
//      of 1..256 sequences) vs a bare launch of the same kernel (the
//      quantize-write launcher called directly with the same params).
//      Bar: ratio <= 1.5.
//   2. A 32-layer decode step of 256 sequences with its Appends in a CUDA
//      graph: host time of ReserveGraphStep + graph launch + Commit
//      (bar: 30 us; the engine's batch built once, outside the timing; also
//      each part alone), and GPU time per layer inside the graph vs the bare
//      kernel launched 32 times in a graph of its own (bar: 2.0 us per layer).
//
// bazel run -c opt //benchmarks:graph_step_benchmark (or from the GPU bundle).
// Prints PASS/FAIL per bar; exits 1 when CUDA is unavailable.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "api/kv_cache_manager.h"
#include "kernels/cuda_kernels.h"
#include "kernels/kernel_params.h"

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace kvcache {
namespace {

#if defined(KVCACHE_HAVE_CUDA_RUNTIME)

constexpr int kLayers = 32;
constexpr int kHeads = 8;
constexpr int kHeadSize = 128;
constexpr int kPrompt = 512;
constexpr int kMaxSeqs = 256;
constexpr int kSteps = 200;

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}
double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "FAIL %s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}
void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "FAIL %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

struct Bench {
  std::unique_ptr<KVCacheManager> m;
  cudaStream_t stream = nullptr;
  void* k = nullptr;  // bf16 [kMaxSeqs, kHeads, kHeadSize], also V.
  std::vector<uint64_t> plans;
};

TensorView KV(const Bench& b, int64_t rows) {
  return TensorView::Contiguous(b.k, DType::kBFloat16,
                                {rows, kHeads, kHeadSize}, MemoryKind::kCuda);
}

Bench Setup() {
  Bench b;
  KVCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_size = kHeadSize;
  c.block_size = 16;
  c.cache_dtype = DType::kInt8;
  c.input_dtype = DType::kBFloat16;
  c.backend = Backend::kCuda;
  c.num_blocks = kMaxSeqs * ((kPrompt + 2 * kSteps + 64) / 16 + 2);
  c.max_tokens_per_step = kPrompt * 2;
  c.max_sequences_per_step = kMaxSeqs;
  c.max_blocks_per_sequence = 128;
  c.graph_max_tokens = kMaxSeqs;
  c.enable_prefix_caching = false;
  auto m = KVCacheManager::Create(c);
  Check(m.status(), "Create");
  b.m = *std::move(m);
  Check(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking), "stream");
  const size_t bytes = size_t{kPrompt} * kHeads * kHeadSize * 2;
  Check(cudaMalloc(&b.k, bytes), "malloc");
  std::vector<uint16_t> host(bytes / 2);
  std::mt19937 rng(1);
  for (uint16_t& x : host) x = 0x3c00 + (rng() & 0x3ff);  // bf16 in [1, 2)
  Check(cudaMemcpy(b.k, host.data(), bytes, cudaMemcpyHostToDevice), "copy");
  std::vector<TokenId> prompt(kPrompt, 5);
  for (int s = 0; s < kMaxSeqs; ++s) {
    Check(b.m->AddSequence(s, prompt).status(), "AddSequence");
    auto plan = b.m->Reserve({ReserveRequest{s, {}, kPrompt}}, b.stream);
    Check(plan.status(), "Reserve prefill");
    for (int l = 0; l < kLayers; ++l) {
      Check(b.m->Append(plan->id, l, KV(b, kPrompt), KV(b, kPrompt), b.stream),
            "Append prefill");
    }
    Check(b.m->Commit(plan->id), "Commit prefill");
  }
  Check(cudaStreamSynchronize(b.stream), "sync");
  return b;
}

std::vector<ReserveRequest> Batch(int n) {
  std::vector<ReserveRequest> batch;
  for (int s = 0; s < n; ++s) batch.push_back(ReserveRequest{s, {7}, 1});
  return batch;
}

QuantizeWriteParams BareParams(const Bench& b, int layer, const int64_t* slots,
                               int64_t n) {
  const LayerView v = *b.m->GetLayerView(layer);
  QuantizeWriteParams p;
  p.input.key = b.k;
  p.input.value = b.k;
  p.input.dtype = DType::kBFloat16;
  p.input.key_token_stride = p.input.value_token_stride = kHeads * kHeadSize;
  p.input.key_head_stride = p.input.value_head_stride = kHeadSize;
  p.num_tokens = n;
  p.slot_mapping = slots;
  p.cache.layout.num_blocks = v.num_blocks;
  p.cache.layout.block_size = v.block_size;
  p.cache.layout.num_heads = v.num_kv_heads;
  p.cache.layout.head_size = v.head_size;
  p.cache.layout.head_size_v = v.head_size_v;
  p.cache.layout.cache_dtype = v.cache_dtype;
  p.cache.key_cache = v.key_cache;
  p.cache.value_cache = v.value_cache;
  p.cache.key_scale = v.key_scale;
  p.cache.value_scale = v.value_scale;
  return p;
}

// 1. Append's host time per layer vs the bare launcher, decode of n seqs.
bool AppendVsBare(Bench& b, int n) {
  std::vector<double> append_us, bare_us;
  for (int step = 0; step < 50; ++step) {
    auto plan = b.m->Reserve(Batch(n), b.stream);
    Check(plan.status(), "Reserve");
    Check(cudaStreamSynchronize(b.stream), "sync");
    for (int l = 0; l < kLayers; ++l) {
      const auto t0 = Clock::now();
      Check(b.m->Append(plan->id, l, KV(b, n), KV(b, n), b.stream), "Append");
      append_us.push_back(Us(t0, Clock::now()));
    }
    Check(cudaStreamSynchronize(b.stream), "sync");
    for (int l = 0; l < kLayers; ++l) {
      const QuantizeWriteParams p = BareParams(b, l, plan->slot_mapping, n);
      const auto t0 = Clock::now();
      Check(QuantizeWriteCuda(p, b.stream), "bare launch");
      bare_us.push_back(Us(t0, Clock::now()));
    }
    Check(cudaStreamSynchronize(b.stream), "sync");
    Check(b.m->Abort(plan->id), "Abort");  // Lengths stay put.
  }
  const double a = Median(append_us), r = Median(bare_us);
  const bool pass = a <= 1.5 * r;
  std::printf(
      "append host time, decode %3d seqs: Append %6.2f us | bare launch %6.2f "
      "us | ratio %.2f (bar 1.5): %s\n",
      n, a, r, a / r, pass ? "PASS" : "FAIL");
  return pass;
}

// 2. The 32-layer decode step of 256 sequences in a CUDA graph.
bool GraphStep(Bench& b) {
  const int n = kMaxSeqs;
  const GraphStepInputs in = *b.m->GraphStep();
  auto first = b.m->ReserveGraphStep(Batch(n), n, b.stream);
  Check(first.status(), "ReserveGraphStep");
  cudaGraph_t graph = nullptr, bare_graph = nullptr;
  cudaGraphExec_t exec = nullptr, bare_exec = nullptr;
  Check(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeThreadLocal),
        "capture");
  for (int l = 0; l < kLayers; ++l) {
    Check(b.m->Append(first->id, l, KV(b, n), KV(b, n), b.stream), "Append");
  }
  Check(cudaStreamEndCapture(b.stream, &graph), "end capture");
  Check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  // The bare kernel, 32 launches on the same inputs, in a graph of its own.
  Check(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeThreadLocal),
        "capture");
  for (int l = 0; l < kLayers; ++l) {
    Check(QuantizeWriteCuda(BareParams(b, l, in.slot_mapping, n), b.stream),
          "bare launch");
  }
  Check(cudaStreamEndCapture(b.stream, &bare_graph), "end capture");
  Check(cudaGraphInstantiate(&bare_exec, bare_graph, 0), "instantiate");
  Check(cudaGraphLaunch(exec, b.stream), "launch");
  Check(b.m->Commit(first->id), "Commit capture");
  Check(cudaStreamSynchronize(b.stream), "sync");

  cudaEvent_t start, end;
  Check(cudaEventCreate(&start), "event");
  Check(cudaEventCreate(&end), "event");
  std::vector<double> host_us, reserve_us, launch_us, commit_us, layer_us,
      bare_layer_us;
  // The engine's batch, built once (as an engine keeps its own): the figures
  // are the library's host work and the launch.
  const std::vector<ReserveRequest> batch = Batch(n);
  for (int step = 0; step < kSteps; ++step) {
    const auto t0 = Clock::now();
    absl::StatusOr<StepPlanInfo> plan =
        b.m->ReserveGraphStep(batch, n, b.stream);
    Check(plan.status(), "ReserveGraphStep");
    const auto t1 = Clock::now();
    Check(cudaEventRecord(start, b.stream), "record");
    Check(cudaGraphLaunch(exec, b.stream), "launch");
    Check(cudaEventRecord(end, b.stream), "record");
    const auto t2 = Clock::now();
    Check(b.m->Commit(plan->id), "Commit");
    const auto t3 = Clock::now();
    host_us.push_back(Us(t0, t3));
    reserve_us.push_back(Us(t0, t1));
    launch_us.push_back(Us(t1, t2));
    commit_us.push_back(Us(t2, t3));
    Check(cudaEventSynchronize(end), "sync");
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, start, end), "elapsed");
    layer_us.push_back(1000.0 * ms / kLayers);
    Check(cudaEventRecord(start, b.stream), "record");
    Check(cudaGraphLaunch(bare_exec, b.stream), "launch");
    Check(cudaEventRecord(end, b.stream), "record");
    Check(cudaEventSynchronize(end), "sync");
    Check(cudaEventElapsedTime(&ms, start, end), "elapsed");
    bare_layer_us.push_back(1000.0 * ms / kLayers);
  }
  const double host = Median(host_us), layer = Median(layer_us),
               bare = Median(bare_layer_us);
  const bool host_pass = host <= 30.0, layer_pass = layer <= 2.0;
  std::printf(
      "graph step, 32 layers x 256 seqs: host time ReserveGraphStep + launch + "
      "Commit %.1f us (ReserveGraphStep alone %.1f us; bar 30 us): %s\n",
      host, Median(reserve_us), host_pass ? "PASS" : "FAIL");
  std::printf(
      "graph step, host time by part (medians): ReserveGraphStep %.1f us | "
      "event + graph launch + event %.1f us | Commit %.1f us\n",
      Median(reserve_us), Median(launch_us), Median(commit_us));
  std::printf(
      "graph step, GPU time per layer in the graph %.2f us | bare kernel in a "
      "graph %.2f us | ratio %.2f (bar 2.0 us per layer): %s\n",
      layer, bare, layer / bare, layer_pass ? "PASS" : "FAIL");
  cudaGraphExecDestroy(exec);
  cudaGraphExecDestroy(bare_exec);
  cudaGraphDestroy(graph);
  cudaGraphDestroy(bare_graph);
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  return host_pass && layer_pass;
}

int Main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "graph_step_benchmark: no CUDA device\n");
    return 1;
  }
  Bench b = Setup();
  bool pass = true;
  for (int n : {1, 16, 64, 256}) pass = AppendVsBare(b, n) && pass;
  pass = GraphStep(b) && pass;
  std::printf("graph_step_benchmark: %s\n", pass ? "PASS" : "FAIL");
  cudaFree(b.k);
  cudaStreamDestroy(b.stream);
  return 0;
}

#else

int Main() {
  std::fprintf(stderr, "graph_step_benchmark: built without CUDA\n");
  return 1;
}

#endif

}  // namespace
}  // namespace kvcache

int main() { return kvcache::Main(); }
