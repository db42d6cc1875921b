#!/usr/bin/env bash
# Failover benchmark: kill -9 of the leader of a three-replica cluster, N times, and the
# time from each kill to the next acknowledged write.
#
#   scripts/bench-failover.sh [KILLS]        (default 20)
#
# Builds the release binary, makes the cluster's certificates, starts three replicas with
# `hydrascale serve` (Raft over mutual TLS, as scripts/try-cluster.sh does) and runs a
# steady, closed-loop write load (`hydrascale users create`, one after another, retried
# 20 ms after a refusal, like a client would) against a follower's admin API. Each round
# it writes for WARMUP seconds, kills the leader with SIGKILL, waits for the next
# acknowledged write, restarts the killed replica and waits until it is ready (in contact
# with a quorum, caught up) again.
#
# Printed per kill: the kill-to-next-ack time (the ack of the first write sent after the
# kill, so it is late by at most one refused write's round trip, 20-60 ms) and the Raft
# terms the failover used (1 is one election; more is a split vote or a lost race). At the
# end: p50/p99/max, and the elections not caused by a kill (a term change while the
# leader lived: a spurious election, e.g. from CPU starvation).
#
# Environment:
#   ELECTION_TIMEOUT, HEARTBEAT_INTERVAL   [cluster] timings of the replicas (default:
#                                          the built-in ones), e.g. 1500ms / 500ms for
#                                          the timings before they were configurable
#   PORT_BASE     first of the ports used (default 23000; PORT_BASE+1..+43, loopback only)
#   WARMUP        seconds of writes before each kill (default 3)
#   BIN           a hydrascale binary to use instead of building one
#   IDLE          seconds to measure each replica's CPU at rest first (default 10; 0: skip)
#   KEEP=1        leave the directory with configs, data and logs
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-20}
base=${PORT_BASE:-23000}
warmup=${WARMUP:-3}
ids=(1 2 3)
dir=$(mktemp -d "${TMPDIR:-/tmp}/hydrascale-bench-failover.XXXXXX")
pids=("" "" "" "")
writer=""

die() { echo "bench-failover: $*" >&2; exit 1; }

cleanup() {
  [ -z "$writer" ] || kill "$writer" 2>/dev/null || true
  local i
  for i in "${ids[@]}"; do
    [ -z "${pids[$i]}" ] || kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for i in "${ids[@]}"; do
    [ -z "${pids[$i]}" ] || wait "${pids[$i]}" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "files kept in $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

now_ms() { local t=$EPOCHREALTIME; echo $((${t/./} / 1000)); }

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  bin=$(cargo build --release --bin hydrascale --message-format=json-render-diagnostics |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
fi
[ -x "$bin" ] || die "no hydrascale binary (cargo build failed?)"

peers="1=127.0.0.1:$((base + 21)),2=127.0.0.1:$((base + 22)),3=127.0.0.1:$((base + 23))"
"$bin" cluster certs --out "$dir/certs" --ids 1,2,3 >/dev/null
for i in "${ids[@]}"; do
  {
    cat <<TOML
node_id = $i
server_url = "http://127.0.0.1:$((base + i))"
data_dir = "$dir/data-$i"
listen_addr = "127.0.0.1:$((base + i))"
admin_listen_addr = "127.0.0.1:$((base + 10 + i))"
raft_listen_addr = "127.0.0.1:$((base + 20 + i))"
metrics_listen_addr = "127.0.0.1:$((base + 30 + i))"

[derp]
hostname = "127.0.0.1"
port = $((base + i))
stun_listen_addr = "127.0.0.1:$((base + 40 + i))"

[cluster]
peers = "$peers"
tls_dir = "$dir/certs/replica-$i"
TOML
    [ -z "${ELECTION_TIMEOUT:-}" ] || echo "election_timeout = \"$ELECTION_TIMEOUT\""
    [ -z "${HEARTBEAT_INTERVAL:-}" ] || echo "heartbeat_interval = \"$HEARTBEAT_INTERVAL\""
  } >"$dir/replica-$i.toml"
done

start() {
  "$bin" serve --config "$dir/replica-$1.toml" >>"$dir/replica-$1.log" 2>&1 &
  pids[$1]=$!
}

# A metric of replica $1 (empty when it does not answer).
metric() {
  curl -s --max-time 1 "http://127.0.0.1:$((base + 30 + $1))/metrics" 2>/dev/null |
    sed -n "s/^$2 \\([0-9]*\\).*/\\1/p" | head -n 1
}

ready() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$((base + $1))/ready")" = 200 ]
}

# The leader all running replicas agree on, or nothing.
leader() {
  local i l seen=""
  for i in "${ids[@]}"; do
    [ -n "${pids[$i]}" ] || continue
    l=$(metric "$i" hydrascale_raft_leader_id)
    [ -n "$l" ] && [ "$l" != 0 ] || return 0
    [ -z "$seen" ] || [ "$seen" = "$l" ] || return 0
    seen=$l
  done
  echo "$seen"
}

