#!/usr/bin/env bash
# The experiment matrix, one command: every mode and workload of
# netlab/fault-under-load.sh over each link and guest size, then
# docs/results.md with tables and SVG plots (`pagewire results`).
#
#   netlab/experiment.sh [--rates "1gbit 10gbit none"] [--sizes "256MiB 2GiB"]
#                        [--runs N] [--out DIR] [--workloads "hotset seq ..."]
#                        [--guest PATTERN|none]
#
# The guest keeps running at the source, writing in PATTERN (default
# hotset), until each destination switches over: every mode then has a
# downtime, and the hybrid and pre-copy baseline modes run too. With
# --guest none the source serves static memory (post-copy modes only).
#
# Needs root (network namespaces) and a release build. Raw reports stay in
# DIR/raw/ (JSON lines), so results can be re-rendered without re-running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rates="1gbit 10gbit none"
sizes="256MiB 2GiB"
runs=3
out="$here/../docs"
guest=hotset
workloads="hotset seq random stride"
while [ $# -gt 0 ]; do
    case $1 in
        --rates) rates=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --guest) guest=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "experiment: unknown argument $1" >&2; exit 2 ;;
    esac
done
bin=${PAGEWIRE:-$here/../target/release/pagewire}
[ -x "$bin" ] || { echo "experiment: build first (cargo build --release) or set PAGEWIRE" >&2; exit 2; }
mkdir -p "$out/raw"
cells=0
for size in $sizes; do for rate in $rates; do cells=$((cells + 1)); done; done
cell=0
files=()
for size in $sizes; do
    for rate in $rates; do
        cell=$((cell + 1))
        f="$out/raw/$size-$rate.jsonl"
        echo "experiment: [$cell/$cells] $size guest, link $rate" >&2
        g=()
        [ "$guest" != none ] && g=(--guest "$guest")
        "$here/fault-under-load.sh" --rate "$rate" --size "$size" --runs "$runs" --out "$f" \
            --workloads "$workloads" "${g[@]}" > "$out/raw/$size-$rate.md"
        files+=("$f")
    done
done
PAGEWIRE_RESULTS_COMMAND="netlab/experiment.sh --rates \"$rates\" --sizes \"$sizes\" --runs $runs --workloads \"$workloads\" --guest $guest" \
    "$bin" results --out "$out" "${files[@]}"
