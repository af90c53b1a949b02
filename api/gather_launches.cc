#include "api/gather_launches.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "api/tensor_checks.h"
#include "core/dtype.h"
#include "core/status_macros.h"
#include "kernels/kernel_validation.h"

namespace kvcache::internal {

absl::Status CheckGatherRange(const GatherRequest& r, int64_t length,
                              bool include_in_flight) {
  if (r.token_begin < 0 || r.num_tokens < 0 || r.token_begin > length ||
      r.num_tokens > length - r.token_begin) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gather of ", r.num_tokens, " tokens from token ", r.token_begin,
        " of sequence ", r.sequence, ": it has ", length,
        include_in_flight ? " readable" : " computed", " tokens"));
  }
  return absl::OkStatus();
}

absl::Status AppendGatherBlocks(const GatherRequest& r, size_t index,
                                absl::Span<const BlockId> table,
                                int64_t block_size, int64_t capacity,
                                std::vector<BlockId>* ranges) {
  const int64_t first = r.token_begin / block_size;
  const int64_t last = (r.token_begin + r.num_tokens - 1) / block_size;
  if (static_cast<int64_t>(ranges->size()) + (last - first + 1) > capacity) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gather spans more than ", capacity,
        " blocks (8 x max_blocks_per_sequence, or max_sequences_per_step x "
        "it when smaller) at request ",
        index, " (sequence ", r.sequence, "): split it"));
  }
  ranges->insert(ranges->end(), table.begin() + first,
                 table.begin() + last + 1);
  return absl::OkStatus();
}

absl::StatusOr<DenseKV> CheckGatherBatchOutputs(const CacheBackend& backend,
                                                int64_t total,
                                                const TensorView& key_out,
                                                const TensorView& value_out,
                                                int layer) {
  const CacheLayout& layout = backend.layer(layer).layout;
  ExpectedKV expected;
  expected.num_tokens = total;
  expected.num_heads = layout.num_heads;
  expected.head_size = layout.head_size;
  expected.any_float_dtype = true;
  expected.memory = backend.memory_kind();
  expected.device = backend.ordinal();
  DenseKV output;
  int64_t checked_tokens = 0;
  KVCACHE_RETURN_IF_ERROR(CheckKVPair(key_out, value_out, expected,
                                      layout.head_size_v, &output,
                                      &checked_tokens));
  // Outputs that overlap each other or the cache are refused before anything
  // runs.
  KVCACHE_RETURN_IF_ERROR(
      CheckGatherOutputs(output, total, layout, backend.storage()));
  return output;
}

absl::StatusOr<std::vector<GatherParams>> BuildGatherLaunches(
    absl::Span<const GatherRequest> requests,
    absl::Span<const int64_t> range_begin, const int32_t* device_ranges,
    const LayerCache& cache, int64_t block_size, const DenseKV& output,
    int layer) {
  const size_t elem = DTypeSize(output.dtype);
  const std::string context = absl::StrCat("gather of layer ", layer);
  std::vector<GatherParams> launches;
  launches.reserve(requests.size());
  int64_t row = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const GatherRequest& r = requests[i];
    if (r.num_tokens == 0) continue;
    const int64_t first = r.token_begin / block_size;
    GatherParams& params = launches.emplace_back();
    params.cache = cache;
    params.block_table = device_ranges + range_begin[i];
    params.block_table_len =
        (r.token_begin + r.num_tokens - 1) / block_size - first + 1;
    params.token_begin = r.token_begin - first * block_size;
    params.num_tokens = r.num_tokens;
    params.output = output;
    params.output.key =
        static_cast<char*>(output.key) + row * output.key_token_stride * elem;
    if (output.value != nullptr) {  // Absent for a K-only cache.
      params.output.value = static_cast<char*>(output.value) +
                            row * output.value_token_stride * elem;
    }
    row += r.num_tokens;
    // Everything a kernel would refuse is refused before any runs.
    KVCACHE_RETURN_IF_ERROR(Annotate(ValidateGather(params), context));
  }
  return launches;
}

}  // namespace kvcache::internal
