#!/usr/bin/env bash
# Re-records the shipped traces: real programs' first-touch order of their
# anonymous memory (`pagewire record-trace`), replayed by
# `--workload trace --trace traces/NAME.trace`.
#
#   traces/record.sh            (needs xz, sort, python3 and gcc)
#
# Inputs are generated with fixed seeds, so runs differ only by timing:
# pages first touched within one sampling interval (500 µs) are listed by
# address.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${PAGEWIRE:-$here/../target/release/pagewire}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp" <<'PY'
import random, sys
d = sys.argv[1]
random.seed(1)
words = [''.join(random.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(random.randint(3, 10))) for _ in range(5000)]
with open(f'{d}/text.txt', 'w') as f:
    for i in range(600000):
        f.write(' '.join(random.choice(words) for _ in range(12)) + '\n')
random.seed(2)
out = ['typedef unsigned long uint64_t;']
for i in range(3000):
    a, b, c = random.randint(1, 99), random.randint(1, 99), random.randint(1, 99)
    out.append(f'''uint64_t f{i}(uint64_t x, uint64_t y) {{
    uint64_t s = {a};
    for (int k = 0; k < (int)(x % {b} + 3); k++) {{
        s = s * {c} + (y ^ (s >> {a % 31 + 1}));
        if (s & 1) s += f{max(i - 1, 0)}(x + k, y) ; else s ^= {b};
    }}
    return s + x * {c};
}}''')
open(f'{d}/big.c', 'w').write('\n'.join(out))
PY
# Compression: xz at its default level over 54 MB of text.
"$bin" record-trace --out "$here/xz.trace" -- xz -6 -T1 -k -c "$tmp/text.txt" > /dev/null
# Sorting the same text in memory.
"$bin" record-trace --out "$here/sort.trace" -- sort -S 200M -o /dev/null "$tmp/text.txt"
# A key-value store load: 1.5 M keys into a Python dict, then lookups.
py=$(command -v python3)
[ -x /usr/bin/python3 ] && py=/usr/bin/python3   # not a shim that forks
"$bin" record-trace --out "$here/python-kv.trace" -- "$py" -c "
d = {}
for i in range(1_500_000):
    d['key%d' % (i * 7919 % 1_500_000)] = ('value', i, str(i) * 3)
s = 0
for i in range(0, 1_500_000, 3):
    s += d['key%d' % i][1]
print(s)
" > /dev/null
# A compiler: gcc's cc1 at -O2 over 3000 generated functions.
"$bin" record-trace --out "$here/gcc.trace" -- "$(gcc -print-prog-name=cc1)" -quiet -O2 "$tmp/big.c" -o "$tmp/big.s"
