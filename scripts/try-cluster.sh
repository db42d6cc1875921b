#!/usr/bin/env bash
# A three-replica Hydrascale cluster behind HAProxy on this machine, for a try-out:
#
#   scripts/try-cluster.sh up       build (debug, like the quick start), make the cluster's
#                                   certificates, start three replicas and HAProxy, wait
#                                   until they are ready, print `cluster status` and what
#                                   to do next
#   scripts/try-cluster.sh status   each process, then `cluster status`
#   scripts/try-cluster.sh down     stop everything and remove every file it made
#
# Every file it makes (configs, data, certificates, logs, PIDs) is in
# ${TMPDIR:-/tmp}/hydrascale-try-cluster, none in the working tree. Clients log in at
# http://127.0.0.1:8080 (HAProxy). The replicas listen on 127.0.0.1 only: control (and
# DERP) 8081-8083, admin 50511-50513, Raft 50521-50523 (mutual TLS), metrics 50531-50533,
# STUN 3471-3473.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir="${TMPDIR:-/tmp}/hydrascale-try-cluster"
lb=127.0.0.1:8080
ids=(1 2 3)
peers="1=127.0.0.1:50521,2=127.0.0.1:50522,3=127.0.0.1:50523"

die() { echo "try-cluster: $*" >&2; exit 1; }

# Whether something accepts connections on HOST:PORT.
listening() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

# The HTTP status code of GET PATH on HOST:PORT, or nothing.
http_status() {
  (
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 0
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
    read -r -t 5 line <&3 || exit 0
    line=${line#HTTP/* }
    echo "${line%% *}"
  ) 2>/dev/null
}

# Whether process PID runs with MARK in its command line (a process that has exited but
# is not yet reaped has none).
runs() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$2"; }

# The PID in FILE if that process is still the one this script started (its command line
# names MARK), else nothing: a PID file outlives its process, and PIDs are reused.
live_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  [ -n "$pid" ] && runs "$pid" "$2" && echo "$pid"
  return 0
}

replica_pid() { live_pid "$dir/replica-$1.pid" "$dir/replica-$1.toml"; }
haproxy_pid() { live_pid "$dir/haproxy.pid" "$root/deploy/haproxy/haproxy.cfg"; }

# `cluster status` from the first replica still running.
cluster_status() {
  local bin i
  bin=$(cat "$dir/bin") || return 1
  for i in "${ids[@]}"; do
    if [ -n "$(replica_pid "$i")" ]; then
      "$bin" --config "$dir/replica-$i.toml" cluster status
      return
    fi
  done
  echo "no replica is running"
}

