#include "benchmarks/replay/step_graph.h"

namespace kvcache::replay {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "--cuda_graph: kvcache was built without CUDA support");
}

}  // namespace

absl::StatusOr<std::unique_ptr<StepGraph>> StepGraph::Capture(
    void*, const std::function<absl::Status()>&) {
  return NoCuda();
}
StepGraph::~StepGraph() = default;
absl::Status StepGraph::Launch(void*) const { return NoCuda(); }
absl::StatusOr<void*> CreateStepStream() { return NoCuda(); }
void DestroyStepStream(void*) {}

}  // namespace kvcache::replay
