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
#include "core/cuda_check.h"
#include "kernels/dtype_dispatch.h"
#include "kernels/fast_divmod.h"
#include "kernels/kernel_params.h"
#include "kernels/row_ref.h"

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

// Programmatic dependent launch (sm_90 and newer; no-ops before): a kernel
// launched with the programmatic-serialization attribute may start while the
// previous kernel in its stream finishes. WaitForPriorGrids blocks until that
// kernel has completed and its writes are visible, so every kernel calls it
// before its first global access; AllowDependentGrids lets the next such
// kernel be scheduled as this one's blocks retire (it still waits for this
// kernel's completion in its own WaitForPriorGrids).
__device__ __forceinline__ void WaitForPriorGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowDependentGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// What the launchers need to know of the current device (cached per device).
struct DeviceLaunchInfo {
  int sms = 0;
  bool programmatic_launch = false;  // Compute capability 9.0 or newer.
};

inline absl::StatusOr<DeviceLaunchInfo> CurrentDeviceLaunchInfo() {
  static std::atomic<int> cached[64] = {};  // sms * 2 + pdl, 0 = unknown.
  int device = 0;
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  int packed = device < 64 ? cached[device].load(std::memory_order_relaxed) : 0;
  if (packed == 0) {
    int sms = 0, major = 0;
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(
        &major, cudaDevAttrComputeCapabilityMajor, device));
    packed = sms * 2 + (major >= 9 ? 1 : 0);
    if (device < 64) cached[device].store(packed, std::memory_order_relaxed);
  }
  DeviceLaunchInfo info;
  info.sms = packed / 2;
  info.programmatic_launch = (packed & 1) != 0;
  return info;
}

// Number of blocks for `items` work items of which one block covers
// `per_block`, capped at `blocks_per_sm` blocks per multiprocessor (kernels
// loop over the rest).
inline int64_t GridSize(const DeviceLaunchInfo& info, int64_t items,
                        int64_t per_block, int64_t blocks_per_sm = 64) {
  const int64_t cap = static_cast<int64_t>(info.sms) * blocks_per_sm;
  return std::max<int64_t>(1,
                           std::min((items + per_block - 1) / per_block, cap));
}

// How a row kernel's grid is sized (benchmarks/results/NOTES.md has the
// measurements behind both).
enum class RowGrid {
  // About two rows per lane group: ceil(rows / 2 / groups per block) blocks
  // plus 1/32 more, so that the last blocks get one row and the tail is short.
  // Grids that fit in one wave (decode sizes) keep one row per group: there
  // latency, not bandwidth, is what counts.
  kTwoRowsPerGroup,
  // As many blocks as the device holds at once, each looping over rows.
  kResident,
};

// Launches kernel<<<blocks, threads, 0, stream>>>(args...), with programmatic
// dependent launch allowed where the device has it, and checks the launch.
template <class... Params, class... Args>
absl::Status LaunchKernel(void (*kernel)(Params...), int64_t blocks,
                          int threads, bool programmatic_launch,
                          cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (programmatic_launch) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, kernel, args...));
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// Blocks for a row kernel of `threads` threads covering `rows_per_block` rows
// at a time.
inline absl::StatusOr<int64_t> RowGridSize(const void* kernel, int threads,
                                           int64_t rows_per_block, int64_t rows,
                                           RowGrid grid,
                                           const DeviceLaunchInfo& info) {
  const int64_t exact =
      std::max<int64_t>(1, (rows + rows_per_block - 1) / rows_per_block);
  if (grid == RowGrid::kTwoRowsPerGroup) {
    if (exact <= static_cast<int64_t>(info.sms) * 8) return exact;
    const int64_t half = (exact + 1) / 2;
    return std::min<int64_t>(exact, half + half / 32);
  }
  int per_sm = 0;
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, threads, 0));
  return std::min<int64_t>(
      exact, std::max<int64_t>(1, static_cast<int64_t>(per_sm) * info.sms));
}

// The launch shared by the row kernels (quantize-write, gather), which take
// (params, RowDividers): when `vectorize`, the 16-byte kernel
// `vec_kernel(group, vecs)` returns for the configuration DispatchRowConfig
// picks for `vectors_per_row`, kThreadsPerBlock threads to a block and the grid
// `grid` describes; otherwise the scalar kernel with one warp per row. Both
// are launched with programmatic dependent launch allowed where the device has
// it (sm_90 and newer).
template <class Params, class VecKernelFor>
absl::Status LaunchRowKernel(const Params& params, int64_t rows, bool vectorize,
                             int64_t vectors_per_row, VecKernelFor&& vec_kernel,
                             void (*scalar_kernel)(Params, RowDividers),
                             RowGrid grid, cudaStream_t stream) {
  absl::StatusOr<DeviceLaunchInfo> info = CurrentDeviceLaunchInfo();
  if (!info.ok()) return info.status();
  // Divisors are at most 2^31 - 1 (validated sizes are far smaller).
  RowDividers dividers;
  dividers.heads = FastDivmod::Make(static_cast<uint32_t>(std::min<int64_t>(
      params.cache.layout.num_heads, FastDivmod::kDividendLimit - 1)));
  dividers.block_size =
      FastDivmod::Make(static_cast<uint32_t>(std::min<int64_t>(
          params.cache.layout.block_size, FastDivmod::kDividendLimit - 1)));
  if (vectorize) {
    return DispatchRowConfig(
        vectors_per_row, [&](auto group, auto vecs) -> absl::Status {
          constexpr int kGroup = decltype(group)::value;
          auto* kernel = vec_kernel(group, vecs);
          absl::StatusOr<int64_t> blocks = RowGridSize(
              reinterpret_cast<const void*>(kernel), kThreadsPerBlock,
              kThreadsPerBlock / kGroup, rows, grid, *info);
          if (!blocks.ok()) return blocks.status();
          return LaunchKernel(kernel, *blocks, kThreadsPerBlock,
                              info->programmatic_launch, stream, params,
                              dividers);
        });
  }
  return LaunchKernel(
      scalar_kernel, GridSize(*info, rows, kThreadsPerBlock / 32),
      kThreadsPerBlock, info->programmatic_launch, stream, params, dividers);
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

// True when a row kernel may use 16-byte vectors on the dense operand `dense`
// (elements of type T) and the caches: every dense row 16-byte aligned, and
// aligned caches (whose rows are whole vectors: validated head sizes).
template <class T>
bool CanVectorizeRows(const DenseKV& dense, int64_t num_tokens,
                      const LayerCache& cache) {
  const int64_t elem = sizeof(T);
  const int64_t heads = cache.layout.num_heads;
  return RowsAligned16(dense.key, elem, num_tokens, heads,
                       dense.key_token_stride, dense.key_head_stride) &&
         RowsAligned16(dense.value, elem, num_tokens, heads,
                       dense.value_token_stride, dense.value_head_stride) &&
         IsAligned16(cache.key_cache) && IsAligned16(cache.value_cache);
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_CUDA_UTIL_CUH_
