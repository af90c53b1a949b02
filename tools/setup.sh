#!/usr/bin/env bash
# Installs what kvcache needs to build and test, from Debian's packages only. Idempotent: a second
# run finds everything installed and takes seconds. Run as root on Debian 12 (or with sudo).
set -euo pipefail

PACKAGES=(
  bazel-bootstrap
  g++
  libabsl-dev
  libspdlog-dev
  libfmt-dev
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libxxhash-dev
  nlohmann-json3-dev
  libdlpack-dev
  # KV events (issue #18): ZeroMQ's header (libzmq5, which it brings, is loaded at run time only
  # by a manager that publishes), cppzmq for the C++ test subscriber, msgpack-c++ (header-only),
  # and Debian's pyzmq and msgpack for the Python test subscriber.
  libzmq3-dev
  cppzmq-dev
  libmsgpack-cxx-dev
  python3-zmq
  python3-msgpack
  # Packaging (issue #19): pkg-config for the install test's C program, Debian's python3 and numpy
  # for the Python package's tests.
  pkgconf
  # dpkg-source, to unpack Abseil's Debian source package (below).
  dpkg-dev
  python3
  python3-numpy
  # Reliability checks in .ci/run: clang/clang++ and libFuzzer (libclang_rt.fuzzer-x86_64.a) for
  # --config=fuzz; gcc's ASan/UBSan/TSan runtimes come with g++.
  clang
  libclang-rt-14-dev
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} > 0)); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Abseil's source: Debian's source package of the installed libabsl-dev (same version, same Debian
# patches, headers identical to /usr/include/absl), compiled by Bazel (third_party/absl.BUILD).
# Debian's libabsl_*.a are built as PIE (local-exec TLS, PC32 relocations against libstdc++), so
# they cannot go into libkvcache.so, which must carry its own Abseil (issue #19). The machine's own
# apt sources are read as deb-src entries into a private list; the system's apt setup is unchanged.
ABSL_SRC_ROOT=/opt/kvcache
absl_version=$(dpkg-query -W -f='${Version}' libabsl-dev)
if [[ "$(cat "$ABSL_SRC_ROOT/abseil/.debian-version" 2>/dev/null)" != "$absl_version" ]]; then
  echo "setup: fetching Abseil's Debian source package ($absl_version)"
  work=$(mktemp -d)
  mkdir -p "$work/parts" "$work/lists/partial"
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e "$f" ]] && sed 's/^Types:.*/Types: deb-src/' "$f" >"$work/parts/$(basename "$f")"
  done
  sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list >"$work/src.list" 2>/dev/null || true
  apt_opts=(-o "Dir::Etc::SourceList=$work/src.list" -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists")
  apt-get "${apt_opts[@]}" update -qq
  (cd "$work" && apt-get "${apt_opts[@]}" source -qq "abseil=$absl_version" >/dev/null)
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  $SUDO mkdir -p "$ABSL_SRC_ROOT"
  $SUDO rm -rf "$ABSL_SRC_ROOT/abseil"
  # Its own Bazel files would split the tree into packages that third_party/absl.BUILD's globs
  # cannot cross.
  find "$work"/abseil-*/ \( -name BUILD.bazel -o -name BUILD -o -name WORKSPACE \) -delete
  $SUDO mv "$work"/abseil-*/ "$ABSL_SRC_ROOT/abseil"
  echo "$absl_version" | $SUDO tee "$ABSL_SRC_ROOT/abseil/.debian-version" >/dev/null
  rm -rf "$work"
fi

echo "setup: bazel $(dpkg-query -W -f='${Version}' bazel-bootstrap) (bazel-bootstrap)"
nvcc_bin=""
for candidate in "${CUDA_PATH:-}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then nvcc_bin="$candidate"; break; fi
done
if [[ -n "$nvcc_bin" ]]; then
  echo "setup: nvcc $("$nvcc_bin" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $nvcc_bin: CPU and CUDA backends"
else
  echo "setup: no CUDA toolkit: CPU backend only"
fi
