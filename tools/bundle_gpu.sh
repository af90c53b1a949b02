#!/usr/bin/env bash
# Builds the GPU-facing test and benchmark binaries with -c opt and gathers them, with the
# non-system shared libraries they load, into one self-contained folder (default gpu-bundle/) that
# runs on any Linux x86-64 host with an NVIDIA driver for CUDA 13:
#
#   tools/bundle_gpu.sh [OUT_DIR]
#   OUT_DIR/run_all.sh LOG_DIR [--memcheck] [--racecheck] [--no-bench]
#
# GPU tests are the test targets tagged "gpu"; GPU benchmarks are the binaries under //benchmarks
# tagged "gpu"; binaries tagged "gpu_tool" (the trace replay) are copied to tools/ but not run. Extra bazel flags can be passed in BAZEL_FLAGS.
set -euo pipefail

cd "$(dirname "$0")/.."
out="${1:-gpu-bundle}"
flags=(-c opt ${BAZEL_FLAGS:-})

tests=$(bazel query --noshow_progress 'attr(tags, "\bgpu\b", tests(//...))' 2>/dev/null)
benches=$(bazel query --noshow_progress \
  'attr(tags, "\bgpu\b", kind("cc_binary", //benchmarks/...))' 2>/dev/null || true)
gpu_tools=$(bazel query --noshow_progress 'attr(tags, "\bgpu_tool\b", kind("cc_binary", //...))' \
  2>/dev/null || true)
if [[ -z "$tests" ]]; then
  echo "bundle_gpu: no test target is tagged gpu" >&2
  exit 1
fi
# The Python package's GPU run (issue #19): libkvcache.so and the C++ reference run.
python_targets="//api:libkvcache.so //python:reference_dump"
# shellcheck disable=SC2086
bazel build "${flags[@]}" $tests $benches $gpu_tools $python_targets

rm -rf "$out"
mkdir -p "$out/tests" "$out/benchmarks" "$out/tools" "$out/lib" "$out/data"
bin_dir=$(bazel info "${flags[@]}" bazel-bin 2>/dev/null)
copy_target() {  # label, destination folder
  local label="$1" dest="$2"
  local path="${label#//}"
  path="${path/://}"
  install -m 755 "$bin_dir/$path" "$dest/"
}
for t in $tests; do copy_target "$t" "$out/tests"; done
for b in $benches; do copy_target "$b" "$out/benchmarks"; done
for g in $gpu_tools; do copy_target "$g" "$out/tools"; done

# Shared libraries every Linux host has (glibc and the driver) stay behind; the rest travel.
system_lib='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|libpthread\.|librt\.|libcuda\.|libnvidia)'
for exe in "$out"/tests/* "$out"/benchmarks/* "$out"/tools/*; do
  [[ -e "$exe" ]] || continue
  ldd "$exe" | awk '/=> \// {print $1, $3}' | while read -r name path; do
    if [[ ! "$name" =~ $system_lib && ! -e "$out/lib/$name" ]]; then
      cp -L "$path" "$out/lib/$name"
    fi
  done
done
# python/: the package with libkvcache.so inside it (found next to the package), its tests, the
# headers the struct-layout test compiles against, and the C++ reference run.
mkdir -p "$out/python/kvcache" "$out/python/tests" "$out/python/include/dlpack"
install -m 644 python/kvcache/*.py "$out/python/kvcache/"
install -m 755 "$bin_dir/api/libkvcache.so" "$out/python/kvcache/libkvcache.so"
install -m 644 python/tests/test_kvcache.py "$out/python/tests/"
install -m 755 python/tests/run_python_tests.sh "$out/python/"
install -m 755 "$bin_dir/python/reference_dump" "$out/python/"
install -m 644 api/kvcache_c.h "$out/python/include/"
install -m 644 /usr/include/dlpack/dlpack.h "$out/python/include/dlpack/"
# Experiment scripts that run the bundle's binaries (e.g. experiments/attention_variants.sh).
mkdir -p "$out/experiments"
install -m 755 benchmarks/experiments/*.sh "$out/experiments/"
if [[ -d ../shared/data ]]; then
  cp ../shared/data/*.jsonl "$out/data/" 2>/dev/null || true
fi

cat > "$out/run_all.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every GPU test (optionally under compute-sanitizer) and every GPU benchmark of this bundle.
#   run_all.sh LOG_DIR [--memcheck] [--racecheck] [--no-bench] [--no-tests]
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${1:?usage: run_all.sh LOG_DIR [--memcheck] [--racecheck] [--no-bench] [--no-tests]}"
shift
memcheck=0 racecheck=0 bench=1 tests=1
for arg in "$@"; do
  case "$arg" in
    --memcheck) memcheck=1 ;;
    --racecheck) racecheck=1 ;;
    --no-bench) bench=0 ;;
    --no-tests) tests=0 ;;
    *) echo "unknown flag $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$logs"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KVCACHE_DATA_DIR="$here/data"
sanitizer="$(command -v compute-sanitizer || true)"
[[ -z "$sanitizer" && -x /usr/local/cuda/bin/compute-sanitizer ]] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
failed=0
summary=()
run() {  # name, log file, command...
  local name="$1" log="$2"
  shift 2
  local start=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-8s %-48s %4ds  %s' "$([[ $rc -eq 0 ]] && echo PASS || echo FAIL)" "$name" $((SECONDS - start)) "$log")")
  [[ $rc -eq 0 ]] || failed=1
}
if [[ $tests -eq 1 ]]; then
  for t in "$here"/tests/*; do
    name=$(basename "$t")
    run "$name" "$logs/$name.log" "$t"
    # A sanitizer run needs at least one test under the filter (compute-sanitizer fails a
    # process that launches nothing).
    if ! "$t" --gtest_list_tests --gtest_filter="${KVCACHE_SANITIZER_FILTER:-*}" 2>/dev/null |
        grep -q '^  '; then
      continue
    fi
    if [[ $memcheck -eq 1 ]]; then
      run "$name (memcheck)" "$logs/$name.memcheck.log" "$sanitizer" --tool memcheck \
        --error-exitcode 1 --leak-check full "$t" --gtest_filter="${KVCACHE_SANITIZER_FILTER:-*}"
    fi
    if [[ $racecheck -eq 1 ]]; then
      run "$name (racecheck)" "$logs/$name.racecheck.log" "$sanitizer" --tool racecheck \
        --error-exitcode 1 "$t" --gtest_filter="${KVCACHE_SANITIZER_FILTER:-*}"
    fi
  done
fi
if [[ $tests -eq 1 && -x "$here/python/run_python_tests.sh" ]]; then
  # The Python package on CUDA tensors (torch; PYTHON names an interpreter that has it).
  run "python package (cuda)" "$logs/python_package.log" "$here/python/run_python_tests.sh" cuda
fi
if [[ $bench -eq 1 ]]; then
  for b in "$here"/benchmarks/*; do
    [[ -e "$b" ]] || continue
    name=$(basename "$b")
    run "$name" "$logs/$name.log" "$b" --benchmark_repetitions=5 \
      --benchmark_report_aggregates_only=true
  done
fi
printf '%s\n' "${summary[@]}" | tee "$logs/summary.txt"
exit $failed
RUN
chmod +x "$out/run_all.sh"
echo "bundle_gpu: $(ls "$out/tests" | wc -l) tests, $(ls "$out/benchmarks" | wc -l) benchmarks," \
  "$(ls "$out/lib" | wc -l) libraries in $out ($(du -sh "$out" | cut -f1))"
