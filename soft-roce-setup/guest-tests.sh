#!/bin/sh
# RDMA tests and measurements; runs inside the Soft-RoCE guest (busybox sh)
# with pagewire, ib_read_lat and ib_read_bw in /bin. Ends with the line
# "N passed, N failed" and a non-zero exit on any failure.
#
# Under TCG everything is many times slower than on hardware, and CI hosts
# slower still: nothing here waits a fixed time for something to happen.
# Each wait polls for proof of it, bounded, and a wait that runs out is a
# failure. Every run of pagewire has a timeout of its own.
pass=0
fail=0
suite_t0=$(date +%s)
check() {
    name=$1
    shift
    if "$@"; then echo "PASS $name"; pass=$((pass + 1)); else echo "FAIL $name"; fail=$((fail + 1)); fi
}
failed() { echo "FAIL $1"; fail=$((fail + 1)); }
has() { grep -q "\"$1\": $2" "$3"; }
# wait_for SECS COMMAND...: runs COMMAND every 0.2 s until it succeeds (0),
# gives up (exit status 2 or more) or SECS seconds pass (status 1).
wait_for() {
    wf_end=$(($(date +%s) + $1))
    shift
    while :; do
        "$@"
        wf_rc=$?
        [ $wf_rc -eq 0 ] && return 0
        [ $wf_rc -ge 2 ] && return $wf_rc
        [ "$(date +%s)" -lt "$wf_end" ] || return 1
        sleep 0.2
    done
}
alive() { kill -0 "$1" 2>/dev/null; }
# Whether the source $1 (pid) printed "listening" to $2; 2 once it is gone.
listening() { grep -q listening "$2" 2>/dev/null && return 0; alive "$1" || return 2; return 1; }
start_source() { # port size [ARGS...]; leaves the source's pid in $src
    sp=$1 ss=$2
    shift 2
    pagewire source --listen "127.0.0.1:$sp" --synthetic "$ss" "$@" -v > "/tmp/src$sp.out" 2> "/tmp/src$sp.err" &
    src=$!
    if ! wait_for 60 listening "$src" "/tmp/src$sp.out"; then
        failed "source on port $sp listening within 60 s ($(alive "$src" && echo "still not listening" || echo "it exited"))"
        cat "/tmp/src$sp.err"
    fi
    grep -q "serving RDMA READs" "/tmp/src$sp.err" || { echo "source on $sp has no RDMA:"; cat "/tmp/src$sp.err"; }
}
num() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" "$2" | head -n1; }
# A field of the workload's guest stalls (a touch as the guest saw it).
stall() { sed -n '/"stalls"/,/}/p' "$2" | sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" | head -n1; }
wl_ms() { sed -n '/"workload"/,/"stalls"/p' "$1" | sed -n 's/.*"ms": \([0-9.]*\).*/\1/p' | head -n1; }

# Proof that a destination is migrating, before a test disrupts it: run
# with -v, it logs "post-copy migration started" once every channel (queue
# pair) is open, and then its private guest memory grows by 1 MiB (256
# pages installed, each fetched by an RDMA READ that completed). The
# source's "guest memory registered for RDMA READs" is no proof: it logs
# that at start, before it listens.
rss_anon() { sed -n 's/^RssAnon:[^0-9]*\([0-9]*\) kB.*/\1/p' "/proc/$1/status" 2>/dev/null; }
dest_pid() { # the pagewire under `timeout` $1 (busybox's timeout execs it: $1 itself)
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = timeout ] || { echo "$1"; return; }
    for s in /proc/[0-9]*/stat; do
        read -r dp_pid _ _ dp_ppid _ 2>/dev/null < "$s" && [ "$dp_ppid" = "$1" ] && { echo "$dp_pid"; return; }
    done
    echo "$1"
}
started() { grep -q "post-copy migration started" "$2" 2>/dev/null && return 0; alive "$1" || return 2; return 1; }
grown() { # pid kB: RssAnon at least kB; 2 once the process is gone
    alive "$1" || return 2
    gr_kb=$(rss_anon "$1")
    [ -n "$gr_kb" ] && [ "$gr_kb" -ge "$2" ] && return 0
    return 1
}
migrating() { # pid stderr-file (of `pagewire dest -v`): waits up to 60 s for each proof
    mg_t0=$(date +%s)
    if ! wait_for 60 started "$1" "$2"; then
        echo "destination: no \"post-copy migration started\" within 60 s ($(alive "$1" && echo running || echo exited)):"
        tail -n 5 "$2"
        return 1
    fi
    mg_pid=$(dest_pid "$1")
    mg_base=$(rss_anon "$mg_pid")
    if ! wait_for 60 grown "$mg_pid" $((${mg_base:-0} + 1024)); then
        echo "destination: guest memory did not grow by 1 MiB within 60 s of the start (RssAnon ${mg_base:-?} -> $(rss_anon "$mg_pid") kB, $(alive "$1" && echo running || echo exited))"
        tail -n 5 "$2"
        return 1
    fi
    echo "destination migrating $(($(date +%s) - mg_t0)) s after launch (RssAnon ${mg_base} -> $(rss_anon "$mg_pid") kB)"
}

