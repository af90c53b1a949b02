// KVCACHE_HOST_DEVICE marks the small helpers that the CPU and the CUDA kernels
// share: inline host functions in a host compiler, __host__ __device__
// functions under nvcc.

#ifndef KVCACHE_CORE_HOST_DEVICE_H_
#define KVCACHE_CORE_HOST_DEVICE_H_

#if defined(__CUDACC__)
#define KVCACHE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVCACHE_HOST_DEVICE inline
#endif

#endif  // KVCACHE_CORE_HOST_DEVICE_H_
