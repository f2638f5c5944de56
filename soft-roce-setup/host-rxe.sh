#!/usr/bin/env bash
# Brings Soft-RoCE up (or down) on a host whose kernel ships rdma_rxe.
#   soft-roce-setup/host-rxe.sh up [NETDEV]    (default NETDEV: lo)
#   soft-roce-setup/host-rxe.sh down
# Idempotent. On `lo` use GID index 1 (::ffff:127.0.0.1); on an Ethernet
# device GID index 0 works. Kernels without RDMA: use guest-run.sh.
set -euo pipefail
dev=rxe0
case "${1:-}" in
    up)
        netdev=${2:-lo}
        if ! modprobe rdma_rxe 2>/dev/null; then
            echo "host-rxe: this kernel has no rdma_rxe module; use soft-roce-setup/guest-run.sh" >&2
            exit 1
        fi
        ip link set "$netdev" up
        rdma link show "$dev/1" >/dev/null 2>&1 || rdma link add "$dev" type rxe netdev "$netdev"
        if ! ibv_devinfo -d "$dev" | grep -q PORT_ACTIVE; then
            echo "host-rxe: $dev exists but its port is not ACTIVE" >&2
            ibv_devinfo -d "$dev" >&2 || true
            exit 1
        fi
        echo "host-rxe: $dev on $netdev is ACTIVE"
        ;;
    down)
        rdma link show "$dev/1" >/dev/null 2>&1 && rdma link delete "$dev"
        echo "host-rxe: $dev removed"
        ;;
    *)
        sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
