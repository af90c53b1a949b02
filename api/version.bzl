"""The version of libkvcache.so, the install step and kvcache.pc (issue #19).

Keep in step with KVCACHE_VERSION_MAJOR/MINOR/PATCH in kvcache_c.h (//tests:libkvcache_install_test
checks that kvcache_version() and pkg-config agree). The soname changes with the major version,
which changes whenever a C struct or signature changes incompatibly.
"""

KVCACHE_VERSION_MAJOR = 1
KVCACHE_VERSION_MINOR = 0
KVCACHE_VERSION_PATCH = 0
KVCACHE_VERSION = "{}.{}.{}".format(KVCACHE_VERSION_MAJOR, KVCACHE_VERSION_MINOR, KVCACHE_VERSION_PATCH)
KVCACHE_SONAME = "libkvcache.so.{}".format(KVCACHE_VERSION_MAJOR)
