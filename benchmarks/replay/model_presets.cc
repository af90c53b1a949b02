#include "benchmarks/replay/model_presets.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvcache::replay {
namespace {

LayerGroup Spec(int32_t window, int32_t heads, int32_t k, int32_t v,
                DType dtype) {
  LayerGroup g;
  g.kind = window > 0 ? AttentionKind::kSlidingWindow : AttentionKind::kFull;
  g.sliding_window = window;
  g.num_kv_heads = heads;
  g.head_size = k;
  g.head_size_v = v;
  g.cache_dtype = dtype;
  return g;
}

// Layers [0, n) split by `full(layer)` into a sliding and a full group.
std::vector<LayerGroup> Interleaved(int32_t n, bool (*full)(int32_t),
                                    LayerGroup sliding, LayerGroup all) {
  for (int32_t l = 0; l < n; ++l) (full(l) ? all : sliding).layers.push_back(l);
  return {sliding, all};
}

}  // namespace

std::vector<std::string> ModelPresetNames() {
  return {"llama3-8b", "gemma3-27b", "gpt-oss-120b", "deepseek-v3"};
}

absl::StatusOr<std::vector<LayerGroup>> ModelPreset(const std::string& model,
                                                    DType dtype) {
  if (model == "llama3-8b") {
    LayerGroup g = Spec(0, 8, 128, 128, dtype);
    for (int32_t l = 0; l < 32; ++l) g.layers.push_back(l);
    return std::vector<LayerGroup>{g};
  }
  if (model == "gemma3-27b") {  // Pattern: 5 local, 1 global.
    return Interleaved(
        62, [](int32_t l) { return l % 6 == 5; },
        Spec(1024, 16, 128, 128, dtype), Spec(0, 16, 128, 128, dtype));
  }
  if (model == "gpt-oss-120b") {  // Even layers sliding, odd layers full.
    return Interleaved(
        36, [](int32_t l) { return l % 2 == 1; }, Spec(128, 8, 64, 64, dtype),
        Spec(0, 8, 64, 64, dtype));
  }
  if (model == "deepseek-v3") {  // MLA: kv_lora_rank 512 + rope 64, no V.
    LayerGroup g = Spec(0, 1, 576, 0, dtype);
    for (int32_t l = 0; l < 61; ++l) g.layers.push_back(l);
    return std::vector<LayerGroup>{g};
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--model ", model, " is not one of ",
                   absl::StrJoin(ModelPresetNames(), ", ")));
}

std::vector<LayerGroup> AllFull(std::vector<LayerGroup> groups) {
  for (LayerGroup& g : groups) {
    g.kind = AttentionKind::kFull;
    g.sliding_window = 0;
  }
  return groups;
}

}  // namespace kvcache::replay