# The source registers guest memory at start, hands that registration to
# the first destination, registers again for each later one, and
# deregisters when a destination's queue pairs are gone. After each
# destination the source is given up to 60 s to deregister, so that the
# next destination registers anew: n destinations, n of each exactly.
dests=0
late=""
deregistered() { grep -c 'guest memory deregistered' /tmp/src7070.err; }
registered() { grep -c 'guest memory registered for RDMA READs' /tmp/src7070.err; }
let_go() { [ "$(deregistered)" -ge "$dests" ] && return 0; alive "$src7070" || return 2; return 1; }
after_dest() {
    dests=$((dests + 1))
    if ! wait_for 60 let_go; then
        echo "source on 7070: $(deregistered) deregistrations after $dests destinations ($(alive "$src7070" && echo "waited 60 s" || echo "the source exited"))"
        late="$late $dests"
    fi
}

start_source 7070 32MiB
src7070=$src
# rdma_dest NAME ARGS...: a destination over RDMA from the source on 7070,
# its report in /tmp/NAME.json; leaves its exit status in $rc.
rdma_dest() {
    rd_name=$1
    shift
    timeout 120 pagewire dest --connect 127.0.0.1:7070 --transport rdma "$@" --json \
        > "/tmp/$rd_name.json" 2> "/tmp/$rd_name.err"
    rc=$?
    [ $rc -eq 0 ] || cat "/tmp/$rd_name.err"
}
# clean_rdma FILE: that run exited 0, every page of the 32 MiB guest
# verified, 0 duplicates, no page through the source's data path.
clean_rdma() {
    [ "$rc" -eq 0 ] && has checksum_mismatches 0 "$1" && has duplicate_pages 0 "$1" \
        && has pages_verified 8192 "$1" && has source_pages_served 0 "$1"
}
for w in seq random hotset stride; do
    rdma_dest "$w" --workload "$w"
    check "rdma migration, workload $w: exit 0, verified, 0 duplicates, source data path idle" \
        eval "clean_rdma /tmp/$w.json && has transport '\"rdma\"' /tmp/$w.json \
            && has source_requests_served 0 /tmp/$w.json"
    after_dest
done

# Zero-copy: guest memory in a memfd, READs land in a second mapping of it
# (registered as a memory region), pages mapped with UFFDIO_CONTINUE.
for w in random seq; do
    rdma_dest "memfd-$w" --workload "$w" --memory-backend memfd
    check "rdma zero-copy into a memfd, workload $w: landed, verified, 0 duplicates, source data path idle" \
        eval "clean_rdma /tmp/memfd-$w.json && has install_path '\"landed\"' /tmp/memfd-$w.json"
    after_dest
