// Host launcher of paged decode attention: validate, dispatch, size the grid
// (row tiles and the split-KV count), launch, check. The split count is chosen
// on the host from host-known bounds only (num_seqs, max_seq_len, window), so
// a launch reads no device memory on the host and can be captured in a CUDA
// graph; the workspace is the caller's (allocated once).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/cuda_check.h"
#include "kernels/attention.cuh"
#include "kernels/attention_policy.h"
#include "kernels/attention_validation.h"
#include "kernels/cuda_kernels.h"
#include "kernels/cuda_util.cuh"
#include "kernels/dtype_dispatch.h"
#include "kernels/kernel_validation.h"

namespace kvcache {
namespace {

using internal::AttentionGrid;
using internal::AttnConfig;

static_assert(internal::kAttnRows == internal::kAttentionTileRows);

// Fewest keys worth a split of their own: below this the merge costs more
// than the parallelism gains.
constexpr int64_t kMinKeysPerSplit = 512;

absl::Status ValidateForCuda(const AttentionParams& p) {
  const CacheLayout& layout = p.cache.layout;
  const int64_t d = layout.head_size;
  if ((d != 64 && d != 128 && d != 256) || layout.head_size_v != d) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA attention supports head_size 64, 128 or 256 with head_size_v "
        "equal to it; got ",
        d, " / ", layout.head_size_v));
  }
  if (p.num_seqs > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_seqs ", p.num_seqs, " exceeds 65535"));
  }
  if (!internal::IsAligned16(p.cache.key_cache) ||
      !internal::IsAligned16(p.cache.value_cache)) {
    return absl::InvalidArgumentError("cache pointers are not 16-byte aligned");
  }
  if ((p.workspace.partial_o != nullptr &&
       !internal::IsAligned16(p.workspace.partial_o)) ||
      (p.workspace.partial_lse != nullptr &&
       reinterpret_cast<uintptr_t>(p.workspace.partial_lse) % 4 != 0)) {
    return absl::InvalidArgumentError("workspace pointers are misaligned");
  }
  return absl::OkStatus();
}

// The share of the device's block slots the last wave of a launch should
// keep busy before more splits stop paying.
constexpr double kMinWaveEfficiency = 0.85;

// Splits for `blocks` thread blocks per split on `slots` concurrent blocks:
// the fewest whose last wave leaves at most 15 % of the slots idle, at most
// `max_splits` (then the best of those).
int64_t ChooseSplits(int64_t blocks, int64_t slots, int64_t max_splits) {
  int64_t best = 1;
  double best_eff = 0.0;
  for (int64_t sp = 1; sp <= max_splits; ++sp) {
    const int64_t total = blocks * sp;
    const int64_t waves = (total + slots - 1) / slots;
    const double eff = static_cast<double>(total) / (waves * slots);
    if (eff >= kMinWaveEfficiency) return sp;
    if (eff > best_eff + 1e-9) {
      best = sp;
      best_eff = eff;
    }
  }
  return best;
}

// Dynamic shared memory of a launch with grid g (AttnShape::MakeLayout).
template <class Cache, int kHeadDim, class Cfg>
int SmemBytes(const AttentionParams& p, const AttentionGrid& g) {
  const bool q_split = std::is_same_v<Cache, internal::BFloat16Type> &&
                       p.q_dtype != DType::kBFloat16;
  return internal::AttnShape<Cache, kHeadDim, Cfg>::MakeLayout(g.wide, q_split,
                                                               g.heads)
      .total;
}

