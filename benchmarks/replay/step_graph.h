// StepGraph: a CUDA graph of the work a callback enqueues on one stream,
// captured once and launched again and again (the replay's --cuda_graph, as a
// serving engine captures its decode forward per padded batch size). Also the
// one stream the replay's graph steps run on.
//
// Move-only owner of the graph and its executable; not thread-safe. Without
// CUDA every call returns FailedPrecondition.

#ifndef KVCACHE_BENCHMARKS_REPLAY_STEP_GRAPH_H_
#define KVCACHE_BENCHMARKS_REPLAY_STEP_GRAPH_H_

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvcache::replay {

class StepGraph {
 public:
  // Captures what `body` enqueues on `stream` (a cudaStream_t that is not the
  // legacy default stream). The capture ends, and its error is returned, also
  // when `body` fails.
  static absl::StatusOr<std::unique_ptr<StepGraph>> Capture(
      void* stream, const std::function<absl::Status()>& body);
  ~StepGraph();
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  absl::Status Launch(void* stream) const;

 private:
  StepGraph(void* graph, void* exec) : graph_(graph), exec_(exec) {}
  void* graph_;  // cudaGraph_t
  void* exec_;   // cudaGraphExec_t
};

// A blocking stream (ordered with the legacy default stream), and its end.
absl::StatusOr<void*> CreateStepStream();
void DestroyStepStream(void* stream);

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_STEP_GRAPH_H_
