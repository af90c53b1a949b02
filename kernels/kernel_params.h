// Parameter structs of the three cache kernels: quantize-and-write,
// dequantize-gather and block copy. Plain structs of pointers, strides and
// sizes, passed by value to both the CPU and the CUDA implementation
// (kernels/cpu_kernels.h, kernels/cuda_kernels.h). All strides count elements,
// not bytes. Pointers are host pointers for the CPU backend and device pointers
// for the CUDA backend.

#ifndef KVCACHE_KERNELS_KERNEL_PARAMS_H_
#define KVCACHE_KERNELS_KERNEL_PARAMS_H_

#include <cstdint>

#include "core/cache_layout.h"
#include "core/dtype.h"
#include "core/host_device.h"

namespace kvcache {

// Dense K [num_tokens, num_heads, head_size] / V [.., head_size_v] with unit
// stride in the last dimension and arbitrary token and head strides (e.g.
// slices of a fused QKV output). The CPU and CUDA kernels address it through
// key_offset / value_offset alone.
struct DenseKV {
  void* key = nullptr;  // const for inputs; written by gather.
  void* value = nullptr;
  DType dtype = DType::kBFloat16;  // float32, float16 or bfloat16.
  int64_t key_token_stride = 0;
  int64_t key_head_stride = 0;
  int64_t value_token_stride = 0;
  int64_t value_head_stride = 0;

  // Element offset of (token, head, 0) in K (V).
  KVCACHE_HOST_DEVICE int64_t key_offset(int64_t token, int64_t head) const {
    return token * key_token_stride + head * key_head_stride;
  }
  KVCACHE_HOST_DEVICE int64_t value_offset(int64_t token, int64_t head) const {
    return token * value_token_stride + head * value_head_stride;
  }
};

// Quantize-and-write: for each token t with slot_mapping[t] >= 0, write K/V[t]
// into that slot. Quantized caches get per-(token, head) scales (DESIGN.md
// section 3); bf16/fp16 caches are a plain copy and require input dtype ==
// cache dtype. Negative slots are padding and are skipped.
struct QuantizeWriteParams {
  DenseKV input;
  int64_t num_tokens = 0;
  const int64_t* slot_mapping = nullptr;  // [num_tokens]
  LayerCache cache;
};

// Dequantize-gather: out[t] = dequantized cache at the slot of token t. The
// slot of token t is either slots[t] (when slots != nullptr; a negative slot
// writes zeros) or, for a block table, block_table[(token_begin + t) /
// block_size] * block_size + (token_begin + t) % block_size.
struct GatherParams {
  LayerCache cache;  // Read only.
  const int64_t* slots = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_table_len =
      0;  // Entries of block_table (bounds of the token range).
  int64_t token_begin = 0;
  int64_t num_tokens = 0;
  DenseKV output;
};

// Block copy: for each pair i, copy block pairs[2i] onto block pairs[2i+1] (K,
// V and scales).
struct BlockCopyParams {
  LayerCache cache;
  const int64_t* pairs = nullptr;  // [num_pairs, 2] = (src, dst)
  int64_t num_pairs = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_KERNELS_KERNEL_PARAMS_H_
