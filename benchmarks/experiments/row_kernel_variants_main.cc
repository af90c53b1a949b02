// Entry point of the row-kernel tuning experiment (row_kernel_variants.cu).
int RunRowKernelVariants();

int main() { return RunRowKernelVariants(); }
