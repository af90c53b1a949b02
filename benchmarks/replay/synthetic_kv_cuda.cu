#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "benchmarks/replay/synthetic_kv_cuda.h"
#include "benchmarks/replay/synthetic_row.h"

namespace kvcache::replay {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// One warp per (token, K or V, head) row: copies the row's window of the table.
__global__ void __launch_bounds__(kThreads)
    FillSyntheticKernel(const SyntheticFillParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.num_tokens * 2 * p.num_heads;
  for (int64_t row =
           static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t t = row / (2 * p.num_heads);
    const int rest = static_cast<int>(row - t * 2 * p.num_heads);
    const bool is_value = rest >= p.num_heads;
    const int head = is_value ? rest - p.num_heads : rest;
    const int d = is_value ? p.head_size_v : p.head_size;
    const uint16_t* src =
        p.table + SyntheticRowOffset(p.layer, is_value, p.tokens[t],
                                     p.positions[t], head);
    uint16_t* dst = p.out + t * p.token_stride +
                    (is_value ? p.value_offset : 0) +
                    static_cast<int64_t>(head) * d;
    for (int i = lane; i < d; i += 32) dst[i] = src[i];
  }
}

}  // namespace

absl::Status FillSyntheticCuda(const SyntheticFillParams& p, void* stream) {
  if (p.num_tokens == 0) return absl::OkStatus();
  const int64_t rows = p.num_tokens * 2 * p.num_heads;
  const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, 65535);
  FillSyntheticKernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return absl::InternalError(
        absl::StrCat("FillSyntheticKernel launch: ", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace kvcache::replay