done

# Guest memory on 2 MiB pages (hugetlbfs): each fault READs a whole huge
# page in pieces the RDMA channel carries, the push paced around faults.
echo 24 > /proc/sys/vm/nr_hugepages
for w in random seq; do
    rdma_dest "huge-$w" --workload "$w" --memory-backend hugetlb
    check "rdma into 2 MiB pages, workload $w: verified, 0 duplicates, source data path idle" \
        eval "clean_rdma /tmp/huge-$w.json && has page_size 2097152 /tmp/huge-$w.json"
    after_dest
    echo "PERF pagewire rdma 2 MiB pages, $w + push: fault p50 $(num p50 /tmp/huge-$w.json) us, p99 $(num p99 /tmp/huge-$w.json) us (faults $(num faults /tmp/huge-$w.json)), total $(num total_ms /tmp/huge-$w.json) ms"
done

# The source registers guest memory while destinations hold queue pairs
# and deregisters it when the last one is done: once per destination.
echo "source on 7070 after $dests destinations: $(registered) registrations, $(deregistered) deregistrations"
check "source registers guest memory for each destination and deregisters it after each ($dests each)" \
    sh -c "[ -z '$late' ] && [ \$(grep -c 'guest memory deregistered' /tmp/src7070.err) -eq $dests ] \
        && [ \$(grep -c 'guest memory registered for RDMA READs' /tmp/src7070.err) -eq $dests ]"

# Bulk lanes sleeping on completion events instead of busy-polling.
timeout 120 pagewire dest --connect 127.0.0.1:7070 --transport rdma --rdma-bulk-wait event \
    --workload random --json > /tmp/event.json 2> /tmp/event.err
rc=$?
[ $rc -eq 0 ] || cat /tmp/event.err
check "rdma migration with event-driven bulk lanes: exit 0, verified, 0 duplicates" \
    sh -c "[ $rc -eq 0 ] && grep -q '\"checksum_mismatches\": 0' /tmp/event.json \
        && grep -q '\"duplicate_pages\": 0' /tmp/event.json && grep -q '\"pages_verified\": 8192' /tmp/event.json"

# A source killed mid-migration: a clear error and exit 1, no hang. It is
# killed once the destination is migrating (proof above), not after a
# fixed time that a slow host may not have started it in.
start_source 7071 256MiB
victim=$src
timeout 120 pagewire dest --connect 127.0.0.1:7071 --transport rdma --workload random --no-push --no-bubble \
    --think-us 300 --io-timeout 5 -v > /tmp/kill.out 2> /tmp/kill.err &
kill_dest=$!
migrating "$kill_dest" /tmp/kill.err || failed "source killed mid-migration: the destination was migrating before the kill"
kill -9 "$victim"
wait "$kill_dest"
rc=$?
tail -n 2 /tmp/kill.err
check "source killed mid-migration: exit 1 with a clear error" \
    sh -c "[ $rc -eq 1 ] && grep -q 'migration failed' /tmp/kill.err && ! grep -q panicked /tmp/kill.err"

