#!/bin/sh
# RDMA tests and measurements; runs inside the Soft-RoCE guest (busybox sh)
# with pagewire, ib_read_lat and ib_read_bw in /bin. Ends with the line
# "N passed, N failed" and a non-zero exit on any failure.
pass=0
fail=0
check() {
    name=$1
    shift
    if "$@"; then echo "PASS $name"; pass=$((pass + 1)); else echo "FAIL $name"; fail=$((fail + 1)); fi
}
has() { grep -q "\"$1\": $2" "$3"; }
start_source() { # port size; leaves the source's pid in $!
    pagewire source --listen "127.0.0.1:$1" --synthetic "$2" -v > "/tmp/src$1.out" 2> "/tmp/src$1.err" &
    for _ in $(seq 50); do grep -q listening "/tmp/src$1.out" 2>/dev/null && break; sleep 0.2; done
    grep -q "serving RDMA READs" "/tmp/src$1.err" || { echo "source on $1 has no RDMA:"; cat "/tmp/src$1.err"; }
}
num() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" "$2" | head -n1; }
# A field of the workload's guest stalls (a touch as the guest saw it).
stall() { sed -n '/"stalls"/,/}/p' "$2" | sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" | head -n1; }
wl_ms() { sed -n '/"workload"/,/"stalls"/p' "$1" | sed -n 's/.*"ms": \([0-9.]*\).*/\1/p' | head -n1; }

start_source 7070 32MiB
for w in seq random hotset stride; do
    timeout 120 pagewire dest --connect 127.0.0.1:7070 --transport rdma --workload "$w" --json > "/tmp/$w.json" 2> "/tmp/$w.err"
    rc=$?
    [ $rc -eq 0 ] || cat "/tmp/$w.err"
    check "rdma migration, workload $w: exit 0, verified, 0 duplicates, source data path idle" \
        sh -c "[ $rc -eq 0 ] && grep -q '\"transport\": \"rdma\"' /tmp/$w.json \
            && grep -q '\"checksum_mismatches\": 0' /tmp/$w.json && grep -q '\"duplicate_pages\": 0' /tmp/$w.json \
            && grep -q '\"pages_verified\": 8192' /tmp/$w.json && grep -q '\"source_requests_served\": 0' /tmp/$w.json \
            && grep -q '\"source_pages_served\": 0' /tmp/$w.json"
done

# Zero-copy: guest memory in a memfd, READs land in a second mapping of it
# (registered as a memory region), pages mapped with UFFDIO_CONTINUE.
for w in random seq; do
    timeout 120 pagewire dest --connect 127.0.0.1:7070 --transport rdma --workload "$w" --memory-backend memfd \
        --json > "/tmp/memfd-$w.json" 2> "/tmp/memfd-$w.err"
    rc=$?
    [ $rc -eq 0 ] || cat "/tmp/memfd-$w.err"
    check "rdma zero-copy into a memfd, workload $w: landed, verified, 0 duplicates, source data path idle" \
        sh -c "[ $rc -eq 0 ] && grep -q '\"install_path\": \"landed\"' /tmp/memfd-$w.json \
            && grep -q '\"checksum_mismatches\": 0' /tmp/memfd-$w.json && grep -q '\"duplicate_pages\": 0' /tmp/memfd-$w.json \
            && grep -q '\"pages_verified\": 8192' /tmp/memfd-$w.json && grep -q '\"source_pages_served\": 0' /tmp/memfd-$w.json"
done

# The source registers guest memory while destinations hold queue pairs
# and deregisters it when the last one is done.
check "source deregisters guest memory between destinations" \
    sh -c "[ \$(grep -c 'guest memory deregistered' /tmp/src7070.err) -ge 5 ] \
        && [ \$(grep -c 'guest memory registered for RDMA READs' /tmp/src7070.err) -ge 6 ]"

# Bulk lanes sleeping on completion events instead of busy-polling.
timeout 120 pagewire dest --connect 127.0.0.1:7070 --transport rdma --rdma-bulk-wait event \
    --workload random --json > /tmp/event.json 2> /tmp/event.err
rc=$?
[ $rc -eq 0 ] || cat /tmp/event.err
check "rdma migration with event-driven bulk lanes: exit 0, verified, 0 duplicates" \
    sh -c "[ $rc -eq 0 ] && grep -q '\"checksum_mismatches\": 0' /tmp/event.json \
        && grep -q '\"duplicate_pages\": 0' /tmp/event.json && grep -q '\"pages_verified\": 8192' /tmp/event.json"

# A source killed mid-migration: a clear error and exit 1, no hang.
start_source 7071 256MiB
victim=$!
(sleep 3; kill -9 "$victim") &
timeout 120 pagewire dest --connect 127.0.0.1:7071 --transport rdma --workload random --no-push --no-bubble \
    --think-us 300 --io-timeout 5 > /tmp/kill.out 2> /tmp/kill.err
rc=$?
tail -n 2 /tmp/kill.err
check "source killed mid-migration: exit 1 with a clear error" \
    sh -c "[ $rc -eq 1 ] && grep -q 'migration failed' /tmp/kill.err && ! grep -q panicked /tmp/kill.err"

# Measurements, side by side on the same rxe device.
perftest() { # tool size iterations: server and client on rxe0, prints the result row
    "$1" -d rxe0 -x 1 -s "$2" -n "$3" > "/tmp/$1.srv" 2>&1 &
    server=$!
    sleep 1
    "$1" -d rxe0 -x 1 -s "$2" -n "$3" 127.0.0.1 > "/tmp/$1.log" 2>&1
    wait $server
    grep -E "^ *$2 " "/tmp/$1.log"
}
echo "PERF ib_read_lat 4096 (t_min t_max t_typical t_avg stdev p99 p99.9, us): $(perftest ib_read_lat 4096 1000)"
echo "PERF ib_read_bw 65536 (MB/s peak, avg): $(perftest ib_read_bw 65536 500)"
for wait in poll event; do
    for i in 1 2 3; do
        pagewire dest --connect 127.0.0.1:7070 --transport rdma --rdma-bulk-wait $wait --workload seq --touches 1 \
            --json > /tmp/w.json 2>/dev/null
        echo "PERF pagewire rdma push, lanes $wait: $(num bytes_received /tmp/w.json) bytes in $(num total_ms /tmp/w.json) ms"
    done
    pagewire dest --connect 127.0.0.1:7070 --transport rdma --rdma-bulk-wait $wait --workload random \
        --json > /tmp/w.json 2>/dev/null
    echo "PERF pagewire rdma random+push, lanes $wait: fault p50 $(num p50 /tmp/w.json) us, p99 $(num p99 /tmp/w.json) us, total $(num total_ms /tmp/w.json) ms"
done
# The push without flow control: what the lanes move when nothing holds
# them back (beside ib_read_bw above).
pagewire dest --connect 127.0.0.1:7070 --transport rdma --no-flow-control --workload seq --touches 1 \
    --json > /tmp/w.json 2>/dev/null
echo "PERF pagewire rdma push, lanes poll, no flow control: $(num bytes_received /tmp/w.json) bytes in $(num total_ms /tmp/w.json) ms"
for t in rdma tcp; do
    for b in anon memfd; do
        pagewire dest --connect 127.0.0.1:7070 --transport $t --memory-backend $b --workload random --no-push --no-bubble \
            --json > /tmp/f$t.json 2>/dev/null
        echo "PERF pagewire $t $b demand fault latency us: p50 $(num p50 /tmp/f$t.json) p99 $(num p99 /tmp/f$t.json) (faults $(num network_faults /tmp/f$t.json)); guest stall p50 $(stall p50 /tmp/f$t.json) p99 $(stall p99 /tmp/f$t.json)"
        pagewire dest --connect 127.0.0.1:7070 --transport $t --memory-backend $b --workload seq --touches 1 \
            --json > /tmp/p$t.json 2>/dev/null
        echo "PERF pagewire $t $b push: $(num bytes_received /tmp/p$t.json) bytes in $(num total_ms /tmp/p$t.json) ms"
    done
done

# The fault service polling for the next fault instead of sleeping.
for spin in 0 100; do
    pagewire dest --connect 127.0.0.1:7070 --transport rdma --fault-spin-us $spin --workload random --no-push --no-bubble \
        --json > /tmp/spin.json 2>/dev/null
    echo "PERF pagewire rdma --fault-spin-us $spin demand faults: engine p50 $(num p50 /tmp/spin.json) us; guest stall p50 $(stall p50 /tmp/spin.json) p99 $(stall p99 /tmp/spin.json) us; workload $(wl_ms /tmp/spin.json) ms"
done
# The same faults without a network, in the same boot: the in-process
# transport (a memcpy) under the same uffd delivery, wake-ups and install,
# which is what a fault costs here beyond the READ.
for b in anon memfd; do
    pagewire demo --transport inproc --size 32MiB --memory-backend $b --workload random --no-push --no-bubble \
        --json > /tmp/inproc.json 2>/dev/null
    echo "PERF pagewire inproc $b demand fault latency us (no network): p50 $(num p50 /tmp/inproc.json) p99 $(num p99 /tmp/inproc.json); guest stall p50 $(stall p50 /tmp/inproc.json) p99 $(stall p99 /tmp/inproc.json)"
done

# RDMA taken away mid-migration while TCP stays (last: it breaks ::1).
# RDMA runs over lo's IPv6 address (GID ::1), TCP over 127.0.0.1; deleting
# ::1 from lo takes RDMA's route away: READs fail, new queue pairs cannot
# reach RTR, and the migration goes on over TCP, saying so.
gid=""
for f in /sys/class/infiniband/rxe0/ports/1/gids/*; do
    [ "$(cat "$f" 2>/dev/null)" = "0000:0000:0000:0000:0000:0000:0000:0001" ] && gid=${f##*/}