// The grid of a launch; *smem_bytes receives its dynamic shared memory.
template <class Cache, int kHeadDim, class Cfg>
absl::StatusOr<AttentionGrid> ChooseGrid(const AttentionParams& p, int heads,
                                         const void* kernel, int* smem_bytes) {
  absl::StatusOr<internal::DeviceLaunchInfo> info =
      internal::CurrentDeviceLaunchInfo();
  if (!info.ok()) return info.status();
  const CacheLayout& layout = p.cache.layout;
  AttentionGrid g;
  g.group = p.num_q_heads / static_cast<int32_t>(layout.num_heads);
  const int32_t rows = p.max_query_tokens * g.group;
  g.tiles = internal::AttentionRowTiles(p);
  g.wide = rows > internal::kAttnRows / 2;
  // KV heads per block (ChooseAttentionKernel): neighbouring heads' rows of
  // the same tokens are read side by side, one warp per head.
  const int64_t kv_heads = layout.num_heads;
  g.heads = heads;
  g.block_size =
      internal::FastDivmod::Make(static_cast<uint32_t>(layout.block_size));
  g.vector_out = internal::RowsAligned16(p.o, 2, p.num_q_tokens, p.num_q_heads,
                                         p.o_token_stride, p.o_head_stride);
  // Keys one sequence's rows attend at most.
  int64_t span = p.max_seq_len;
  if (p.window > 0) {
    span = std::min<int64_t>(span, int64_t{p.window} + p.max_query_tokens - 1);
  }
  span = std::max<int64_t>(span, 1);
  *smem_bytes = SmemBytes<Cache, kHeadDim, Cfg>(p, g);
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, *smem_bytes));
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
      cudaSharedmemCarveoutMaxShared));
  int per_sm = 0;
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, internal::kAttnThreads, *smem_bytes));
  const int64_t blocks =
      int64_t{p.num_seqs} * (kv_heads / g.heads) * g.tiles;  // Per split.
  const int64_t slots = int64_t{info->sms} * std::max(per_sm, 1);
  const int64_t max_splits = std::clamp<int64_t>(
      (span + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1, kMaxAttentionSplits);
  int64_t splits = ChooseSplits(blocks, slots, max_splits);
  if (p.num_splits > 0) splits = p.num_splits;
  splits = std::clamp<int64_t>(splits, 1, kMaxAttentionSplits);
  // What the workspace holds.
  const int64_t out_rows = int64_t{p.num_q_tokens} * p.num_q_heads;
  if (splits > 1) {
    const int64_t fit = std::min(
        p.workspace.partial_o == nullptr
            ? 0
            : p.workspace.partial_o_floats / (out_rows * layout.head_size_v),
        p.workspace.partial_lse == nullptr
            ? 0
            : p.workspace.partial_lse_floats / out_rows);
    splits = std::max<int64_t>(1, std::min(splits, fit));
  }
  g.splits = static_cast<int32_t>(splits);
  g.chunk = static_cast<int32_t>((span + splits - 1) / splits);
  return g;
}

template <class Cache, int kHeadDim, class Cfg>
absl::Status Launch(const AttentionParams& p, int heads, cudaStream_t stream) {
  auto* kernel = &internal::AttentionKernel<Cache, kHeadDim, Cfg>;
  int smem = 0;
  absl::StatusOr<AttentionGrid> grid = ChooseGrid<Cache, kHeadDim, Cfg>(
      p, heads, reinterpret_cast<const void*>(kernel), &smem);
  if (!grid.ok()) return grid.status();
  absl::StatusOr<internal::DeviceLaunchInfo> info =
      internal::CurrentDeviceLaunchInfo();
  if (!info.ok()) return info.status();
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.cache.layout.num_heads /
                                              grid->heads * grid->tiles),
                        static_cast<unsigned>(p.num_seqs),
                        static_cast<unsigned>(grid->splits));
  config.blockDim = dim3(internal::kAttnThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (info->programmatic_launch) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, kernel, p, *grid));
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (grid->splits == 1) return absl::OkStatus();
  const int64_t rows = int64_t{p.num_seqs} * p.max_query_tokens * p.num_q_heads;
  return internal::LaunchKernel(
      &internal::AttentionReduceKernel<kHeadDim>,
      (rows + internal::kAttnWarps - 1) / internal::kAttnWarps,
      internal::kAttnThreads, info->programmatic_launch, stream, p, *grid);
}

// Swapped narrow tiles (8-bit caches, row copies) with kChains accumulator
// chains and kL2Bytes of L2 prefetch, on the 3- or 4-blocks kernel.
template <class Cache, int kHeadDim, int kChains, int kL2Bytes,
          bool kInt8Mma = false>
absl::Status LaunchSwapped(const AttentionParams& p,
                           const internal::AttentionKernelChoice& c,
                           cudaStream_t stream) {
  if constexpr (kHeadDim <= 128) {
    if (c.blocks_per_sm == 4) {
      return Launch<Cache, kHeadDim,
                    AttnConfig<4, true, true, kChains, kL2Bytes, kInt8Mma>>(
          p, c.heads, stream);
    }
  }
  return Launch<Cache, kHeadDim,
                AttnConfig<3, true, true, kChains, kL2Bytes, kInt8Mma>>(
      p, c.heads, stream);
}

