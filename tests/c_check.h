/* Checks for the C API's tests, written in C: each failed check prints its
 * file, line and expression (CHECK_IS also the status names and the last
 * error) and counts one failure; a test's main returns nonzero when
 * `failures` is not 0. Include once per test program. */

#ifndef KVCACHE_TESTS_C_CHECK_H_
#define KVCACHE_TESTS_C_CHECK_H_

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

#endif /* KVCACHE_TESTS_C_CHECK_H_ */
