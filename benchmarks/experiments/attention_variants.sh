#!/usr/bin/env bash
# Compares the decode attention kernel variants (AttentionParams::variant,
# kAttentionVariantNames in kernels/attention_params.h) on one GPU, inside a
# bundle made by tools/bundle_gpu.sh (which copies this script to
# experiments/):
#
#   experiments/attention_variants.sh LOG_DIR
#
# 1. attention_benchmark --variants=...: the copy baseline, then int8, fp8 and
#    bf16 caches at 64 x 8k, 8 x 64k and 256 x 1k, every variant timed on the
#    same inputs in each of 10 iterations (medians of 10 runs of 20 launches),
#    each checked against the CPU twin; no Gather-then-dense path. Summary
#    table at the end of LOG_DIR/attention_variants_benchmark.log (vs_first:
#    speed relative to the first listed variant, by default 8 "auto_v4", the
#    launcher's policy with the v4 kernel's operand-order K copies, against
#    0 "auto" (the same policy, K rows copied in row order) and the row-copy
#    variants 9-13 with forced heads and blocks per multiprocessor).
# 2. cuda_attention_test with every variant on each case of the shape matrix
#    and the long contexts (one reference per case); per-variant PASS/FAIL
#    lines at the end of LOG_DIR/cuda_attention_test_variants.log.
# VARIANTS=8,0 restricts both (the first listed is the benchmark's
# reference; all 14: VARIANTS=8,0,1,2,3,4,5,6,7,9,10,11,12,13); TEST_TIMEOUT
# (s, default 420) bounds the test.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bundle="${KVCACHE_BUNDLE:-$(dirname "$here")}"
logs="${1:?usage: attention_variants.sh LOG_DIR}"
mkdir -p "$logs"
export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
variants="${VARIANTS:-8,0,9,10,11,12,13}"
summary=()
run() {  # name, log, command...
  local name="$1" log="$2"
  shift 2
  local start=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-8s %-40s %4ds  %s' "$([[ $rc -eq 0 ]] && echo PASS || echo "FAIL($rc)")" \
    "$name" $((SECONDS - start)) "$log")")
  return $rc
}
run "attention_benchmark variants $variants" "$logs/attention_variants_benchmark.log" \
  "$bundle/benchmarks/attention_benchmark" --variants="$variants" --gather_dense=0
run "cuda_attention_test variants $variants" "$logs/cuda_attention_test_variants.log" \
  env KVCACHE_ATTENTION_VARIANTS="$variants" timeout "${TEST_TIMEOUT:-420}" \
  "$bundle/tests/cuda_attention_test"
{
  printf '%s\n' "${summary[@]}"
  echo
  sed -n '/^copy bandwidth/,$p' "$logs/attention_variants_benchmark.log"
  echo
  grep -E '^(PASS|FAIL) ' "$logs/cuda_attention_test_variants.log"
} | tee "$logs/summary.txt"
