#!/usr/bin/env bash
# The host tier's cost on the whole trace, on one GPU host, inside a bundle
# made by tools/bundle_gpu.sh (which copies this script to experiments/):
#
#   experiments/tier_replay_ab.sh LOG_DIR [RUN...]
#
# Replays the conversation trace with the README's GPU shape (32 layers, 8
# KV heads of 128, int8, 117,560 blocks, 256 running, 8192 tokens a step)
# once per RUN, in the order given, so that runs alternate on the same host
# state. A RUN is a tier setting with optional prefixes:
#   notier   --host_tier_gb=0
#   engines  --host_tier_gb=64 --tier_copy_thread_blocks=0 (the copy engines)
#   ctas4    --host_tier_gb=64 --tier_copy_thread_blocks=4
#   w...     --pipeline=false (each step waits for its kernels before the
#            next is planned), e.g. wnotier
#   g...     --cuda_graph, e.g. gengines or wgengines
#   ...@N    --steps_in_flight=N, e.g. engines@3
# Default RUNS: notier engines wnotier wengines. MAX_REQUESTS (default 0: all
# 12,031) shortens the replay; TIMEOUT (s, default 150) bounds each run;
# EXTRA_FLAGS go to every run; REPLAY names another replay binary (default
# the bundle's tools/replay), so that two builds can alternate on one host.
# One log per run, and a summary of hit rate, tier traffic, wall time and the
# step-time split in LOG_DIR/summary.txt, ending with each RUN's wall times
# and their median (repeat a RUN, alternating, to compare medians).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bundle="${KVCACHE_BUNDLE:-$(dirname "$here")}"
logs="${1:?usage: tier_replay_ab.sh LOG_DIR [RUN...]}"
shift
runs=("$@")
[[ ${#runs[@]} -gt 0 ]] || runs=(notier engines wnotier wengines)
mkdir -p "$logs"
export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
replay=("${REPLAY:-$bundle/tools/replay}" --backend=cuda
        --trace="$bundle/data/mooncake_conversation_trace.jsonl"
        --max_requests="${MAX_REQUESTS:-0}" --num_layers=32 --num_kv_heads=8
        --head_size=128 --num_blocks=117560 --max_running=256
        --token_budget=8192 ${EXTRA_FLAGS:-})
i=0
declare -A walls  # RUN -> its runs' wall times (s), in run order.
for run in "${runs[@]}"; do
  i=$((i + 1))
  flags=()
  name="$run"
  if [[ "$name" == *@* ]]; then
    flags+=(--steps_in_flight="${name#*@}")
    name="${name%@*}"
  fi
  if [[ "$name" == w* ]]; then flags+=(--pipeline=false); name="${name#w}"; fi
  if [[ "$name" == g* ]]; then flags+=(--cuda_graph); name="${name#g}"; fi
  case "$name" in
    notier) flags+=(--host_tier_gb=0) ;;
    engines) flags+=(--host_tier_gb=64 --tier_copy_thread_blocks=0) ;;
    ctas4) flags+=(--host_tier_gb=64 --tier_copy_thread_blocks=4) ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
  log="$logs/${i}_$run.log"
  timeout "${TIMEOUT:-150}" "${replay[@]}" "${flags[@]}" >"$log" 2>&1
  echo "=== $i $run (${flags[*]}) ${REPLAY:+[$REPLAY]}: exit $?" >>"$logs/summary.txt"
  grep -E "prefix hit rate|host tier |tier offload|sat out|kernel time|step time by part|plan by call|device time|wall time" \
    "$log" | sed 's/^/  /' >>"$logs/summary.txt"
  wall=$(awk '/wall time/ {print $3}' "$log")
  [[ -n "$wall" ]] && walls[$run]+=" $wall"
done
# Wall times by RUN, in the order first run, with their median.
for run in $(printf '%s\n' "${runs[@]}" | awk '!seen[$0]++'); do
  [[ -n "${walls[$run]:-}" ]] || continue
  echo "${walls[$run]}" | tr ' ' '\n' | sort -n | awk -v run="$run" -v all="${walls[$run]}" '
    NF { t[++n] = $1 }
    END { m = n % 2 ? t[(n + 1) / 2] : (t[n / 2] + t[n / 2 + 1]) / 2
          printf "wall time %s:%s s (median %.1f s of %d)\n", run, all, m, n }'
done >>"$logs/summary.txt"
cat "$logs/summary.txt"
