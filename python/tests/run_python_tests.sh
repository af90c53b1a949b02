#!/usr/bin/env bash
# Runs the Python package's tests (tests/test_kvcache.py) on one backend:
#
#   bazel test //python:python_test                       CPU: Debian's python3 and numpy (CI)
#   gpu-bundle/python/run_python_tests.sh cuda            on a GPU host: torch on CUDA tensors
#   gpu-bundle/python/run_python_tests.sh cpu             the same tests on the CPU backend
#
# PYTHON chooses the interpreter (default: /usr/bin/python3 under Bazel, else python3 on PATH; on a
# GPU host, the one that has torch). With cuda and no torch or no GPU the backend tests skip with
# a message; the others still run.
set -euo pipefail
backend="${1:-${KVCACHE_TEST_BACKEND:-cpu}}"
if [[ -n "${TEST_SRCDIR:-}" ]]; then
  # bazel test: the files are in the runfiles.
  root="$TEST_SRCDIR/kvcache"
  export KVCACHE_LIBRARY="$root/api/libkvcache.so"
  export KVCACHE_HEADER="$root/api/kvcache_c.h"
  export KVCACHE_REFERENCE_DUMP="$root/python/reference_dump"
  package_dir="$root/python"
  tests_dir="$root/python/tests"
  python="${PYTHON:-/usr/bin/python3}"
  # Under --config=asan_ubsan the library needs ASan's runtime, loaded before Python (whose own
  # allocations are not the library's: no leak check).
  if readelf -d "$KVCACHE_LIBRARY" | grep -q "NEEDED.*libasan"; then
    export LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
    export ASAN_OPTIONS="detect_leaks=0"
  fi
else
  # The GPU bundle's python/ folder: kvcache/ (with libkvcache.so inside), tests/,
  # include/ (kvcache_c.h, dlpack/dlpack.h), reference_dump.
  here="$(cd "$(dirname "$0")" && pwd)"
  export KVCACHE_LIBRARY="${KVCACHE_LIBRARY:-$here/kvcache/libkvcache.so}"
  export KVCACHE_HEADER="$here/include/kvcache_c.h"
  export KVCACHE_DLPACK_INCLUDE="$here/include"
  export KVCACHE_REFERENCE_DUMP="$here/reference_dump"
  package_dir="$here"
  tests_dir="$here/tests"
  python="${PYTHON:-python3}"
fi
export KVCACHE_TEST_BACKEND="$backend"
export PYTHONPATH="$package_dir${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
exec "$python" "$tests_dir/test_kvcache.py"
