// Entry point of the row-kernel tuning experiment (row_kernel_variants.cu):
//   row_kernel_variants            launch variants against the v0 kernels
//   row_kernel_variants floors     each access pattern against copies
//   row_kernel_variants floors-all also slot-order and cache-size variants
//   row_kernel_variants gather     gather only
int RunRowKernelVariants(const char* mode);

int main(int argc, char** argv) {
  return RunRowKernelVariants(argc > 1 ? argv[1] : "variants");
}