# Measurements, side by side on the same rxe device.
perftest() { # tool size iterations: server and client on rxe0, prints the result row
    timeout 60 "$1" -d rxe0 -x 1 -s "$2" -n "$3" > "/tmp/$1.srv" 2>&1 &
    server=$!
    # The client retries while the server is not listening yet.
    for try in 1 2 3 4 5 6 7 8 9 10; do
        sleep 1
        timeout 60 "$1" -d rxe0 -x 1 -s "$2" -n "$3" 127.0.0.1 > "/tmp/$1.log" 2>&1 && break
        grep -q "Couldn't connect" "/tmp/$1.log" || break
    done
    wait $server
    grep -E "^ *$2 " "/tmp/$1.log" || { echo "$1: no result (client try $try):" >&2; cat "/tmp/$1.srv" "/tmp/$1.log" >&2; }
}
echo "PERF ib_read_lat 4096 (t_min t_max t_typical t_avg stdev p99 p99.9, us): $(perftest ib_read_lat 4096 1000)"
echo "PERF ib_read_bw 65536 (MB/s peak, avg): $(perftest ib_read_bw 65536 500)"
# One measured run of pagewire: at most 120 s, so that a run that hangs is
# a failure, not the end of the guest's time; a run that fails is one too.
measure() { # json-file pagewire-args...
    me_json=$1
    shift
    timeout 120 pagewire "$@" --json > "$me_json" 2> /tmp/measure.err
    me_rc=$?
    [ $me_rc -eq 0 ] && return 0
    case $me_rc in 124 | 137 | 143) me_why="timed out after 120 s" ;; *) me_why="exit $me_rc" ;; esac
    failed "measurement pagewire $*: $me_why"
    tail -n 5 /tmp/measure.err
    return 1
}
for wait in poll event; do
    for i in 1 2 3; do
        measure /tmp/w.json dest --connect 127.0.0.1:7070 --transport rdma --rdma-bulk-wait $wait --workload seq --touches 1
        echo "PERF pagewire rdma push, lanes $wait: $(num bytes_received /tmp/w.json) bytes in $(num total_ms /tmp/w.json) ms"
    done
    measure /tmp/w.json dest --connect 127.0.0.1:7070 --transport rdma --rdma-bulk-wait $wait --workload random
    echo "PERF pagewire rdma random+push, lanes $wait: fault p50 $(num p50 /tmp/w.json) us, p99 $(num p99 /tmp/w.json) us, total $(num total_ms /tmp/w.json) ms"
done
# The push without flow control: what the lanes move when nothing holds
# them back (beside ib_read_bw above).
measure /tmp/w.json dest --connect 127.0.0.1:7070 --transport rdma --no-flow-control --workload seq --touches 1
echo "PERF pagewire rdma push, lanes poll, no flow control: $(num bytes_received /tmp/w.json) bytes in $(num total_ms /tmp/w.json) ms"
for t in rdma tcp; do
    for b in anon memfd; do
        measure /tmp/f$t.json dest --connect 127.0.0.1:7070 --transport $t --memory-backend $b --workload random --no-push --no-bubble
        echo "PERF pagewire $t $b demand fault latency us: p50 $(num p50 /tmp/f$t.json) p99 $(num p99 /tmp/f$t.json) (faults $(num network_faults /tmp/f$t.json)); guest stall p50 $(stall p50 /tmp/f$t.json) p99 $(stall p99 /tmp/f$t.json)"
        measure /tmp/p$t.json dest --connect 127.0.0.1:7070 --transport $t --memory-backend $b --workload seq --touches 1
        echo "PERF pagewire $t $b push: $(num bytes_received /tmp/p$t.json) bytes in $(num total_ms /tmp/p$t.json) ms"
    done
done
# Over TCP, memfd memory is copied in with UFFDIO_COPY by default; the same
# push landed (received and written into the memfd), in the same boot.
measure /tmp/pland.json dest --connect 127.0.0.1:7070 --transport tcp --memory-backend memfd --shared-install land --workload seq --touches 1
echo "PERF pagewire tcp memfd push, landed: $(num bytes_received /tmp/pland.json) bytes in $(num total_ms /tmp/pland.json) ms ($(grep -o '"install_path": "[a-z-]*"' /tmp/pland.json))"

# The fault service polling for the next fault instead of sleeping.
for spin in 0 100; do
    measure /tmp/spin.json dest --connect 127.0.0.1:7070 --transport rdma --fault-spin-us $spin --workload random --no-push --no-bubble
    echo "PERF pagewire rdma --fault-spin-us $spin demand faults: engine p50 $(num p50 /tmp/spin.json) us; guest stall p50 $(stall p50 /tmp/spin.json) p99 $(stall p99 /tmp/spin.json) us; workload $(wl_ms /tmp/spin.json) ms"
