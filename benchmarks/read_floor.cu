// Read-floor kernels (benchmarks/read_floor.h).

#include <cuda_runtime.h>

#include "benchmarks/read_floor.h"

namespace kvcache::bench {
namespace {

__device__ __forceinline__ uint32_t Fold(uint4 v) {
  return v.x ^ v.y ^ v.z ^ v.w;
}

// One thread block per (split, sequence): each block of the split, K and V
// (kPer 16-byte pieces of each per thread, every load issued before any is
// folded) and its scales.
template <int kThreads, int kPer>
__global__ void __launch_bounds__(kThreads)
    PagedReadKernel(const PagedReadParams p) {
  const int32_t seq = blockIdx.y;
  const int32_t split = blockIdx.x;
  const int64_t n = p.blocks_per_seq;
  const int64_t begin = split * n / p.num_splits;
  const int64_t end = (split + 1) * n / p.num_splits;
  const int32_t* table = p.block_table + int64_t{seq} * n;
  const int64_t scale_pieces = p.scale_bytes / 16;
  uint32_t acc = 0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t block = table[i];
    const uint4* k =
        reinterpret_cast<const uint4*>(static_cast<const char*>(p.key) +
                                       block * p.block_bytes) +
        threadIdx.x;
    const uint4* v =
        reinterpret_cast<const uint4*>(static_cast<const char*>(p.value) +
                                       block * p.block_bytes) +
        threadIdx.x;
    uint4 a[kPer], b[kPer];
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      a[c] = __ldg(k + c * kThreads);
      b[c] = __ldg(v + c * kThreads);
    }
    if (threadIdx.x < scale_pieces) {
      const uint4* ks = reinterpret_cast<const uint4*>(
          static_cast<const char*>(p.key_scale) + block * p.scale_bytes);
      const uint4* vs = reinterpret_cast<const uint4*>(
          static_cast<const char*>(p.value_scale) + block * p.scale_bytes);
      acc ^= Fold(__ldg(ks + threadIdx.x)) ^ Fold(__ldg(vs + threadIdx.x));
    }
#pragma unroll
    for (int c = 0; c < kPer; ++c) acc ^= Fold(a[c]) ^ Fold(b[c]);
  }
  // One word per thread block: the XOR of its threads' words.
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ uint32_t warps[kThreads / 32];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t all = 0;
    for (int w = 0; w < kThreads / 32; ++w) all ^= warps[w];
    p.out[int64_t{seq} * p.num_splits + split] = all;
  }
}

template <int kThreads>
int LaunchPaged(const PagedReadParams& p, dim3 grid, cudaStream_t s) {
  switch (p.block_bytes / 16 / kThreads) {
    case 2:
      PagedReadKernel<kThreads, 2><<<grid, kThreads, 0, s>>>(p);
      break;
    case 4:
      PagedReadKernel<kThreads, 4><<<grid, kThreads, 0, s>>>(p);
      break;
    case 8:
      PagedReadKernel<kThreads, 8><<<grid, kThreads, 0, s>>>(p);
      break;
    case 16:
      PagedReadKernel<kThreads, 16><<<grid, kThreads, 0, s>>>(p);
      break;
    default:
      return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

__global__ void __launch_bounds__(256)
    LinearReadKernel(const uint4* __restrict__ data, int64_t n, uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = int64_t{gridDim.x} * 256;
  int64_t i = int64_t{blockIdx.x} * 256 + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldg(data + i), b = __ldg(data + i + stride),
                c = __ldg(data + i + 2 * stride),
                d = __ldg(data + i + 3 * stride);
    acc ^= Fold(a) ^ Fold(b) ^ Fold(c) ^ Fold(d);
  }
  for (; i < n; i += stride) acc ^= Fold(__ldg(data + i));
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ uint32_t warps[8];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t all = 0;
    for (int w = 0; w < 8; ++w) all ^= warps[w];
    out[blockIdx.x] = all;
  }
}

}  // namespace

int LaunchPagedRead(const PagedReadParams& p, int threads, void* stream) {
  if (p.key == nullptr || p.value == nullptr || p.block_table == nullptr ||
      p.out == nullptr || p.block_bytes <= 0 || p.block_bytes % 16 != 0 ||
      p.scale_bytes < 0 || p.scale_bytes % 16 != 0 ||
      (p.scale_bytes > 0 &&
       (p.key_scale == nullptr || p.value_scale == nullptr)) ||
      p.num_seqs < 1 || p.blocks_per_seq < 1 || p.num_splits < 1 ||
      p.num_splits > p.blocks_per_seq || p.num_seqs > 65535) {
    return -1;
  }
  const dim3 grid(p.num_splits, p.num_seqs);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // Every thread reads the same number of pieces of a block, and the scale
  // pieces fit in one pass of the threads.
  if (threads < 1 || p.block_bytes % (16 * threads) != 0 ||
      p.scale_bytes / 16 > threads) {
    return -1;
  }
  switch (threads) {
    case 128:
      return LaunchPaged<128>(p, grid, s);
    case 256:
      return LaunchPaged<256>(p, grid, s);
    case 512:
      return LaunchPaged<512>(p, grid, s);
    default:
      return -1;
  }
}

int LaunchLinearRead(const void* data, int64_t bytes, uint32_t* out, int grid,
                     void* stream) {
  if (data == nullptr || out == nullptr || bytes <= 0 || bytes % 16 != 0 ||
      grid < 1) {
    return -1;
  }
  LinearReadKernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint4*>(data), bytes / 16, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kvcache::bench
