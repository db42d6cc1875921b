#!/usr/bin/env bash
# Side by side, in one run on one machine: the same hydrascale-loadgen load against one
# headscale (sqlite, its own config in a temp dir), one Hydrascale replica and three
# Hydrascale replicas, for each tailnet size. The load: NODES simulated nodes (TS2021 Noise,
# HTTP/2, pre-auth key registration, streaming zstd maps) started open-loop at RATE per
# second; then one node joins and a policy change opens a port, each timed to every node.
# Prints a table (also in $OUT/table.md) and keeps every loadgen report in $OUT.
#
# Usage: scripts/bench-vs-headscale.sh [SIZES...]      (default: 1000 2000 5000 10000)
# Knobs: RATE (100 starts/s), SETTLE (20 s at rest), TIMEOUT (600 s), TARGETS
#        ("headscale hydrascale-1 hydrascale-3"), BASE_PORT (30100; uses BASE_PORT..+299),
#        OUT (/tmp/hydrascale-vs-headscale), BIN (target/release), HEADSCALE
#        (.tools/bin/headscale, from scripts/install-bench-peers.sh).
# Needs: cargo build --release --bin hydrascale --bin hydrascale-loadgen; python3; curl.
# Benchmarks only: CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1000 2000 5000 10000)
RATE="${RATE:-100}"
SETTLE="${SETTLE:-20}"
TIMEOUT="${TIMEOUT:-600}"
TARGETS="${TARGETS:-headscale hydrascale-1 hydrascale-3}"
BASE="${BASE_PORT:-30100}"
OUT="${OUT:-/tmp/hydrascale-vs-headscale}"
BIN="${BIN:-target/release}"
HEADSCALE="${HEADSCALE:-${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}/bin/headscale}"
for b in "$BIN/hydrascale" "$BIN/hydrascale-loadgen"; do
  [ -x "$b" ] || { echo "$b missing: cargo build --release --bin hydrascale --bin hydrascale-loadgen" >&2; exit 1; }
done
case " $TARGETS " in *" headscale "*)
  [ -x "$HEADSCALE" ] || { echo "$HEADSCALE missing: scripts/install-bench-peers.sh builds it" >&2; exit 1; } ;;
esac
mkdir -p "$OUT"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

pids=()
stop_servers() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop_servers EXIT

wait_http() { # URL: until it answers 2xx (60 s at most)
  for _ in $(seq 1 240); do
    curl -sf "$1" > /dev/null && return 0
    sleep 0.25
  done
  echo "$1 did not answer within 60 s" >&2
  return 1
}

