// CPU cache kernels: validation, dtype dispatch, the choice of row path
// (scalar rows of cpu_rows.h or the AVX2 rows of cpu_kernels_avx2.cc) and the
// split of large calls over the thread pool. The arithmetic lives in
// kernels/quantize.h, kernels/fp8.h and kernels/float_convert.h, shared with
// the CUDA kernels, so the results are bit-identical. Compiled with
// -ffp-contract=off (kernels/BUILD).

#include "kernels/cpu_kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "absl/status/status.h"
#include "core/cache_layout.h"
#include "kernels/cpu_kernels_avx2.h"
#include "kernels/cpu_rows.h"
#include "kernels/dtype_dispatch.h"
#include "kernels/kernel_params.h"
#include "kernels/kernel_validation.h"
#include "kernels/quantize.h"
#include "kernels/thread_pool.h"

namespace kvcache {
namespace {

using internal::CpuRowPath;
using internal::DispatchCacheType;
using internal::DispatchFloatType;
using internal::ScalarRow;
using internal::ThreadPool;

// A call stays on the caller's thread below this many elements (a decode
// step of 64 tokens x 8 heads x 256 is 2^17): waking a worker costs more than
// it saves. Above it, chunks of at least kMinChunkWork, up to
// kChunksPerThread per thread, balance threads slowed by other processes.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;
constexpr int64_t kMinChunkWork = int64_t{1} << 16;
constexpr int64_t kChunksPerThread = 4;

std::atomic<bool> force_scalar{false};

// Runs fn(begin, end) over [0, n) items of `work_per_item` elements each.
template <class F>
void ParallelFor(ThreadPool* pool, int64_t n, int64_t work_per_item, F&& fn) {
  const int64_t work = n * std::max<int64_t>(work_per_item, 1);
  if (pool == nullptr || pool->num_threads() <= 1 || work < kMinParallelWork) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunks =
      std::min(kChunksPerThread * pool->num_threads(), work / kMinChunkWork);
  pool->ParallelFor(n, chunks, fn);
}

template <class In, class Cache>
absl::Status QuantizeWriteImpl(const QuantizeWriteParams& p, ThreadPool* pool) {
  const bool avx2 = internal::ActiveCpuRowPath() == CpuRowPath::kAvx2;
  const CacheLayout& layout = p.cache.layout;
  ParallelFor(pool, p.num_tokens * layout.num_heads,
              layout.head_size + layout.head_size_v,
              [&](int64_t begin, int64_t end) {
                if (avx2) {
                  internal::QuantizeWriteRowsAvx2(p, begin, end);
                } else {
                  internal::WriteRows<In, Cache, ScalarRow>(p, begin, end);
                }
              });
  return absl::OkStatus();
}

template <class Cache, class Out>
absl::Status GatherImpl(const GatherParams& p, ThreadPool* pool) {
  const bool avx2 = internal::ActiveCpuRowPath() == CpuRowPath::kAvx2;
  const CacheLayout& layout = p.cache.layout;
  ParallelFor(pool, p.num_tokens * layout.num_heads,
              layout.head_size + layout.head_size_v,
              [&](int64_t begin, int64_t end) {
                if (avx2) {
                  internal::GatherRowsAvx2(p, begin, end);
                } else {
                  internal::GatherRows<Cache, Out, ScalarRow>(p, begin, end);
                }
              });
  return absl::OkStatus();
}

}  // namespace

namespace internal {

CpuRowPath ActiveCpuRowPath() {
  return !force_scalar.load(std::memory_order_relaxed) && CpuHasAvx2()
             ? CpuRowPath::kAvx2
             : CpuRowPath::kScalar;
}

void ForceScalarCpuRowsForTesting(bool force) {
  force_scalar.store(force, std::memory_order_relaxed);
}

}  // namespace internal

absl::Status QuantizeWriteCpu(const QuantizeWriteParams& params,
                              ThreadPool* pool) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateQuantizeWrite(params));
  if (params.num_tokens == 0) return absl::OkStatus();
  KVCACHE_RETURN_IF_ERROR(internal::CheckSlotIndices(
      params.slot_mapping, params.num_tokens, params.cache.layout.num_slots(),
      "slot_mapping"));
  return DispatchFloatType(params.input.dtype, "input", [&](auto in) {
    return DispatchCacheType(params.cache.layout.cache_dtype, [&](auto cache) {
      using In = decltype(in);
      using Cache = decltype(cache);
      if constexpr (internal::kIsSupportedWrite<In, Cache>) {
        return QuantizeWriteImpl<In, Cache>(params, pool);
      } else {
        return absl::InternalError(
            "unsupported input/cache dtype pair passed validation");
      }
    });
  });
}

