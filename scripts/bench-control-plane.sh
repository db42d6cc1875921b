#!/usr/bin/env bash
# Control-plane benchmark: a three-replica cluster on loopback (release build) and
# hydrascale-loadgen spreading NODES simulated nodes over it at RATE starts per second;
# then one node joins and two policy changes are made (a port opened; then, with tagged
# servers, members reach only members), each timed to every node.
# Prints the load generator's JSON report (also kept in $OUT/report-NODES.json).
#
# Usage: scripts/bench-control-plane.sh NODES [RATE] [SETTLE_SECONDS]
# Needs: cargo build --release --workspace (binaries in ${BIN:-target/release}).
set -euo pipefail
cd "$(dirname "$0")/.."
NODES="${1:?usage: $0 NODES [RATE] [SETTLE]}"
RATE="${2:-100}"
SETTLE="${3:-30}"
BIN="${BIN:-target/release}"
OUT="${OUT:-/tmp/hydrascale-bench}"
BASE="${BASE_PORT:-27000}"
rm -rf "$OUT/cluster"
mkdir -p "$OUT/cluster"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

peers=""
for i in 1 2 3; do
  peers+="${peers:+,}$i=127.0.0.1:$((BASE + i * 10 + 3))"
done
# Raft between replicas runs over mutual TLS, as a real cluster's does (try-cluster.sh).
"$BIN/hydrascale" cluster certs --out "$OUT/cluster/certs" --ids 1,2,3 > /dev/null
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for i in 1 2 3; do
  p=$((BASE + i * 10))
  d="$OUT/cluster/r$i"
  mkdir -p "$d"
  cat > "$d/hydrascale.toml" <<TOML
server_url = "http://127.0.0.1:$((p + 1))"
listen_addr = "127.0.0.1:$((p + 1))"
admin_listen_addr = "127.0.0.1:$((p + 2))"
raft_listen_addr = "127.0.0.1:$((p + 3))"
metrics_listen_addr = "127.0.0.1:$((p + 4))"
data_dir = "$d/data"
node_id = $i

[derp]
stun_listen_addr = "127.0.0.1:$((p + 5))"

[cluster]
peers = "$peers"
tls_dir = "$OUT/cluster/certs/replica-$i"

[limits]
# Every simulated node connects from 127.0.0.1: one client address for all of them.
max_connections_per_address = 0
TOML
  HYDRASCALE_LOG="${HYDRASCALE_LOG:-warn}" "$BIN/hydrascale" serve --config "$d/hydrascale.toml" > "$d/log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  p=$((BASE + i * 10))
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$((p + 1))/ready" > /dev/null && break
    sleep 0.5
  done
done
admin="unix:$OUT/cluster/r1/data/admin.sock"
"$BIN/hydrascale" --admin-addr "$admin" users create bench > /dev/null
key=$("$BIN/hydrascale" --admin-addr "$admin" -o json preauthkeys create --user bench --reusable --expiration 24h | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# One node in TAGGED_EVERY (default 10; 0: none) is a tagged server, which also makes the
# loadgen measure a second policy change, one that connects other pairs of nodes.
TAGGED_EVERY="${TAGGED_EVERY:-10}"
tagged=()
if [ "$TAGGED_EVERY" -gt 0 ]; then
  tkey=$("$BIN/hydrascale" --admin-addr "$admin" -o json preauthkeys create --user bench --reusable --expiration 24h --tags tag:server | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  tagged=(--tagged-auth-key "$tkey" --tagged-every "$TAGGED_EVERY")
fi
apikey=$("$BIN/hydrascale" --admin-addr "$admin" -o json apikeys create | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
args=()
for i in 1 2 3; do
  p=$((BASE + i * 10))
  args+=(--url "http://127.0.0.1:$((p + 1))" --metrics "127.0.0.1:$((p + 4))")
done
"$BIN/hydrascale-loadgen" "${args[@]}" --auth-key "$key" "${tagged[@]}" --nodes "$NODES" --rate "$RATE" \
  --settle "$SETTLE" --timeout 1800 \
  --api-url "http://127.0.0.1:$((BASE + 11))" --api-key "$apikey" | tee "$OUT/report-$NODES.json"