done
echo "GID ::1 on rxe0: index ${gid:-none}"
pagewire source --listen 127.0.0.1:7072 --synthetic 64MiB --gid-index "${gid:-2}" -v > /tmp/src7072.out 2> /tmp/src7072.err &
fb_src=$!
for _ in $(seq 50); do grep -q listening /tmp/src7072.out 2>/dev/null && break; sleep 0.2; done
grep -q "serving RDMA READs" /tmp/src7072.err || { echo "source on 7072 has no RDMA:"; cat /tmp/src7072.err; }
(sleep 2; ip -6 addr del ::1/128 dev lo) &
timeout 300 pagewire dest --connect 127.0.0.1:7072 --transport rdma --gid-index "${gid:-2}" --workload random \
    --think-us 300 --no-push --io-timeout 2 --json > /tmp/fb.json 2> /tmp/fb.err
rc=$?
[ $rc -eq 0 ] || tail -n 5 /tmp/fb.err
grep -a "falling back" /tmp/fb.err | head -n 1 | cut -c1-300
grep -o '"transport": "[^"]*"' /tmp/fb.json
check "RDMA route removed mid-migration: falls back to TCP, verified, 0 duplicates" \
    sh -c "[ -n '$gid' ] && [ $rc -eq 0 ] && grep -q '\"transport\": \"rdma, fell back to tcp\"' /tmp/fb.json \
        && grep -q '\"checksum_mismatches\": 0' /tmp/fb.json && grep -q '\"duplicate_pages\": 0' /tmp/fb.json \
        && grep -q '\"pages_verified\": 16384' /tmp/fb.json && ! grep -q '\"link_losses\": 0,' /tmp/fb.json \
        && ! grep -q '\"source_pages_served\": 0,' /tmp/fb.json"
kill "$fb_src" 2>/dev/null

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
