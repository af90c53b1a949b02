#!/usr/bin/env bash
# The host tier's cost on the whole trace, on one GPU host, inside a bundle
# made by tools/bundle_gpu.sh (which copies this script to experiments/):
#
#   experiments/tier_replay_ab.sh LOG_DIR [ROUNDS]
#
# Replays the conversation trace with the README's GPU shape (32 layers, 8
# KV heads of 128, int8, 117,560 blocks, 256 running, 8192 tokens a step)
# ROUNDS times (default 1) in the order: no tier, 64 GiB tier with the copy
# engines (tier_copy_thread_blocks=0), 64 GiB tier with 4 copy thread blocks
# (the default), so that each round compares the three on the same host
# state. MAX_REQUESTS (default 0: all 12,031) shortens it; TIMEOUT (s,
# default 150) bounds each run; EXTRA_FLAGS (e.g. --cuda_graph) go to every
# run. One log per run, and a summary of hit rate,
# wall time and the step-time split at the end of LOG_DIR/summary.txt.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bundle="${KVCACHE_BUNDLE:-$(dirname "$here")}"
logs="${1:?usage: tier_replay_ab.sh LOG_DIR [ROUNDS]}"
rounds="${2:-1}"
mkdir -p "$logs"
export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
replay=("$bundle/tools/replay" --backend=cuda
        --trace="$bundle/data/mooncake_conversation_trace.jsonl"
        --max_requests="${MAX_REQUESTS:-0}" --num_layers=32 --num_kv_heads=8
        --head_size=128 --num_blocks=117560 --max_running=256
        --token_budget=8192 ${EXTRA_FLAGS:-})
for ((r = 1; r <= rounds; ++r)); do
  for run in notier engines ctas4; do
    case "$run" in
      notier) flags=(--host_tier_gb=0) ;;
      engines) flags=(--host_tier_gb=64 --tier_copy_thread_blocks=0) ;;
      ctas4) flags=(--host_tier_gb=64 --tier_copy_thread_blocks=4) ;;
    esac
    log="$logs/round${r}_$run.log"
    timeout "${TIMEOUT:-150}" "${replay[@]}" "${flags[@]}" >"$log" 2>&1
    echo "round $r $run: exit $?" >>"$logs/summary.txt"
    grep -E "prefix hit rate|sat out|kernel time|step time by part|wall time" \
      "$log" | sed 's/^/  /' >>"$logs/summary.txt"
  done
done
cat "$logs/summary.txt"
