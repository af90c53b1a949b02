// Device helpers shared by the cache kernels (16-byte vectors, lane groups, row
// indexing) and host helpers shared by their launchers (grid sizing,
// debug-build index checks). Included only by .cu files.

#ifndef KVCACHE_KERNELS_CUDA_UTIL_CUH_
#define KVCACHE_KERNELS_CUDA_UTIL_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype_dispatch.h"
#include "kvcache/cuda_check.h"

namespace kvcache::internal {

inline constexpr int kThreadsPerBlock = 128;

// N elements of T as one aligned vector (16, 8 or 4 bytes): one memory
// instruction.
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads a vector through the read-only path.
template <class V>
__device__ __forceinline__ V LoadVec(const V* __restrict__ p) {
  V out;
  if constexpr (sizeof(V) == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &u, sizeof(V));
  } else if constexpr (sizeof(V) == 8) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(&out, &u, sizeof(V));
  } else {
    static_assert(sizeof(V) == 4, "vectors are 4, 8 or 16 bytes");
    const unsigned int u = __ldg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&out, &u, sizeof(V));
  }
  return out;
}

// Mask of the kGroup consecutive lanes (aligned) that hold this lane.
template <int kGroup>
__device__ __forceinline__ unsigned GroupMask() {
  static_assert(kGroup >= 1 && kGroup <= 32 && (kGroup & (kGroup - 1)) == 0);
  if constexpr (kGroup == 32) {
    return 0xFFFFFFFFu;
  } else {
    const unsigned lane = threadIdx.x & 31u;
    return ((1u << kGroup) - 1u) << (lane & ~static_cast<unsigned>(kGroup - 1));
  }
}

// Max of m over the lane group (butterfly; every lane gets the result).
template <int kGroup>
__device__ __forceinline__ uint32_t GroupMax(uint32_t m, unsigned mask) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    m = max(m, __shfl_xor_sync(mask, m, offset, kGroup));
  }
  return m;
}

// row = token * heads + head; 32-bit division when the numbers allow it.
__device__ __forceinline__ void SplitRow(int64_t row, int64_t heads,
                                         int64_t* token, int64_t* head) {
  if (row <= 0xFFFFFFFFll && heads <= 0xFFFFFFFFll) {
    const uint32_t r = static_cast<uint32_t>(row);
    const uint32_t h = static_cast<uint32_t>(heads);
    const uint32_t t = r / h;
    *token = t;
    *head = r - t * h;
  } else {
    *token = row / heads;
    *head = row - *token * heads;
  }
}

// Number of blocks for `items` work items of which one block covers
// `per_block`, capped at a few waves of the device (kernels loop over the
// rest).
inline absl::StatusOr<int64_t> GridSize(int64_t items, int64_t per_block) {
  static std::atomic<int> sm_counts[64] = {};
  int device = 0;
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  int sms = device < 64 ? sm_counts[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) sm_counts[device].store(sms, std::memory_order_relaxed);
  }
  const int64_t cap = static_cast<int64_t>(sms) * 64;
  return std::max<int64_t>(1,
                           std::min((items + per_block - 1) / per_block, cap));
}

// Launches `kernel(params)` over `rows` (token, head) rows, `rows_per_block`
// rows to a block of kThreadsPerBlock threads, and checks the launch.
template <class Params>
absl::Status LaunchOverRows(void (*kernel)(Params), const Params& params,
                            int64_t rows, int64_t rows_per_block,
                            cudaStream_t stream) {
  absl::StatusOr<int64_t> blocks = GridSize(rows, rows_per_block);
  if (!blocks.ok()) return blocks.status();
  kernel<<<static_cast<unsigned>(*blocks), kThreadsPerBlock, 0, stream>>>(
      params);
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// The launch shared by the row kernels (quantize-write, gather): when
// `vectorize`, the 16-byte kernel `vec_kernel(group, vecs)` returns for the
// configuration DispatchRowConfig picks for `vectors_per_row`; otherwise the
// scalar kernel with one warp per row.
template <class Params, class VecKernelFor>
absl::Status LaunchRowKernel(const Params& params, int64_t rows, bool vectorize,
                             int64_t vectors_per_row, VecKernelFor&& vec_kernel,
                             void (*scalar_kernel)(Params),
                             cudaStream_t stream) {
  if (vectorize) {
    return DispatchRowConfig(
        vectors_per_row, [&](auto group, auto vecs) -> absl::Status {
          constexpr int kGroup = decltype(group)::value;
          return LaunchOverRows(vec_kernel(group, vecs), params, rows,
                                kThreadsPerBlock / kGroup, stream);
        });
  }
  return LaunchOverRows(scalar_kernel, params, rows, kThreadsPerBlock / 32,
                        stream);
}

// Copies n elements of a device array to the host for a debug-build check.
// Leaves *out empty (and the check skipped) while the stream is being captured
// into a graph.
template <class T>
absl::Status CopyForDebugCheck(const T* device, int64_t n, cudaStream_t stream,
                               std::vector<T>* out) {
  out->clear();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone || n == 0) return absl::OkStatus();
  out->resize(static_cast<size_t>(n));
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      out->data(), device, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

inline bool IsAligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// True when a strided [tokens, heads, row] operand of `elem`-byte elements can
// be read or written in 16-byte vectors: aligned base, and strides that keep
// every row 16-byte aligned.
inline bool RowsAligned16(const void* base, int64_t elem, int64_t tokens,
                          int64_t heads, int64_t token_stride,
                          int64_t head_stride) {
  return IsAligned16(base) &&
         (tokens <= 1 || (token_stride * elem) % 16 == 0) &&
         (heads <= 1 || (head_stride * elem) % 16 == 0);
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_CUDA_UTIL_CUH_
