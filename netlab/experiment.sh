#!/usr/bin/env bash
# The experiment matrix, one command: every mode and workload of
# netlab/fault-under-load.sh over each link and guest size, the bubble
# radius sweep, then docs/results.md with tables and SVG plots
# (`pagewire results`).
#
#   netlab/experiment.sh [--rates "1gbit 10gbit none"] [--sizes "256MiB 2GiB"]
#                        [--runs N] [--out DIR] [--workloads "hotset trace:xz ..."]
#                        [--guest PATTERN|none] [--sweep-radii "8 16 ..."|none]
#                        [--sweep-workloads "..."]
#
# The guest keeps running at the source, writing in PATTERN (default
# hotset), until each destination switches over: every mode then has a
# downtime, and the hybrid and pre-copy baseline modes run too. With
# --guest none the source serves static memory (post-copy modes only).
# The sweep (paper's vs adaptive prepager at each radius) runs on the
# first rate and size. Raw reports stay in DIR/raw/ (JSON lines, one file
# per size and link, replaced when run again) and results.md is rendered
# from all of them, so a run with other sizes adds to the results; each
# command is logged in DIR/raw/COMMANDS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rates="1gbit 10gbit none"
sizes="256MiB 2GiB"
runs=3
out="$here/../docs"
guest=hotset
workloads="hotset seq random stride trace:xz trace:sort trace:python-kv trace:gcc"
radii="8 16 32 64 128 256"
sweep_workloads="hotset stride trace:xz trace:gcc"
all_args="$*"
while [ $# -gt 0 ]; do
    case $1 in
        --rates) rates=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --guest) guest=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        --sweep-radii) radii=$2; shift 2 ;;
        --sweep-workloads) sweep_workloads=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "experiment: unknown argument $1" >&2; exit 2 ;;
    esac
done
bin=${PAGEWIRE:-$here/../target/release/pagewire}
[ -x "$bin" ] || { echo "experiment: build first (cargo build --release) or set PAGEWIRE" >&2; exit 2; }
mkdir -p "$out/raw"
cells=0
for size in $sizes; do for rate in $rates; do cells=$((cells + 1)); done; done
[ "$radii" != none ] && cells=$((cells + 1))
cell=0
started=$(date +%s)
g=()
[ "$guest" != none ] && g=(--guest "$guest")
for size in $sizes; do
    for rate in $rates; do
        cell=$((cell + 1))
        f="$out/raw/$size-$rate.jsonl"
        echo "experiment: [$cell/$cells] $size guest, link $rate" >&2
        "$here/fault-under-load.sh" --rate "$rate" --size "$size" --runs "$runs" --out "$f" \
            --workloads "$workloads" "${g[@]}" > "$out/raw/$size-$rate.md"
    done
done
if [ "$radii" != none ]; then
    size=${sizes%% *}
    rate=${rates%% *}
    cell=$((cell + 1))
    echo "experiment: [$cell/$cells] bubble radius sweep, $size guest, link $rate" >&2
    "$here/fault-under-load.sh" --rate "$rate" --size "$size" --runs "$runs" \
        --out "$out/raw/sweep-$size-$rate.jsonl" --workloads "$sweep_workloads" \
        --bubble-sweep "$radii" > "$out/raw/sweep-$size-$rate.md"
fi
commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "$(date -u +%Y-%m-%d) netlab/experiment.sh $all_args  # $(( ($(date +%s) - started) / 60 )) min, commit $commit" >> "$out/raw/COMMANDS"
PAGEWIRE_RESULTS_COMMAND="netlab/experiment.sh (the runs in raw/COMMANDS)" \
    "$bin" results --out "$out" "$out"/raw/*.jsonl