# Peak resident memory (VmHWM, KiB) of each server process, summed.
peak_kib() {
  local sum=0 v
  for p in "${pids[@]}"; do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

# Sets LOADGEN_ARGS for one headscale in $1 (a fresh directory), started on BASE+1..+3.
start_headscale() {
  local d="$1" p=$BASE
  cat > "$d/derp.yaml" <<YAML
# The simulated nodes never use DERP; headscale wants a map to hand out. Nothing listens.
regions:
  900:
    regionid: 900
    regioncode: bench
    regionname: Benchmark
    nodes:
      - name: 900a
        regionid: 900
        hostname: 127.0.0.1
        ipv4: 127.0.0.1
        stunport: -1
        derpport: $((p + 9))
YAML
  cat > "$d/config.yaml" <<YAML
server_url: http://127.0.0.1:$((p + 1))
listen_addr: 127.0.0.1:$((p + 1))
metrics_listen_addr: 127.0.0.1:$((p + 2))
grpc_listen_addr: 127.0.0.1:$((p + 3))
grpc_allow_insecure: false
disable_check_updates: true
noise:
  private_key_path: $d/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
  urls: []
  paths: [$d/derp.yaml]
  auto_update_enabled: false
ephemeral_node_inactivity_timeout: 30m
database:
  type: sqlite
  sqlite:
    path: $d/db.sqlite
    write_ahead_log: true
log:
  level: warn
policy:
  mode: database
dns:
  magic_dns: false
  override_local_dns: false
  nameservers:
    global: []
unix_socket: $d/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
YAML
  "$HEADSCALE" -c "$d/config.yaml" serve > "$d/log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$((p + 1))/health"
  local hs=("$HEADSCALE" -c "$d/config.yaml")
  "${hs[@]}" users create bench > /dev/null
  local uid key apikey
  uid=$("${hs[@]}" users list -o json | python3 -c 'import json,sys; print([u["id"] for u in json.load(sys.stdin) if u["name"]=="bench"][0])')
  key=$("${hs[@]}" preauthkeys create -u "$uid" --reusable -e 24h -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  apikey=$("${hs[@]}" apikeys create -e 24h -o json | python3 -c 'import json,sys; print(json.load(sys.stdin))')
  LOADGEN_ARGS=(--url "http://127.0.0.1:$((p + 1))" --metrics "127.0.0.1:$((p + 2))" --auth-key "$key"
    --api-url "http://127.0.0.1:$((p + 1))" --api-key "$apikey")
}

# Sets LOADGEN_ARGS for N Hydrascale replicas in $2 (a fresh directory), as
# scripts/bench-control-plane.sh starts them, on BASE+100.. (one) or BASE+200.. (three).
start_hydrascale() {
  local n="$1" d="$2" base peers="" i p
  base=$((BASE + (n == 1 ? 100 : 200)))
  for i in $(seq 1 "$n"); do
    peers+="${peers:+,}$i=127.0.0.1:$((base + i * 10 + 3))"
  done
  # Raft between replicas runs over mutual TLS, as a real cluster's does (try-cluster.sh).
  "$BIN/hydrascale" cluster certs --out "$d/certs" --ids "$(seq -s, 1 "$n")" > /dev/null
  for i in $(seq 1 "$n"); do
    p=$((base + i * 10))
    mkdir -p "$d/r$i"
    cat > "$d/r$i/hydrascale.toml" <<TOML
server_url = "http://127.0.0.1:$((p + 1))"
listen_addr = "127.0.0.1:$((p + 1))"
admin_listen_addr = "127.0.0.1:$((p + 2))"
raft_listen_addr = "127.0.0.1:$((p + 3))"
metrics_listen_addr = "127.0.0.1:$((p + 4))"
data_dir = "$d/r$i/data"
node_id = $i

[derp]
stun_listen_addr = "127.0.0.1:$((p + 5))"

[cluster]
peers = "$peers"
tls_dir = "$d/certs/replica-$i"

[limits]
# Every simulated node connects from 127.0.0.1: one client address for all of them.
max_connections_per_address = 0
TOML
    HYDRASCALE_LOG="${HYDRASCALE_LOG:-warn}" "$BIN/hydrascale" serve --config "$d/r$i/hydrascale.toml" > "$d/r$i/log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 1 "$n"); do
    wait_http "http://127.0.0.1:$((base + i * 10 + 1))/ready"
  done
  local admin="unix:$d/r1/data/admin.sock" key apikey
  "$BIN/hydrascale" --admin-addr "$admin" users create bench > /dev/null
  key=$("$BIN/hydrascale" --admin-addr "$admin" -o json preauthkeys create --user bench --reusable --expiration 24h | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  apikey=$("$BIN/hydrascale" --admin-addr "$admin" -o json apikeys create | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  LOADGEN_ARGS=(--auth-key "$key" --api-url "http://127.0.0.1:$((base + 11))" --api-key "$apikey")
  for i in $(seq 1 "$n"); do
    p=$((base + i * 10))
    LOADGEN_ARGS+=(--url "http://127.0.0.1:$((p + 1))" --metrics "127.0.0.1:$((p + 4))")
  done
}

versions="$("$BIN/hydrascale" --version 2>/dev/null | head -1 || true); headscale $("$HEADSCALE" version 2>/dev/null | head -1 || echo '?')"
echo "bench-vs-headscale: sizes ${SIZES[*]}, $RATE starts/s, targets: $TARGETS; $versions" >&2
for nodes in "${SIZES[@]}"; do
  for target in $TARGETS; do
    d="$OUT/run-$target-$nodes"
    rm -rf "$d"
    mkdir -p "$d"
    case "$target" in
      headscale) start_headscale "$d" ;;
      hydrascale-1) start_hydrascale 1 "$d" ;;
      hydrascale-3) start_hydrascale 3 "$d" ;;
      *) echo "unknown target $target" >&2; exit 1 ;;
    esac
    echo "== $target, $nodes nodes" >&2
    "$BIN/hydrascale-loadgen" "${LOADGEN_ARGS[@]}" --nodes "$nodes" --rate "$RATE" \
      --settle "$SETTLE" --timeout "$TIMEOUT" --tagged-every 0 > "$d/report.json" 2> "$d/loadgen.log" ||
      echo "loadgen failed against $target at $nodes nodes: see $d/loadgen.log" >&2
    echo "$(peak_kib)" > "$d/peak_kib"
    stop_servers
  done
