// An empty kernel, launched like the cache kernels (128 threads, one block), to
// measure the launch cost alone under CUDA-graph replay. Benchmark use only.

#ifndef KVCACHE_BENCHMARKS_EMPTY_KERNEL_H_
#define KVCACHE_BENCHMARKS_EMPTY_KERNEL_H_

namespace kvcache::bench {

// Launches the empty kernel on `stream` (a cudaStream_t); returns the
// cudaError_t of the launch as an int (nonzero without CUDA).
int LaunchEmptyKernel(void* stream);

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCHMARKS_EMPTY_KERNEL_H_