# The highest Raft term among the running replicas.
term() {
  local i t max=0
  for i in "${ids[@]}"; do
    [ -n "${pids[$i]}" ] || continue
    t=$(metric "$i" hydrascale_raft_term)
    [ -z "$t" ] || [ "$t" -le "$max" ] || max=$t
  done
  echo "$max"
}

wait_until() { # SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what (logs in $dir; KEEP=1 keeps them)"
    sleep 0.05
  done
}

all_ready() { local i; for i in "${ids[@]}"; do ready "$i" || return 1; done; }
has_leader() { [ -n "$(leader)" ]; }

# Writes users w-ROUND-N through replica $2's admin API, one after another, appending
# "START_MS END_MS ok|refused" per write to $3.
write_loop() {
  local round=$1 via=$2 out=$3 n=0 t0 t1
  while :; do
    n=$((n + 1))
    t0=$(now_ms)
    if "$bin" --config "$dir/replica-$via.toml" users create "w-$round-$n" >/dev/null 2>&1; then
      t1=$(now_ms)
      echo "$t0 $t1 ok" >>"$out"
    else
      t1=$(now_ms)
      echo "$t0 $t1 refused" >>"$out"
      sleep 0.02
    fi
  done
}

echo "bench-failover: $bin, $kills kills, election_timeout=${ELECTION_TIMEOUT:-default} heartbeat_interval=${HEARTBEAT_INTERVAL:-default}; files in $dir"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
for i in "${ids[@]}"; do start "$i"; done
wait_until 180 "all replicas ready" all_ready
wait_until 60 "a leader" has_leader

# CPU time (user + system, clock ticks) of process $1 so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# What heartbeats cost: each replica's CPU at rest (no clients, no writes).
idle=${IDLE:-10}
if [ "$idle" -gt 0 ]; then
  sleep 2
  declare -A before
  for i in "${ids[@]}"; do before[$i]=$(cpu_ticks "${pids[$i]}"); done
  sleep "$idle"
  hz=$(getconf CLK_TCK)
  line="CPU at rest over ${idle} s (no clients):"
  for i in "${ids[@]}"; do
    line+=$(awk -v a="${before[$i]}" -v b="$(cpu_ticks "${pids[$i]}")" -v hz="$hz" -v s="$idle" -v i="$i" \
      'BEGIN { printf " replica %d %.2f%%", i, (b - a) * 100 / hz / s }')
  done
  echo "$line of a core (leader: $(leader))"
fi

results=()
extra_elections=0
failover_terms=()
settled=$(term)
for round in $(seq 1 "$kills"); do
  l=$(leader)
  [ -n "$l" ] || { wait_until 60 "a leader" has_leader; l=$(leader); }
  f=$((l % 3 + 1))
  log="$dir/writes-$round"
  : >"$log"
  write_loop "$round" "$f" "$log" &
  writer=$!
  sleep "$warmup"
  # Elections while the leader lived (since the previous failover settled, through the
  # restart of the killed replica and this round's writes).
  term_before=$(term)
  [ "$term_before" -le "$settled" ] || extra_elections=$((extra_elections + term_before - settled))
  kill -KILL "${pids[$l]}"
  killed=$(now_ms)
  wait "${pids[$l]}" 2>/dev/null || true
  pids[$l]=""
  # The first write sent after the kill that was acknowledged.
  ack=""
  deadline=$((SECONDS + 60))
  while [ -z "$ack" ]; do
    ack=$(awk -v k="$killed" '$1 >= k && $3 == "ok" { print $2; exit }' "$log")
    [ -n "$ack" ] || { [ $SECONDS -lt $deadline ] || die "no write acknowledged within 60 s of kill $round"; sleep 0.05; }
  done
  kill "$writer" 2>/dev/null || true
  wait "$writer" 2>/dev/null || true
  writer=""
  ms=$((ack - killed))
  refused=$(awk -v k="$killed" '$1 >= k && $3 == "refused"' "$log" | wc -l)
  wait_until 60 "a new leader" has_leader
  settled=$(term)
  terms=$((settled - term_before))
  results+=("$ms")
  failover_terms+=("$terms")
  printf 'kill %2d: leader %s killed, next ack after %5d ms via replica %s (%d writes refused; %d election(s))\n' \
    "$round" "$l" "$ms" "$f" "$refused" "$terms"
  start "$l"
  wait_until 120 "replica $l ready again" all_ready
  sleep 1
done

sorted=$(printf '%s\n' "${results[@]}" | sort -n)
n=${#results[@]}
pick() { # the value at rank ceil(P/100 * n)
  local r=$((($1 * n + 99) / 100))
  [ "$r" -ge 1 ] || r=1
  echo "$sorted" | sed -n "${r}p"
}
multi=$(printf '%s\n' "${failover_terms[@]}" | awk '$1 > 1' | wc -l)
echo
echo "kill-to-next-ack over $n kills: min $(echo "$sorted" | head -n 1) ms, p50 $(pick 50) ms, p99 $(pick 99) ms, max $(echo "$sorted" | tail -n 1) ms"
echo "failovers that took more than one election: $multi; elections not caused by a kill: $extra_elections"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
