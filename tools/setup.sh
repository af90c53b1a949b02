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
