// Read-floor kernels (benchmarks/read_floor.h).

#include <cuda_runtime.h>

#include "benchmarks/read_floor.h"

namespace kvcache::bench {
namespace {

__device__ __forceinline__ uint32_t Fold(uint4 v) {
  return v.x ^ v.y ^ v.z ^ v.w;
}

// One thread block per (split, sequence, head group): each block of the
// split, the group's K and V bytes (kPer 16-byte pieces of each per thread,
// every load issued before any is folded) and its scales (4-byte words).
// Where a thread's pieces and scale word lie in a block is the same for
// every block: computed once.
template <int kThreads, int kPer>
__global__ void __launch_bounds__(kThreads)
    PagedReadKernel(const PagedReadParams p) {
  const int32_t split = blockIdx.x;
  const int32_t seq = blockIdx.y;
  const int32_t group = blockIdx.z;
  const int64_t n = p.blocks_per_seq;
  const int64_t begin = split * n / p.num_splits;
  const int64_t end = (split + 1) * n / p.num_splits;
  const int32_t* table = p.block_table + int64_t{seq} * n;
  const int64_t row_bytes = p.block_bytes / p.block_size;  // A token.
  const int64_t group_bytes = row_bytes / p.head_groups;
  const int64_t token_pieces = group_bytes / 16;
  int32_t offset[kPer];  // In a block (at most a few tens of KiB).
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int64_t j = threadIdx.x + int64_t{c} * kThreads;
    offset[c] =
        static_cast<int32_t>((j / token_pieces) * row_bytes +
                             group * group_bytes + (j % token_pieces) * 16);
  }
  // Scales: block_size x (heads / groups) words per block and group.
  const int64_t group_heads = p.num_heads / p.head_groups;
  const bool scale_reader =
      p.scale_bytes > 0 && threadIdx.x < p.block_size * group_heads;
  const int64_t scale_word = (threadIdx.x / group_heads) * p.num_heads +
                             group * group_heads + threadIdx.x % group_heads;
  uint32_t acc = 0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t block = table[i];
    const char* k = static_cast<const char*>(p.key) + block * p.block_bytes;
    const char* v = static_cast<const char*>(p.value) + block * p.block_bytes;
    uint4 a[kPer], b[kPer];
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      a[c] = __ldg(reinterpret_cast<const uint4*>(k + offset[c]));
      b[c] = __ldg(reinterpret_cast<const uint4*>(v + offset[c]));
    }
    if (scale_reader) {
      const uint32_t* ks = reinterpret_cast<const uint32_t*>(
          static_cast<const char*>(p.key_scale) + block * p.scale_bytes);
      const uint32_t* vs = reinterpret_cast<const uint32_t*>(
          static_cast<const char*>(p.value_scale) + block * p.scale_bytes);
      acc ^= __ldg(ks + scale_word) ^ __ldg(vs + scale_word);
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
    p.out[(int64_t{seq} * p.head_groups + group) * p.num_splits + split] = all;
  }
}

template <int kThreads>
int LaunchPaged(const PagedReadParams& p, dim3 grid, cudaStream_t s) {
  switch (p.block_bytes / p.head_groups / 16 / kThreads) {
    case 1:
      PagedReadKernel<kThreads, 1><<<grid, kThreads, 0, s>>>(p);
      break;
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
      p.out == nullptr || p.block_size < 1 || p.num_heads < 1 ||
      p.head_groups < 1 || p.num_heads % p.head_groups != 0 ||
      p.block_bytes <= 0 || p.block_bytes > (int64_t{1} << 30) ||
      p.block_bytes % (int64_t{p.block_size} * 16 * p.head_groups) != 0 ||
      p.scale_bytes < 0 ||
      (p.scale_bytes > 0 &&
       (p.key_scale == nullptr || p.value_scale == nullptr ||
        p.scale_bytes != int64_t{p.block_size} * p.num_heads * 4)) ||
      p.num_seqs < 1 || p.blocks_per_seq < 1 || p.num_splits < 1 ||
      p.num_splits > p.blocks_per_seq || p.num_seqs > 65535 ||
      p.head_groups > 64) {
    return -1;
  }
  // Every thread reads the same number of a group's pieces of a block, and
  // the group's scale words fit in one pass of the threads.
  const int64_t pieces = p.block_bytes / p.head_groups / 16;
  if (threads < 1 || pieces % threads != 0 ||
      int64_t{p.block_size} * (p.num_heads / p.head_groups) > threads) {
    return -1;
  }
  const dim3 grid(p.num_splits, p.num_seqs, p.head_groups);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
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
