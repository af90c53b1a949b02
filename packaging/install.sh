#!/usr/bin/env bash
# Installs libkvcache.so for engines built without Bazel:
#
#   bazel run -c opt //:install -- PREFIX
#
#   PREFIX/lib/libkvcache.so.X.Y.Z        the library (exports only the kvcache_* C API)
#   PREFIX/lib/libkvcache.so.X            soname link
#   PREFIX/lib/libkvcache.so              development link (-lkvcache)
#   PREFIX/include/kvcache/kvcache_c.h    #include <kvcache/kvcache_c.h>
#   PREFIX/include/kvcache/dlpack/dlpack.h  the DLPack 0.6 header kvcache_c.h includes (Debian's
#                                         libdlpack-dev), found beside it, so no system copy is needed
#   PREFIX/lib/pkgconfig/kvcache.pc       pkg-config --cflags --libs kvcache
#
# A relative PREFIX is taken from the directory bazel run was called in.
set -euo pipefail

prefix="${1:?usage: bazel run //:install -- PREFIX}"
if [[ "$prefix" != /* ]]; then prefix="${BUILD_WORKING_DIRECTORY:-$PWD}/$prefix"; fi

# The runfiles: bazel run sets RUNFILES_DIR, a test TEST_SRCDIR; else beside this script.
runfiles="${RUNFILES_DIR:-${TEST_SRCDIR:-$0.runfiles}}"
main="$runfiles/kvcache"
dlpack="$runfiles/dlpack/include/dlpack/dlpack.h"
[[ -e "$dlpack" ]] || dlpack="$main/external/dlpack/include/dlpack/dlpack.h"
for f in "$main/api/libkvcache.so" "$main/api/kvcache_c.h" "$dlpack" \
  "$main/packaging/kvcache.pc.template"; do
  [[ -e "$f" ]] || { echo "install: missing $f" >&2; exit 1; }
done

template="$main/packaging/kvcache.pc.template"
version=$(sed -n 's/^Version: //p' "$template")
soname=$(sed -n 's/.*soname \(libkvcache\.so\.[0-9]*\).*/\1/p' "$template")

install -d "$prefix/lib/pkgconfig" "$prefix/include/kvcache/dlpack"
install -m 755 "$main/api/libkvcache.so" "$prefix/lib/libkvcache.so.$version"
ln -sfn "libkvcache.so.$version" "$prefix/lib/$soname"
ln -sfn "$soname" "$prefix/lib/libkvcache.so"
install -m 644 "$main/api/kvcache_c.h" "$prefix/include/kvcache/kvcache_c.h"
install -m 644 "$dlpack" "$prefix/include/kvcache/dlpack/dlpack.h"
sed "s|@PREFIX@|$prefix|" "$template" >"$prefix/lib/pkgconfig/kvcache.pc"
chmod 644 "$prefix/lib/pkgconfig/kvcache.pc"
echo "install: kvcache $version into $prefix (lib/libkvcache.so.$version, include/kvcache/," \
  "lib/pkgconfig/kvcache.pc)"
