#!/usr/bin/env bash
# Side by side, in one run on one machine: Tailscale's derper and Hydrascale's DERP relay
# under the same DERP benchmark (benches/derp_relay.rs): throughput of 1,400-byte packets
# (delivered packets per CPU-second of the server), one-way latency at a fixed rate, and
# resident memory per idle client connection. Both serve plain HTTP on loopback with STUN
# off and clients unverified. ROUNDS rounds alternate derper and one Hydrascale replica,
# so that whatever else the machine does lands on both; MESH=1 adds a three-replica run
# (through one replica, across the mesh, around all three). derper's own mesh needs TLS
# between its servers and is not measured.
#
# Usage: scripts/bench-vs-derper.sh
# Knobs: ROUNDS (2), MESH (0), DERP_BENCH_SECS (5), DERP_BENCH_PAIRS (4),
#        DERP_BENCH_RATE (2000), DERP_BENCH_IDLE (2000), DERP_BENCH_PORT_BASE (31000),
#        OUT (/tmp/hydrascale-vs-derper), DERPER (.tools/bin/derper, from
#        scripts/install-bench-peers.sh).
# Benchmarks only: CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-2}"
MESH="${MESH:-0}"
OUT="${OUT:-/tmp/hydrascale-vs-derper}"
DERPER="${DERPER:-${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}/bin/derper}"
export DERP_BENCH_PORT_BASE="${DERP_BENCH_PORT_BASE:-31000}"
[ -x "$DERPER" ] || { echo "$DERPER missing: scripts/install-bench-peers.sh builds it" >&2; exit 1; }
mkdir -p "$OUT"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# The benchmark binary, built once (release profile, as `cargo bench` builds it).
bench=$(cargo bench --bench derp_relay --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "derp_relay" and m.get("executable"):
        print(m["executable"])')
[ -x "$bench" ] || { echo "could not build benches/derp_relay.rs: cargo bench --bench derp_relay --no-run" >&2; exit 1; }

echo "bench-vs-derper: $("$DERPER" -version 2>/dev/null | head -1 || echo derper) vs hydrascale ($bench), $ROUNDS round(s)" >&2
for round in $(seq 1 "$ROUNDS"); do
  DERP_BENCH_DERPER="$DERPER" "$bench" --bench | tee "$OUT/derper-$round.txt"
  DERP_BENCH_REPLICAS=1 "$bench" --bench | tee "$OUT/hydrascale-1-$round.txt"
done
if [ "$MESH" = 1 ]; then
  DERP_BENCH_REPLICAS=3 "$bench" --bench | tee "$OUT/hydrascale-3.txt"
fi

python3 - "$OUT" "$ROUNDS" <<'PY' | tee "$OUT/table.md"
import os, re, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def parse(path):
    t = open(path).read()
    r = {}
    m = re.search(r"throughput, one replica\s+delivered\s+(\d+) pkt/s.*?used ([\d.]+) cores: (\d+) pkt/s per core", t)
    if m:
        r["pps"], r["cores"], r["per_core"] = int(m[1]), float(m[2]), int(m[3])
    m = re.search(r"latency, one replica\s+\d+ pkt/s, from send\s*: p50 ([\d.]+) ms\s+p99 ([\d.]+) ms", t)
    if m:
        r["p50"], r["p99"] = float(m[1]), float(m[2])
    m = re.search(r"idle connections\s+(\d+) opened: replica RSS (\d+) KiB -> (\d+) KiB, ([\d.]+) KiB per connection", t)
    if m:
        r["idle"], r["per_idle"] = int(m[1]), float(m[4])
    return r
print("| Server | Round | Delivered (packets/s) | Server CPU (cores) | Packets/s per core | Latency from send p50 / p99 (ms) | Idle connections | Memory per idle connection (KiB) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for rnd in range(1, rounds + 1):
    for name, f in (("derper", f"derper-{rnd}.txt"), ("hydrascale, 1 replica", f"hydrascale-1-{rnd}.txt")):
        p = os.path.join(out, f)
        if not os.path.exists(p):
            continue
        r = parse(p)
        g = lambda k, fmt="{:,}": fmt.format(r[k]) if k in r else "n/a"
        print(f"| {name} | {rnd} | {g('pps')} | {g('cores', '{:.2f}')} | {g('per_core')} | {g('p50', '{:.2f}')} / {g('p99', '{:.2f}')} | {g('idle')} | {g('per_idle', '{:.1f}')} |")
PY