up() {
  if [ -d "$dir" ]; then
    for i in "${ids[@]}"; do
      [ -z "$(replica_pid "$i")" ] || die "already up: see \`$0 status\`, or stop it with \`$0 down\`"
    done
    die "$dir is left from an earlier run whose replicas are gone: remove it with \`$0 down\` first"
  fi
  # What building needs (as scripts/serve.sh), and the load balancer.
  local need=()
  command -v protoc >/dev/null || need+=(protobuf-compiler)
  command -v clang >/dev/null || need+=(clang)
  dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
  command -v haproxy >/dev/null || need+=(haproxy)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    echo "try-cluster: installing ${need[*]} with apt-get" >&2
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  fi
  for addr in "$lb" 127.0.0.1:808{1,2,3} 127.0.0.1:505{1,2,3}{1,2,3}; do
    ! listening "$addr" || die "$addr is in use (is the quick start's server still running? stop it with Ctrl-C)"
  done

  # The same build as the quick start's `cargo run`.
  local bin
  bin=$(cargo build --bin hydrascale --message-format=json-render-diagnostics |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  [ -x "$bin" ] || die "cargo build did not produce the hydrascale binary"

  mkdir -p -m 700 "$dir"
  echo "$bin" >"$dir/bin"
  "$bin" cluster certs --out "$dir/certs" --ids 1,2,3 >/dev/null
  for i in "${ids[@]}"; do
    cat >"$dir/replica-$i.toml" <<TOML
# Replica $i of scripts/try-cluster.sh.
node_id = $i
server_url = "http://$lb"
data_dir = "$dir/data-$i"
listen_addr = "127.0.0.1:808$i"
admin_listen_addr = "127.0.0.1:5051$i"
raft_listen_addr = "127.0.0.1:5052$i"
metrics_listen_addr = "127.0.0.1:5053$i"
# HAProxy (deploy/haproxy/haproxy.cfg) connects from here and sends the PROXY protocol
# with each client's own address.
trusted_proxies = ["127.0.0.1/32"]

[derp]
hostname = "127.0.0.1"
port = 808$i
stun_listen_addr = "127.0.0.1:347$i"

[cluster]
peers = "$peers"
tls_dir = "$dir/certs/replica-$i"
TOML
    nohup "$bin" serve --config "$dir/replica-$i.toml" >"$dir/replica-$i.log" 2>&1 &
    echo $! >"$dir/replica-$i.pid"
  done
  HYDRASCALE_LB_BIND=$lb HYDRASCALE_R1=127.0.0.1:8081 HYDRASCALE_R2=127.0.0.1:8082 \
    HYDRASCALE_R3=127.0.0.1:8083 nohup haproxy -db -f "$root/deploy/haproxy/haproxy.cfg" \
    >"$dir/haproxy.log" 2>&1 &
  echo $! >"$dir/haproxy.pid"

  # Ready: /ready answers 200 once a replica is in contact with the majority; then through
  # the load balancer too (its health checks need two answers in a row).
  local deadline=$((SECONDS + 180))
  for i in "${ids[@]}"; do
    until [ "$(http_status "127.0.0.1:808$i" /ready)" = 200 ]; do
      if [ -z "$(replica_pid "$i")" ]; then
        tail -n 20 "$dir/replica-$i.log" >&2
        die "replica $i exited (log above, all of it in $dir/replica-$i.log); \`$0 down\` stops the rest"
      fi
      [ $SECONDS -lt $deadline ] || die "replica $i is not ready after 3 minutes; see $dir/replica-$i.log, \`$0 down\` stops everything"
      sleep 0.5
    done
  done
  until [ "$(http_status "$lb" /ready)" = 200 ]; do
    [ -n "$(haproxy_pid)" ] || { tail -n 20 "$dir/haproxy.log" >&2; die "haproxy exited (log above)"; }
    [ $SECONDS -lt $deadline ] || die "HAProxy on $lb does not answer; see $dir/haproxy.log"
    sleep 0.5
  done

  cluster_status
  cat <<EOF

The cluster is up: clients log in at http://$lb (HAProxy in front of replicas 1-3).
Its files (configs, data, certificates, logs, PIDs) are in $dir.
Next, in another shell in $root:
  export HYDRASCALE_CONFIG=$dir/replica-1.toml   # admin commands go to replica 1's local socket
  cargo run -q -- users create alice
  KEY=\$(cargo run -q -- preauthkeys create --user alice --reusable --expiration 24h)
and start clients with --login-server=http://$lb as README.md shows ("Two clients on this
machine"; TS_DEBUG_USE_DERP_HTTP=1: no TLS here). Then \`$0 status\` shows which replica
leads and its PID: kill -9 it and watch the others elect a new leader while the clients
keep working. \`$0 down\` stops everything and removes $dir.
EOF
}

status() {
  [ -d "$dir" ] || { echo "not running ($dir does not exist); start it with \`$0 up\`"; return; }
  local i pid
  for i in "${ids[@]}"; do
    pid=$(replica_pid "$i")
    if [ -n "$pid" ]; then
      echo "replica $i: running, PID $pid, control 127.0.0.1:808$i, log $dir/replica-$i.log"
    else
      echo "replica $i: not running (log $dir/replica-$i.log)"
    fi
  done
  pid=$(haproxy_pid)
  if [ -n "$pid" ]; then
    echo "haproxy: running, PID $pid, login URL http://$lb, log $dir/haproxy.log"
  else
    echo "haproxy: not running (log $dir/haproxy.log)"
  fi
  echo
  cluster_status
}

down() {
  [ -d "$dir" ] || { echo "nothing to stop ($dir does not exist)"; return; }
  local pids=() marks=() pid i
  for i in "${ids[@]}"; do
    pid=$(replica_pid "$i")
    [ -z "$pid" ] || { pids+=("$pid"); marks+=("$dir/replica-$i.toml"); }
  done
  pid=$(haproxy_pid)
  [ -z "$pid" ] || { pids+=("$pid"); marks+=("$root/deploy/haproxy/haproxy.cfg"); }
  if [ ${#pids[@]} -gt 0 ]; then
    # SIGTERM: replicas shut down in order (every acknowledged write is on disk).
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    for i in "${!pids[@]}"; do
      while runs "${pids[$i]}" "${marks[$i]}"; do
        if [ $SECONDS -ge $deadline ]; then kill -KILL "${pids[$i]}" 2>/dev/null || true; fi
        sleep 0.2
      done
    done
  fi
  rm -rf "$dir"
  echo "stopped ${#pids[@]} processes and removed $dir"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) echo "usage: $0 up|status|down   (files in $dir)" >&2; exit 2 ;;
esac
