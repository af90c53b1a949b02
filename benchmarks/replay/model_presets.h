// Model shape presets for the replay tool (--model): the public KV-cache
// shapes of a few models as layer groups (core/layer_group.h). Plain
// functions; thread-safe.

#ifndef KVCACHE_BENCHMARKS_REPLAY_MODEL_PRESETS_H_
#define KVCACHE_BENCHMARKS_REPLAY_MODEL_PRESETS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "api/kv_cache_config.h"

namespace kvcache::replay {

// The names --model accepts.
std::vector<std::string> ModelPresetNames();

// The groups of `model` with every group's cache in `cache_dtype`:
//   llama3-8b     32 full layers, 8 KV heads, head 128
//   gemma3-27b    62 layers, every 6th full, the rest sliding (1024 tokens);
//                 16 KV heads, head 128
//   gpt-oss-120b  36 layers alternating sliding (128 tokens) and full; 8 KV
//                 heads, head 64
//   deepseek-v3   61 full MLA layers: one latent head of 512 + 64 (rope)
//                 dims, K only
// InvalidArgument naming the model for any other name.
absl::StatusOr<std::vector<LayerGroup>> ModelPreset(const std::string& model,
                                                    DType cache_dtype);

// The same groups with every layer full attention.
std::vector<LayerGroup> AllFull(std::vector<LayerGroup> groups);

}  // namespace kvcache::replay

#endif  // KVCACHE_BENCHMARKS_REPLAY_MODEL_PRESETS_H_
