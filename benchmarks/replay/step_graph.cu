#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "benchmarks/replay/step_graph.h"

namespace kvcache::replay {
namespace {

absl::Status Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<StepGraph>> StepGraph::Capture(
    void* stream, const std::function<absl::Status()>& body) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  absl::Status begin = Check(
      cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
  if (!begin.ok()) return begin;
  const absl::Status captured = body();
  cudaGraph_t graph = nullptr;
  const absl::Status ended =
      Check(cudaStreamEndCapture(s, &graph), "end capture");
  if (!captured.ok() || !ended.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return captured.ok() ? ended : captured;
  }
  cudaGraphExec_t exec = nullptr;
  if (absl::Status st =
          Check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
      !st.ok()) {
    cudaGraphDestroy(graph);
    return st;
  }
  return std::unique_ptr<StepGraph>(new StepGraph(graph, exec));
}

StepGraph::~StepGraph() {
  cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
}

absl::Status StepGraph::Launch(void* stream) const {
  return Check(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_),
                               static_cast<cudaStream_t>(stream)),
               "graph launch");
}

absl::StatusOr<void*> CreateStepStream() {
  cudaStream_t s = nullptr;
  if (absl::Status st = Check(cudaStreamCreate(&s), "stream"); !st.ok()) {
    return st;
  }
  return static_cast<void*>(s);
}

void DestroyStepStream(void* stream) {
  if (stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}

}  // namespace kvcache::replay
