#!/usr/bin/env bash
# The demo station on any Debian / Raspberry Pi OS machine: simulated instruments speaking the real
# protocols -> edge-agent -> a local mosquitto, with a live view of what arrives. Ctrl-C stops it all.
#   bash deploy/demo.sh [CONFIG]        (default: config/examples/demo-station.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/examples/demo-station.yaml}

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -x .venv/bin/edge-agent ]; then
  echo "== creating .venv and installing edge-agent"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
fi
export PATH="$PWD/.venv/bin:$PATH"

# One demo per directory: a second one would share its buffer, its config copy and its log. Another
# demo elsewhere (another checkout) or one left over (its processes killed, its files still there) is
# no obstacle: the lock is released when its holder ends, and the ports and serial links below are
# this demo's own. The lock's descriptor is not handed to the demo's processes.
mkdir -p demo-data
exec 9>demo-data/.demo.lock
if ! flock -n 9; then
  echo "== another demo is running from $PWD (pid $(cat demo-data/.demo.pid 2>/dev/null || echo '?')): stop it" \
       "first (Ctrl-C in its terminal), or run this one from another copy of the repository" >&2
  exit 1
fi
echo $$ > demo-data/.demo.pid

# The demo's own broker, on a free loopback port: a broker already on 1883 (someone else's, maybe
# with a password, or another demo with the same client id) is left alone. The config is run from a
# copy beside it that points at that port (same directory: its relative paths stay the same), at a
# free loopback port for its Modbus TCP instruments instead of 15020, and at a directory of its own
# for its simulated serial ports instead of /tmp/edge-agent-demo (another demo, or links left by one).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
tcp_port=$(free_port)
links=$(mktemp -d /tmp/edge-agent-demo.XXXXXX)
run_config="$(dirname "$config")/.demo-$(basename "$config")"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > demo-data/mosquitto.conf
sed -e "s#mqtt://127.0.0.1:1883#mqtt://127.0.0.1:$port#" -e "s#/tmp/edge-agent-demo/#$links/#g" \
    -e "s#\(host: 127.0.0.1, port:\) 15020\b#\1 $tcp_port#g" "$config" > "$run_config"
echo "== the demo's simulated serial ports: $links; its Modbus TCP instruments: 127.0.0.1:$tcp_port"

pids=()
agent_pid=""
cleanup() {
  # The agent first, and the broker only once it is gone: it says "offline, stopped" and disconnects,
  # where a broker going down under it would publish its Last Will ("connection lost") instead.
  if [ -n "$agent_pid" ]; then
    kill "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$run_config" demo-data/.demo.pid
  rm -rf "$links"
}
trap cleanup EXIT INT TERM

echo "== starting the demo's mosquitto on 127.0.0.1:$port"
# In a session of its own: Ctrl-C reaches the agent and the others at once, and the broker is stopped
# by `cleanup` after the agent.
setsid "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c demo-data/mosquitto.conf >demo-data/mosquitto.log 2>&1 9>&- &
pids+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
config=$run_config

if grep -q "profile:\|driver: *\(pms5003\|sds011\|hj212\)" "$config"; then
  echo "== starting the simulated instruments (edge-agent simulate)"
  edge-agent simulate -c "$config" 9>&- &
  sim_pid=$!
  pids+=("$sim_pid")
  # Ready once its serial ports exist (served after its Modbus ones); if it ended, it said why above
  # (a port taken, say by another demo), and the agent would only poll instruments that are not there.
  for _ in $(seq 50); do
    if ! kill -0 "$sim_pid" 2>/dev/null; then
      echo "== the simulated instruments could not start (see above): stopping" >&2
      exit 1
    fi
    edge-agent check-config "$config" 2>&1 | grep -q "does not exist on this machine" || break
    sleep 0.2
  done
fi
edge-agent check-config "$config"  # once the simulated serial ports exist
echo "== starting the agent (log: demo-agent.log); live view below, Ctrl-C to stop"
edge-agent run -c "$config" 2>demo-agent.log 9>&- &
agent_pid=$!
# The live view in the background, waited for: a signal to this script alone (kill PID) runs `cleanup`
# at once, where bash waiting for a foreground command would run it only once that command ended.
edge-agent tail -c "$config" 9>&- &
pids+=($!)
wait "$!"
