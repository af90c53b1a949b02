/* Checks for the C API's tests, written in C: each failed check prints its
 * file, line and expression (CHECK_IS also the status names and the last
 * error) and counts one failure; a test's main returns nonzero when
 * `failures` is not 0. Also HostTensor3, the dense host tensor the tests
 * append from and gather into. Include once per test program. */

#ifndef KVCACHE_TESTS_C_CHECK_H_
#define KVCACHE_TESTS_C_CHECK_H_

#include <stdint.h>
#include <stdio.h>

#include "api/kvcache_c.h"

static int failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

#define CHECK_IS(want, call)                                                 \
  do {                                                                       \
    kvcache_status s_ = (call);                                              \
    if (s_ != (want)) {                                                      \
      fprintf(stderr, "%s:%d: %s -> %s (want %s): %s\n", __FILE__, __LINE__, \
              #call, kvcache_status_name(s_), kvcache_status_name(want),     \
              kvcache_last_error(NULL));                                     \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

/* A contiguous host tensor [t, h, d] of `dtype` over `data`. */
static kvcache_tensor HostTensor3(void* data, int32_t dtype, int64_t t,
                                  int64_t h, int64_t d) {
  kvcache_tensor x = KVCACHE_STRUCT_INIT(kvcache_tensor);
  x.data = data;
  x.dtype = dtype;
  x.ndim = 3;
  x.shape[0] = t;
  x.shape[1] = h;
  x.shape[2] = d;
  x.strides[0] = h * d;
  x.strides[1] = d;
  x.strides[2] = 1;
  x.memory = KVCACHE_HOST;
  return x;
}

#endif /* KVCACHE_TESTS_C_CHECK_H_ */
