#!/usr/bin/env python3
"""Estimates the best workload time any push order can give the hotset
workload on a link, to put a measured ratio beside what is reachable.

The model: the guest makes `--touches` touches drawn like `pagewire dest
--workload hotset` (Zipf, s = 1.1, ranks counted up from a base page), a
quarter of the pages are zero (never sent, as in the synthetic source),
each touch of a page not yet there blocks for `--fault-us` (take it from a
demand-only run: workload ms / network faults), every other touch costs
`--touch-us`. An oracle push sends the non-zero pages in rank order (the
hottest first, which no real push knows), skipping those already faulted
in, at the link's page rate less the pages faults fetch. The output is the modelled demand-only time, the
oracle's, and their ratio; a random push order is shown for contrast.

    netlab/hotset-bound.py --rate-mbps 119 --fault-us 68
"""

import argparse
import bisect
import random


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=65536, help="guest pages (256 MiB of 4 KiB)")
    ap.add_argument("--touches", type=int, default=65536, help="touches the workload makes")
    ap.add_argument("--rate-mbps", type=float, default=119.0, help="link goodput, MB/s (iperf3)")
    ap.add_argument("--fault-us", type=float, default=68.0, help="guest time per network fault")
    ap.add_argument("--touch-us", type=float, default=0.3, help="guest time per touch that does not fault")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    n = a.pages
    rng = random.Random(a.seed)
    cum, c = [], 0.0
    for r in range(1, n + 1):
        c += r ** -1.1
        cum.append(c)
    touches = [bisect.bisect_left(cum, rng.random() * c) for _ in range(a.touches)]
    zero = {p for p in range(n) if random.Random(a.seed * 7919 + p).random() < 0.25}
    page_rate = a.rate_mbps * 1e6 / 4096

    def run(order, push):
        order = [p for p in order if p not in zero]
        t, faults, have = 0.0, 0, set()
        cursor, sent = 0, 0
        for p in touches:
            # The push has sent what the link carried so far, less what
            # faults fetched, skipping pages the guest already faulted in.
            budget = int(t * page_rate) - faults if push else 0
            while sent < budget and cursor < len(order):
                q = order[cursor]
                cursor += 1
                if q not in have:
                    have.add(q)
                    sent += 1
            if p in zero or p in have:
                t += a.touch_us * 1e-6
                continue
            faults += 1
            have.add(p)
            t += a.fault_us * 1e-6
        return faults, t * 1e3

    demand = run(range(n), False)
    oracle = run(range(n), True)
    shuffled = list(range(n))
    random.Random(a.seed + 1).shuffle(shuffled)
    rand = run(shuffled, True)
    print(f"demand-only:          {demand[0]} faults, {demand[1]:.0f} ms")
    print(f"oracle push (by rank): {oracle[0]} faults, {oracle[1]:.0f} ms, {oracle[1] / demand[1]:.2f}x")
    print(f"random-order push:     {rand[0]} faults, {rand[1]:.0f} ms, {rand[1] / demand[1]:.2f}x")


if __name__ == "__main__":
    main()
