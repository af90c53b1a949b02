// Built without CUDA: the experiment has nothing to run.
#include <cstdio>

int RunRowKernelVariants(const char*) {
  std::puts("row_kernel_variants: built without CUDA support");
  return 1;
}
