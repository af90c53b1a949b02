#!/usr/bin/env bash
# libkvcache.so exports exactly the functions declared in kvcache_c.h (nothing of Abseil, spdlog,
# fmt, the C++ library or the CUDA runtime), has the soname libkvcache.so.MAJOR, and loads no shared
# library but glibc's, libstdc++ and libgcc_s.
set -euo pipefail
so=api/libkvcache.so
header=api/kvcache_c.h

exported=$(readelf -W --dyn-syms "$so" |
  awk '$7 != "UND" && ($5 == "GLOBAL" || $5 == "WEAK" || $5 == "UNIQUE") {print $8}' |
  sed 's/@.*//' | sort -u)
# Each KVCACHE_EXPORT declaration, joined with its next line (clang-format may break after the type).
declared=$(awk '/^KVCACHE_EXPORT /{getline next_line; print $0 " " next_line}' "$header" |
  grep -o 'kvcache_[a-z_0-9]*(' | tr -d '(' | sort -u)
count=$(echo "$exported" | wc -l)
echo "libkvcache.so exports $count symbols"
if [[ "$exported" != "$declared" ]]; then
  echo "FAIL: exported symbols differ from kvcache_c.h's functions:"
  diff <(echo "$declared") <(echo "$exported") | sed 's/^</  declared, not exported:/; s/^>/  exported, not declared:/'
  exit 1
fi
if [[ $count -lt 20 ]]; then
  echo "FAIL: only $count symbols found"
  exit 1
fi

major=$(sed -n 's/^#define KVCACHE_VERSION_MAJOR \([0-9]*\)/\1/p' "$header")
soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [[ "$soname" != "libkvcache.so.$major" ]]; then
  echo "FAIL: soname '$soname', expected libkvcache.so.$major"
  exit 1
fi

# (and a sanitizer's runtime, in a --config=asan/ubsan/tsan build)
allowed='^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux-x86-64|libasan|libubsan|libtsan)\.so'
bad=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | grep -Ev "$allowed" || true)
if [[ -n "$bad" ]]; then
  echo "FAIL: libkvcache.so needs shared libraries it should carry: $bad"
  exit 1
fi
echo "PASS: $count kvcache_* symbols, soname $soname, needs only $(readelf -d "$so" |
  sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
