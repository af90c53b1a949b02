#!/usr/bin/env bash
# The install step as an engine without Bazel uses it: install into a temporary prefix, compile
# example/engine.c with plain gcc and pkg-config, run it, and check that pkg-config's version is
# the library's.
set -euo pipefail
prefix="${TEST_TMPDIR:-$(mktemp -d)}/prefix"
packaging/install "$prefix"

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
for f in lib/libkvcache.so lib/pkgconfig/kvcache.pc include/kvcache/kvcache_c.h \
  include/kvcache/dlpack/dlpack.h; do
  [[ -e "$prefix/$f" ]] || { echo "FAIL: $f not installed"; exit 1; }
done
version=$(pkg-config --modversion kvcache)
soname_link=$(readlink "$prefix/lib/libkvcache.so")
[[ "$(readlink "$prefix/lib/$soname_link")" == "libkvcache.so.$version" ]] || {
  echo "FAIL: links lib/libkvcache.so -> $soname_link -> $(readlink "$prefix/lib/$soname_link")"
  exit 1
}

out="${TEST_TMPDIR:-/tmp}/engine"
# shellcheck disable=SC2046
gcc -std=c11 -Wall -Wextra -Werror -o "$out" packaging/example/engine.c \
  $(pkg-config --cflags --libs kvcache) -lm -Wl,-rpath,"$prefix/lib"
readelf -d "$out" | grep -q "NEEDED.*\[$soname_link\]" || {
  echo "FAIL: the program does not need $soname_link"
  exit 1
}
# Under --config=asan_ubsan the library needs ASan's runtime, which must be loaded first.
if readelf -d "$prefix/lib/libkvcache.so" | grep -q "NEEDED.*libasan"; then
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
fi
output=$("$out")
echo "$output"
grep -q "^engine: kvcache $version" <<<"$output" || { echo "FAIL: version line"; exit 1; }
grep -q "^engine: ok" <<<"$output" || { echo "FAIL: no ok line"; exit 1; }
echo "PASS: installed kvcache $version, built and ran a C program with pkg-config"
