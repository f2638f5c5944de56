#!/usr/bin/env bash
# Fault latency and workload time with the push running, on a link between
# two network namespaces (netlab/two-hosts.sh), beside the floors measured
# in the same run: iperf3 over the same link and demand-only paging.
#
#   netlab/fault-under-load.sh [--rate 1gbit|10gbit|none] [--size 256MiB]
#                              [--workloads "hotset seq"] [--runs N] [--out FILE]
#                              [--guest PATTERN] [--modes REGEX]
#                              [--bubble-sweep "8 16 32 64 128 256"]
#                              [--dest-args "ARGS"]
#
# --bubble-sweep runs, instead of the modes, push with the paper's and
# with the adaptive prepager at each bubble radius given (for the plot of
# network faults against bubble size).
# Workloads are patterns (hotset, seq, random, stride) or trace:NAME, the
# program trace traces/NAME.trace. --modes keeps the modes whose label
# matches REGEX. --dest-args adds ARGS to every destination run, e.g. a
# placement: "--fault-cpus 1 --workload-cpus 1 --reply-spin-us 200".
# Each mode runs N times against one source; the table shows the median
# run of each (by workload time). Raw reports go to FILE (JSON lines).
# With --guest, the guest keeps running at the source (writing in
# PATTERN) until each destination switches over, so every mode has a
# downtime, and the hybrid and pre-copy modes are added; the source is
# then started afresh for every run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rate=1gbit
size=256MiB
workloads="hotset seq random stride"
runs=3
out=""
guest=""
mode_filter=""
sweep=""
dest_args=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) rate=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --guest) guest=$2; shift 2 ;;
        --modes) mode_filter=$2; shift 2 ;;
        --bubble-sweep) sweep=$2; shift 2 ;;
        --dest-args) dest_args=$2; shift 2 ;;
        *) echo "fault-under-load: unknown argument $1" >&2; exit 2 ;;
    esac
done
bin=${PAGEWIRE:-$here/../target/release/pagewire}
[ -x "$bin" ] || { echo "fault-under-load: build first (cargo build --release) or set PAGEWIRE" >&2; exit 2; }
name=pwb$$
out=${out:-$(mktemp /tmp/pagewire-fault-under-load.XXXXXX.jsonl)}
: > "$out"
src_pid=""
cleanup() {
    [ -n "$src_pid" ] && kill "$src_pid" 2>/dev/null || true
    "$here/two-hosts.sh" down --name "$name"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
"$here/two-hosts.sh" up --rate "$rate" --name "$name" >&2

floor_bps=$("$here/two-hosts.sh" iperf --name "$name" || true)
echo "link $rate: iperf3 source -> destination $(python3 -c "print(f'{float(\"${floor_bps:-0}\")/1e6:.0f}')") Mbit/s" >&2
# How cheaply an idle CPU wakes: every fault wakes threads, and where an
# idle CPU halts at once (a virtual machine with halt polling off), each
# wake-up costs a VM exit. Demand paging pays it on every fault; with the
# push running the CPUs are rarely idle (see the README's Performance).
idle_gov=$(cat /sys/devices/system/cpu/cpuidle/current_governor_ro 2>/dev/null \
    || cat /sys/devices/system/cpu/cpuidle/current_governor 2>/dev/null || echo none)
halt_poll_ns=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo none)
echo "cpuidle governor $idle_gov, guest_halt_poll_ns $halt_poll_ns" >&2

start_source() {
    [ -n "$src_pid" ] && { kill "$src_pid" 2>/dev/null; wait "$src_pid" 2>/dev/null || true; }
    local g=()
    [ -n "$guest" ] && g=(--guest-workload "$guest")
    ip netns exec "$name-src" "$bin" source --listen 192.0.2.1:7070 --synthetic "$size" "${g[@]}" >/dev/null 2>&1 &
    src_pid=$!
    # Listening once a connection is accepted.
    for _ in $(seq 100); do
        ip netns exec "$name-dst" bash -c "exec 3<>/dev/tcp/192.0.2.1/7070" 2>/dev/null && return
        sleep 0.1
    done
    echo "fault-under-load: the source did not start" >&2
    exit 1
}
start_source

modes=("demand-only|--no-push --no-bubble" "bubbles, no push|--no-push" "push only (sweep, no bubbles)|--no-bubble" "push + paper's bubbles|--prepager paper" "push + bubbles|" "push + bubbles, linear sweep|--linear-sweep" "push, sweep restarts at each fault (QEMU)|--no-bubble --sweep-from-fault" "push + bubbles, no flow control|--no-flow-control")
if [ -n "$sweep" ]; then
    modes=()
    for b in $sweep; do
        modes+=("paper's bubbles, radius $b|--prepager paper --bubble $b|$b|paper" "adaptive prepager, radius $b|--bubble $b|$b|adaptive")
    done