done

python3 - "$OUT" "$SETTLE" "${SIZES[@]}" <<'PY' | tee "$OUT/table.md"
import json, os, sys
out, settle, sizes = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
targets = ["headscale", "hydrascale-1", "hydrascale-3"]
print("| Nodes | Server | Online | Join p99 (register) | First map p99 | Join propagation p99 | Policy propagation p99 | CPU at rest (% of a core, all processes) | CPU in the storm per node (ms) | RSS growth at rest per node (KiB) | Peak RSS (MiB, all processes) |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
def fmt(v, unit=""):
    return "n/a" if v is None else f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"
for n in sizes:
    for t in targets:
        d = os.path.join(out, f"run-{t}-{n}")
        try:
            r = json.load(open(os.path.join(d, "report.json")))
        except (OSError, ValueError):
            if os.path.isdir(d):
                print(f"| {n} | {t} | no report (see {d}/loadgen.log) | | | | | | | | |")
            continue
        sum_ = lambda rows, k: sum(x.get(k) or 0 for x in rows) if rows and all(x.get(k) is not None for x in rows) else None
        before, rest = r.get("replicas_before", []), r.get("replicas_at_rest", [])
        rest_cpu = sum(c for c in r.get("cpu_percent_at_rest", []) if c is not None) or None
        cpu_b, cpu_r = sum_(before, "cpu_seconds"), sum_(rest, "cpu_seconds")
        storm = None
        if cpu_b is not None and cpu_r is not None and r["online"]:
            # CPU from the first start to the end of the settle period, less the settle period.
            storm = (cpu_r - cpu_b - (rest_cpu or 0) / 100 * settle) * 1000 / r["online"]
        rss, rss_b = sum_(rest, "rss_mib"), sum_(before, "rss_mib")
        # Growth from the empty server to the tailnet at rest, per node online.
        per_node = (rss - rss_b) * 1024 / r["online"] if rss is not None and rss_b is not None and r["online"] else None
        try:
            peak = int(open(os.path.join(d, "peak_kib")).read()) / 1024
        except (OSError, ValueError):
            peak = None
        p99 = lambda k: r.get(k, {}).get("p99_ms")
        prop = lambda k: r.get(k, {}).get("propagation_ms", {}).get("p99_ms")
        saw = lambda k: f"{r.get(k, {}).get('saw', 0)}"
        print(f"| {n} | {t} | {r['online']}/{r['nodes']} | {fmt(p99('register_ms'), ' ms')} | {fmt(p99('first_map_ms'), ' ms')} | "
              f"{fmt(prop('join'), ' ms')} ({saw('join')} saw) | {fmt(prop('policy'), ' ms')} ({saw('policy')} saw) | "
              f"{fmt(rest_cpu)} | {fmt(storm)} | {fmt(per_node)} | {fmt(peak)} |")
PY