absl::Status GatherCpu(const GatherParams& params, ThreadPool* pool) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateGather(params));
  if (params.num_tokens == 0) return absl::OkStatus();
  const CacheLayout& layout = params.cache.layout;
  if (params.slots != nullptr) {
    KVCACHE_RETURN_IF_ERROR(internal::CheckSlotIndices(
        params.slots, params.num_tokens, layout.num_slots(), "slots"));
  } else {
    const int64_t first = params.token_begin / layout.block_size;
    const int64_t last =
        (params.token_begin + params.num_tokens - 1) / layout.block_size;
    KVCACHE_RETURN_IF_ERROR(internal::CheckBlockTableIndices(
        params.block_table + first, last - first + 1, layout.num_blocks));
  }
  return DispatchCacheType(layout.cache_dtype, [&](auto cache) {
    return DispatchFloatType(params.output.dtype, "output", [&](auto out) {
      return GatherImpl<decltype(cache), decltype(out)>(params, pool);
    });
  });
}

absl::Status BlockCopyCpu(const BlockCopyParams& params, ThreadPool* pool) {
  KVCACHE_RETURN_IF_ERROR(internal::ValidateBlockCopy(params));
  if (params.num_pairs == 0) return absl::OkStatus();
  const CacheLayout& layout = params.cache.layout;
  KVCACHE_RETURN_IF_ERROR(internal::CheckBlockPairIndices(
      params.pairs, params.num_pairs, layout.num_blocks));
  const int64_t elem = static_cast<int64_t>(DTypeSize(layout.cache_dtype));
  if (layout.records()) {  // A block is one run of block_size records.
    const int64_t bytes = layout.block_size * layout.record_pitch * elem;
    char* base = static_cast<char*>(params.cache.key_cache);
    ParallelFor(pool, params.num_pairs, bytes, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        std::memcpy(base + params.pairs[2 * i + 1] * bytes,
                    base + params.pairs[2 * i] * bytes,
                    static_cast<size_t>(bytes));
      }
    });
    return absl::OkStatus();
  }
  const int64_t key_bytes = layout.key_block_elems() * elem;
  const int64_t value_bytes = layout.value_block_elems() * elem;
  // Inline scales travel with the K and V rows.
  const int64_t scale_bytes =
      layout.side_scale_block_elems() * static_cast<int64_t>(sizeof(float));
  const bool side_scales = layout.side_scales();
  const bool has_value = layout.has_value();  // False: K only, no V.
  auto copy = [](void* base, int64_t bytes, int64_t src, int64_t dst) {
    char* b = static_cast<char*>(base);
    std::memcpy(b + dst * bytes, b + src * bytes, static_cast<size_t>(bytes));
  };
  ParallelFor(pool, params.num_pairs, key_bytes + value_bytes,
              [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; ++i) {
                  const int64_t src = params.pairs[2 * i];
                  const int64_t dst = params.pairs[2 * i + 1];
                  copy(params.cache.key_cache, key_bytes, src, dst);
                  if (has_value) {
                    copy(params.cache.value_cache, value_bytes, src, dst);
                  }
                  if (side_scales) {
                    copy(params.cache.key_scale, scale_bytes, src, dst);
                    if (has_value) {
                      copy(params.cache.value_scale, scale_bytes, src, dst);
                    }
                  }
                }
              });
  return absl::OkStatus();
}

}  // namespace kvcache
