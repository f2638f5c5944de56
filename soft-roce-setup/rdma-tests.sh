#!/usr/bin/env bash
# Runs the RDMA tests inside the Soft-RoCE guest: builds pagewire, boots
# the guest, runs guest-tests.sh there. Reports SKIPPED with the reason
# where the guest cannot run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
for t in qemu-system-x86_64 busybox rdma ib_read_lat ib_read_bw; do
    if ! command -v "$t" >/dev/null; then
        echo "RDMA tests: SKIPPED ($t is not installed; run soft-roce-setup/install-deps.sh)"
        exit 0
    fi
done
cargo build --release --quiet -p pagewire-vmm-glue
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
# The guest's whole budget. The suite takes 1-4 minutes here (2 cores,
# TCG; it prints its own time); each migration in it has a timeout of its
# own (120 s, 300 s for the fallback) and each wait is bounded (60 s), so
# a run that hangs costs its timeout and is reported as a FAIL, and 900 s
# leaves room for a host several times slower plus a few hung runs while
# `./dev test` stays well under 30 minutes on CI.
"$here/guest-run.sh" --timeout 900 \
    --bin target/release/pagewire \
    --bin "$(command -v ib_read_lat)" --bin "$(command -v ib_read_bw)" \
    --bin "$here/guest-tests.sh" -- 'guest-tests.sh' 2>&1 | grep -av '^\[ *[0-9]' | tee "$out"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    echo "RDMA tests: FAILED (guest exit status $rc)" >&2
    exit 1
fi
echo "RDMA tests: all passed in the Soft-RoCE guest"