done
# The fault service on the workload's CPU and no lane there (this guest
# has two vCPUs): a fault is then served without a wake-up across CPUs.
# Over TCP it also polls for the reply (RDMA always polls).
measure /tmp/placed.json dest --connect 127.0.0.1:7070 --transport rdma --lane-cpus 0 --fault-cpus 1 --workload-cpus 1 --workload random --no-push --no-bubble
echo "PERF pagewire rdma demand faults, fault service beside the workload: engine p50 $(num p50 /tmp/placed.json) us; guest stall p50 $(stall p50 /tmp/placed.json) p99 $(stall p99 /tmp/placed.json) us; workload $(wl_ms /tmp/placed.json) ms"
# A fault service on each vCPU, nothing else pinned: whichever vCPU the
# workload runs on, a service is woken there.
measure /tmp/placed.json dest --connect 127.0.0.1:7070 --transport rdma --fault-cpus 0,1 --workload random --no-push --no-bubble
echo "PERF pagewire rdma demand faults, a fault service on each vCPU: engine p50 $(num p50 /tmp/placed.json) us; guest stall p50 $(stall p50 /tmp/placed.json) p99 $(stall p99 /tmp/placed.json) us; workload $(wl_ms /tmp/placed.json) ms"
measure /tmp/placed.json dest --connect 127.0.0.1:7070 --transport tcp --lane-cpus 0 --fault-cpus 1 --workload-cpus 1 --reply-spin-us 2000 --workload random --no-push --no-bubble
echo "PERF pagewire tcp demand faults, fault service beside the workload, polling: engine p50 $(num p50 /tmp/placed.json) us; guest stall p50 $(stall p50 /tmp/placed.json) p99 $(stall p99 /tmp/placed.json) us; workload $(wl_ms /tmp/placed.json) ms"
# The same faults without a network, in the same boot: the in-process
# transport (a memcpy) under the same uffd delivery, wake-ups and install,
# which is what a fault costs here beyond the READ.
for b in anon memfd; do
    measure /tmp/inproc.json demo --transport inproc --size 32MiB --memory-backend $b --workload random --no-push --no-bubble
    echo "PERF pagewire inproc $b demand fault latency us (no network): p50 $(num p50 /tmp/inproc.json) p99 $(num p99 /tmp/inproc.json); guest stall p50 $(stall p50 /tmp/inproc.json) p99 $(stall p99 /tmp/inproc.json)"
done

# RDMA taken away mid-migration while TCP stays (last: it breaks ::1).
# RDMA runs over lo's IPv6 address (GID ::1), TCP over 127.0.0.1; deleting
# ::1 from lo takes RDMA's route away: READs fail, new queue pairs cannot
# reach RTR, and the migration goes on over TCP, saying so. TCP is only
# taken once a READ has completed (before, failing RDMA is a configuration
# to fix), so ::1 goes once the destination is migrating (proof above).
gid=""
for f in /sys/class/infiniband/rxe0/ports/1/gids/*; do
    [ "$(cat "$f" 2>/dev/null)" = "0000:0000:0000:0000:0000:0000:0000:0001" ] && gid=${f##*/}
done
echo "GID ::1 on rxe0: index ${gid:-none}"
start_source 7072 64MiB --gid-index "${gid:-2}"
fb_src=$src
timeout 300 pagewire dest --connect 127.0.0.1:7072 --transport rdma --gid-index "${gid:-2}" --workload random \
    --think-us 300 --no-push --io-timeout 2 -v --json > /tmp/fb.json 2> /tmp/fb.err &
fb_dest=$!
migrating "$fb_dest" /tmp/fb.err || failed "RDMA route removed mid-migration: the destination was migrating before"
ip -6 addr del ::1/128 dev lo
wait "$fb_dest"
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

echo "guest suite: $(($(date +%s) - suite_t0)) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
