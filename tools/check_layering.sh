#!/usr/bin/env bash
# Fails when an #include points upward in the package layering (DESIGN.md, "The parts and their
# direction"), or when a public header includes anything but api/ and core/.
#
#   package      may include (besides itself and third-party headers)
#   core         -
#   storage      core
#   kernels      core
#   allocator    core
#   events       allocator core
#   api          events allocator storage kernels core
#   testing      api events allocator storage kernels core
#   tests        testing api events allocator storage kernels core
#   benchmarks   testing api events allocator storage kernels core
#   fuzz         testing api events allocator storage kernels core
#
# Usage: check_layering.sh FILE...   (paths relative to the workspace root; Bazel passes the
# sources of every package through //tools:layering_test).
set -euo pipefail

declare -A allowed=(
  [core]=""
  [storage]="core"
  [kernels]="core"
  [allocator]="core"
  [events]="allocator core"
  [api]="events allocator storage kernels core"
  [testing]="api events allocator storage kernels core"
  [tests]="testing api events allocator storage kernels core"
  [benchmarks]="testing api events allocator storage kernels core"
  [fuzz]="testing api events allocator storage kernels core"
)
ours=" ${!allowed[*]} "
# The headers engines include: only api/ and core/ may appear in them.
public_headers=" api/kv_cache_manager.h api/kv_cache_config.h api/metrics.h api/tensor_view.h api/layer_view.h api/block_table_view.h api/attention_options.h api/kvcache_c.h core/kv_event.h "
public_headers=" api/kv_cache_manager.h api/kv_cache_config.h api/metrics.h api/tensor_view.h api/layer_view.h api/block_table_view.h api/graph_step_inputs.h api/attention_options.h api/kvcache_c.h "

bad=0
for file in "$@"; do
  pkg=${file%%/*}
  [[ -n ${allowed[$pkg]+set} ]] || { echo "layering: $file is in no known package"; bad=1; continue; }
  while IFS=: read -r line target; do
    dep=${target%%/*}
    [[ $target == */* && $ours == *" $dep "* ]] || continue
    [[ $dep == "$pkg" ]] && ok=1 || ok=0
    [[ " ${allowed[$pkg]} " == *" $dep "* ]] && ok=1
    if [[ $public_headers == *" $file "* && $dep != api && $dep != core ]]; then ok=0; fi
    if ((!ok)); then
      echo "layering: $file:$line includes \"$target\": $pkg/ may not include $dep/"
      bad=1
    fi
  done < <(grep -n '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$file" |
             sed -E 's/^([0-9]+):[^"]*"([^"]*)".*/\1:\2/')
done
if ((bad)); then exit 1; fi
echo "layering: $# files, every include points down"
