#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces joined by a veth pair,
# optionally rate-shaped with tbf on both ends (this kernel has tbf and htb
# but no netem, so no added delay). Traffic stays between the two
# namespaces.
#
#   netlab/two-hosts.sh up [--rate 1gbit|10gbit|none] [--name PREFIX]
#   netlab/two-hosts.sh down [--name PREFIX]
#   netlab/two-hosts.sh exec src|dst [--name PREFIX] -- CMD [ARGS...]
#   netlab/two-hosts.sh run [--rate R] [--name PREFIX] -- CMD [ARGS...]
#   netlab/two-hosts.sh iperf [--name PREFIX]     # TCP floor, source -> destination
#
# `run` sets the link up, runs CMD on the host (use `exec` inside it or the
# printed addresses), and tears the link down when CMD ends, fails or is
# interrupted. The source namespace is PREFIX-src with address 192.0.2.1,
# the destination PREFIX-dst with 192.0.2.2 (TEST-NET-1: documentation
# addresses that exist only inside these namespaces). Shaping is the
# paper's LAN: `tbf rate R burst 256kb latency 50ms` on both veth ends.
set -euo pipefail

SRC_ADDR=192.0.2.1
DST_ADDR=192.0.2.2
name=pw
rate=1gbit
cmd=${1:-}
shift || true
side=""
if [ "$cmd" = exec ]; then side=${1:-}; shift || true; fi
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) rate=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "two-hosts: unknown argument $1" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" -eq 0 ] || { echo "two-hosts: needs root (network namespaces)" >&2; exit 2; }
command -v ip >/dev/null && command -v tc >/dev/null || {
    echo "two-hosts: ip and tc are missing (apt-get install iproute2)" >&2; exit 2; }

src=$name-src
dst=$name-dst

down() {
    ip netns del "$src" 2>/dev/null || true
    ip netns del "$dst" 2>/dev/null || true
}

shape() { # netns dev
    case "$rate" in
        none|unshaped) ;;
        *) ip -n "$1" link set dev "$2" txqueuelen 1000
           tc -n "$1" qdisc replace dev "$2" root tbf rate "$rate" burst 256kb latency 50ms ;;
    esac
}

up() {
    down
    ip netns add "$src"
    ip netns add "$dst"
    ip link add "$name-s0" netns "$src" type veth peer name "$name-d0" netns "$dst"
    ip -n "$src" addr add "$SRC_ADDR/24" dev "$name-s0"
    ip -n "$dst" addr add "$DST_ADDR/24" dev "$name-d0"
    for ns in "$src" "$dst"; do ip -n "$ns" link set lo up; done
    ip -n "$src" link set "$name-s0" up
    ip -n "$dst" link set "$name-d0" up
    shape "$src" "$name-s0"
    shape "$dst" "$name-d0"
    # Wait for the carrier on both ends.
    for _ in $(seq 50); do
        ip -n "$src" link show "$name-s0" | grep -q LOWER_UP \
            && ip -n "$dst" link show "$name-d0" | grep -q LOWER_UP && break
        sleep 0.1
    done
    echo "two-hosts: $src ($SRC_ADDR) <-> $dst ($DST_ADDR), rate $rate"
}

case "$cmd" in
    up) up ;;
    down) down ;;
    exec)
        case "$side" in
            src) exec ip netns exec "$src" "$@" ;;
            dst) exec ip netns exec "$dst" "$@" ;;
            *) echo "two-hosts: exec src|dst -- CMD" >&2; exit 2 ;;
        esac
        ;;
    run)
        [ $# -ge 1 ] || { echo "two-hosts: run needs a command" >&2; exit 2; }
        trap down EXIT
        trap 'exit 130' INT TERM
        up >&2
        "$@"
        ;;
    iperf)
        command -v iperf3 >/dev/null || { echo "two-hosts: iperf3 is missing" >&2; exit 2; }
        ip netns exec "$dst" iperf3 -s -1 -B "$DST_ADDR" >/dev/null 2>&1 &
        server=$!
        sleep 0.3
        ip netns exec "$src" iperf3 -c "$DST_ADDR" -t 2 -J 2>/dev/null \
            | sed -n 's/.*"bits_per_second":[[:space:]]*\([0-9.e+]*\).*/\1/p' | tail -n1
        wait "$server" 2>/dev/null || true
        ;;
    *)
        sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
        [ -z "$cmd" ] || [ "$cmd" = help ] || exit 2
        ;;
esac