// The kernel ChooseAttentionKernel picks for p (kernels/attention_policy.h;
// the 4-blocks kernel is compiled for 8-bit caches with head sizes up to 128
// only), with K rows copied in row order or, for A/B runs, operand order.
template <class Cache, int kHeadDim, bool kRowCopy>
absl::Status LaunchChoice(const AttentionParams& p,
                          const internal::AttentionKernelChoice& c,
                          cudaStream_t stream) {
  using CacheT = typename Cache::T;
  constexpr bool kOcc4 = kHeadDim <= 128 && sizeof(CacheT) == 1;
  // Swapped narrow tiles: 8-bit caches, row copies (the policy's choice).
  if constexpr (kRowCopy && sizeof(CacheT) == 1) {
    if (c.swap) {
      // The policy's v10 tiles (int8: integer mma; fp8: two chains; both
      // with the L2 hint), or the v7 tiles (auto_v7 and the rows_* variants).
      if constexpr (std::is_same_v<Cache, internal::Int8Type>) {
        if (c.int8_mma) {
          return LaunchSwapped<Cache, kHeadDim, 1, 256, true>(p, c, stream);
        }
      } else {
        if (c.chains == 2) {
          return LaunchSwapped<Cache, kHeadDim, 2, 256>(p, c, stream);
        }
      }
      return LaunchSwapped<Cache, kHeadDim, 1, 0>(p, c, stream);
    }
  }
  if constexpr (kOcc4) {
    if (c.blocks_per_sm == 4) {
      return Launch<Cache, kHeadDim, AttnConfig<4, kRowCopy>>(p, c.heads,
                                                              stream);
    }
  }
  return Launch<Cache, kHeadDim, AttnConfig<3, kRowCopy>>(p, c.heads, stream);
}

template <class Cache, int kHeadDim>
absl::Status LaunchVariant(const AttentionParams& p, cudaStream_t stream) {
  using CacheT = typename Cache::T;
  constexpr bool kOcc4 = kHeadDim <= 128 && sizeof(CacheT) == 1;
  absl::StatusOr<internal::DeviceLaunchInfo> info =
      internal::CurrentDeviceLaunchInfo();
  if (!info.ok()) return info.status();
  const internal::AttentionKernelChoice c =
      internal::ChooseAttentionKernel(p, kOcc4, info->sms);
  if (c.row_copy) return LaunchChoice<Cache, kHeadDim, true>(p, c, stream);
  return LaunchChoice<Cache, kHeadDim, false>(p, c, stream);
}

#ifndef NDEBUG
absl::Status DebugCheckBatch(const AttentionParams& p, cudaStream_t s) {
  std::vector<int32_t> table, lens, starts;
  KVCACHE_RETURN_IF_ERROR(internal::CopyForDebugCheck(
      p.block_table, p.num_seqs * p.block_table_stride, s, &table));
  if (table.empty()) return absl::OkStatus();  // Being captured.
  KVCACHE_RETURN_IF_ERROR(
      internal::CopyForDebugCheck(p.seq_lens, p.num_seqs, s, &lens));
  KVCACHE_RETURN_IF_ERROR(
      internal::CopyForDebugCheck(p.q_start, p.num_seqs + 1, s, &starts));
  return internal::CheckAttentionBatch(p, table.data(), lens.data(),
                                       starts.data());
}
#endif

}  // namespace

absl::Status AttentionCuda(const AttentionParams& params, void* stream) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateAttention(params));
  KVCACHE_RETURN_IF_ERROR(ValidateForCuda(params));
  if (params.num_seqs == 0 || params.num_q_tokens == 0) {
    return absl::OkStatus();
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#ifndef NDEBUG
  KVCACHE_RETURN_IF_ERROR(DebugCheckBatch(params, s));
#endif
  return internal::DispatchCacheType(
      params.cache.layout.cache_dtype, [&](auto cache) -> absl::Status {
        using Cache = decltype(cache);
        switch (params.cache.layout.head_size) {
          case 64:
            return LaunchVariant<Cache, 64>(params, s);
          case 128:
            return LaunchVariant<Cache, 128>(params, s);
          default:
            return LaunchVariant<Cache, 256>(params, s);
        }
      });
}

}  // namespace kvcache