elif [ -n "$guest" ]; then
    modes+=("hybrid: 2 pre-copy rounds, then push + bubbles|--precopy-rounds 2" "pre-copy baseline (stop-and-copy, ≤ 30 rounds)|--precopy-rounds 30 --stop-and-copy")
fi
for w in $workloads; do
    case $w in
        trace:*) wargs="--workload trace --trace $here/../traces/${w#trace:}.trace" ;;
        *) wargs="--workload $w" ;;
    esac
    for m in "${modes[@]}"; do
        IFS='|' read -r label args sweep_radius sweep_kind <<< "$m"
        if [ -n "$mode_filter" ] && ! grep -qE "$mode_filter" <<< "$label"; then continue; fi
        for i in $(seq "$runs"); do
            # A paused guest cannot be migrated again: a fresh source.
            [ -n "$guest" ] && start_source
            # shellcheck disable=SC2086
            ip netns exec "$name-dst" "$bin" dest --connect 192.0.2.1:7070 --transport tcp \
                $wargs --json $args $dest_args > "$out.run" 2>/dev/null || { echo "run failed: $w $label" >&2; continue; }
            IDLE="$idle_gov $halt_poll_ns" DEST_ARGS="$dest_args" MODE="$label" RATE="$rate" GUEST="$guest" BPS="${floor_bps:-0}" SWEEP="${sweep_radius:-}" KIND="${sweep_kind:-}" python3 -c "
import json, os
r = json.load(open('$out.run'))
r['mode'] = os.environ['MODE']; r['rate'] = os.environ['RATE']; r['dest_args'] = os.environ['DEST_ARGS']
r['host_idle'] = dict(zip(['cpuidle_governor', 'guest_halt_poll_ns'], os.environ['IDLE'].split()))
r['source_guest'] = os.environ['GUEST']; r['iperf3_bps'] = float(os.environ['BPS'])
if os.environ['SWEEP']:
    r['bubble_sweep'] = int(os.environ['SWEEP']); r['prepager'] = os.environ['KIND']
print(json.dumps(r))" >> "$out"
        done
        echo -n "." >&2
    done
done
rm -f "$out.run"
echo >&2
python3 - "$out" <<'EOF'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in rows:
    w = r["workload"]["pattern"]
    if r["workload"].get("trace"):
        w = "trace-" + r["workload"]["trace"]
    by[(w, r["mode"])].append(r)
print(f"| workload | mode | fault p50 µs | fault p99 µs | p99 vs demand | guest stall p99 µs | vs demand | workload ms | vs demand | network faults | in-flight waits p99 µs | total ms | push MB/s | downtime ms | pages sent (× guest) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
base = {}
for (w, mode), rs in by.items():
    rs.sort(key=lambda r: r["workload"]["ms"])
    r = rs[len(rs) // 2]
    if mode == "demand-only":
        base[w] = r
for (w, mode), rs in by.items():
    rs.sort(key=lambda r: r["workload"]["ms"])
    r = rs[len(rs) // 2]
    b = base.get(w, r)
    l = r["fault_latency_us"]
    st, bst = r["workload"].get("stalls", {}).get("p99", 0), b["workload"].get("stalls", {}).get("p99", 0)
    mbps = r["bytes_received"] / (r["total_ms"] / 1000) / 1e6 if r["total_ms"] else 0
    print(f"| {w} | {mode} | {l['p50']:.0f} | {l['p99']:.0f} | {l['p99'] / max(b['fault_latency_us']['p99'], 1e-9):.2f}× "
          f"| {st:.0f} | {st / max(bst, 1e-9):.2f}× "
          f"| {r['workload']['ms']:.0f} | {r['workload']['ms'] / max(b['workload']['ms'], 1e-9):.2f}× | {r['network_faults']} "
          f"| {r['inflight_wait_us']['p99']:.0f} | {r['total_ms']:.0f} | {mbps:.0f} "
          f"| {r['downtime_ms'] if r.get('downtime_ms') is not None else float('nan'):.1f} "
          f"| {r.get('pages_transferred', 0) / (r['pages_total'] * r.get('page_size', 4096) / 4096):.2f} |")
EOF
echo "raw reports: $out" >&2
