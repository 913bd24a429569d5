#!/usr/bin/env bash
# The hardened unit under a real systemd: a fresh Debian 12 in a systemd-nspawn container, the
# gateway install of the README (deploy/install.sh) inside it, then the service is started, reloaded,
# killed, hung and stopped, and each outcome is checked. Not part of the test suite (it downloads a
# Debian base system, ~150 MB, and needs root); run it after changing the unit or install.sh.
#
#   sudo deploy/systemd-check.sh [DIR]      (DIR: the container's root, default /var/tmp/edge-agent-deb12;
#                                            made by debootstrap once, reused afterwards)
#
# The container shares the host's network; the agent publishes to a mosquitto this script starts on
# a free loopback port of the host. nspawn's own syscall filter refuses the clock syscalls, so the
# container gets @clock (the unit's filter is then the one that decides, as on a gateway).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/var/tmp/edge-agent-deb12}
[ "$(id -u)" -eq 0 ] || { echo "systemd-check.sh: run as root (debootstrap, systemd-nspawn)" >&2; exit 1; }

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -x "$dir/lib/systemd/systemd" ]; then
  echo "== debootstrap bookworm into $dir"
  debootstrap --include=systemd,systemd-sysv,dbus,sudo bookworm "$dir" http://deb.debian.org/debian >/dev/null
  echo "deb12" > "$dir/etc/hostname"
  echo "127.0.1.1 deb12" >> "$dir/etc/hosts"
fi
# The project as committed and as changed in this checkout, and the host's CA bundle for pip (a
# proxy's CA, where the host has one).
rm -rf "$dir/root/edge-agent"
mkdir -p "$dir/root/edge-agent"
tar -C . --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ --exclude=demo-data \
  -cf - . | tar -C "$dir/root/edge-agent" -xf -
cp /etc/ssl/certs/ca-certificates.crt "$dir/usr/local/share/host-ca.crt"
printf '[global]\ncert = /usr/local/share/host-ca.crt\n' > "$dir/etc/pip.conf"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
conf=$(mktemp)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$conf"
"$mosquitto_bin" -c "$conf" >/dev/null 2>&1 &
broker=$!
setsid systemd-nspawn -D "$dir" -b --register=no --keep-unit --console=passive --machine=edge-agent-check \
  --system-call-filter=@clock >/tmp/edge-agent-nspawn.log 2>&1 &
nspawn=$!
cleanup() {
  [ -n "${leader:-}" ] && nsenter -t "$leader" -a systemctl poweroff >/dev/null 2>&1 || true
  wait "$nspawn" 2>/dev/null || true
  kill "$broker" 2>/dev/null || true
  rm -f "$conf"
}
trap cleanup EXIT

leader=""
for _ in $(seq 100); do
  leader=$(pgrep -P "$nspawn" | head -1 || true)
  if [ -n "$leader" ] && nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; then
    break
  fi
  sleep 0.3
done
# A clean environment: the host's variables (PIP_CERT, PATH of a pyenv...) name files of the host.
clean_env=(env -i HOME=/root TERM=dumb LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
inside() { nsenter -t "$leader" -a "${clean_env[@]}" bash -lc "$1"; }
failures=0
check() {  # check NAME COMMAND: COMMAND's success is the outcome
  if inside "$2" >/dev/null 2>&1; then echo "PASS  $1"; else echo "FAIL  $1"; failures=$((failures + 1)); fi
}
wait_inside() {  # wait_inside NAME COMMAND [SECONDS]
  local deadline=$((SECONDS + ${3:-30}))
  until inside "$2" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "FAIL  $1 (no result within ${3:-30} s)"; failures=$((failures + 1)); return; fi
    sleep 0.5
  done
  echo "PASS  $1"
}
prop() { echo "systemctl show -p $1 --value edge-agent"; }

echo "== systemd $(inside 'systemctl --version | head -1 | cut -d" " -f2'): gateway install"
t0=$(inside "date +%s")
journal="journalctl -u edge-agent --since @$t0"
inside "systemctl stop edge-agent 2>/dev/null; rm -rf /var/lib/edge-agent /etc/edge-agent; cd /root/edge-agent && deploy/install.sh" | tail -3
inside "sed -i 's#mqtt://127.0.0.1:1883#mqtt://127.0.0.1:$port#' /etc/edge-agent/edge-agent.yaml"
inside "systemctl start edge-agent"
wait_inside "starts as a notify service and reports its state" \
  "systemctl is-active edge-agent && $(prop StatusText) | grep -q 'broker online'"
wait_inside "status works as the service's user" \
  "sudo -u edge-agent edge-agent status -c /etc/edge-agent/edge-agent.yaml --json | grep -q '\"backlog\"'"
wait_inside "the sandboxed agent reads the clock's sync state (adjtimex allowed)" \
  "sudo -u edge-agent edge-agent status -c /etc/edge-agent/edge-agent.yaml --json | python3 -c 'import json,sys; assert json.load(sys.stdin)[\"clock\"][\"synchronized\"] is not None'"
check "no capabilities, no new privileges, a syscall filter" \
  "grep -q 'CapEff:.0000000000000000' /proc/\$($(prop MainPID))/status && grep -q 'NoNewPrivs:.1' /proc/\$($(prop MainPID))/status && grep -q 'Seccomp:.2' /proc/\$($(prop MainPID))/status"
check "exposure level below 2.0" \
  "systemd-analyze security edge-agent --no-pager | tail -1 | awk '{exit !(\$(NF-2) < 2.0)}'"
wait_inside "watchdog pings arrive" "[ -n \"\$($(prop WatchdogTimestampMonotonic) | grep -v '^0$')\" ]"
inside "systemctl reload edge-agent"
wait_inside "reload (SIGHUP) re-reads the config" "$journal | grep -q 'configuration reloaded'"
seq_before=$(inside "sudo -u edge-agent edge-agent status -c /etc/edge-agent/edge-agent.yaml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"last_seq\"])'")
inside "systemctl kill -s KILL edge-agent"
wait_inside "kill -9: restarted by Restart=always, seq continues" \
  "[ \$($(prop NRestarts)) -ge 1 ] && systemctl is-active edge-agent && [ \$(sudo -u edge-agent edge-agent status -c /etc/edge-agent/edge-agent.yaml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"last_seq\"])') -gt $seq_before ]" 30
inside "kill -STOP \$($(prop MainPID))"
wait_inside "a hung agent is killed by the watchdog and restarted" \
  "$journal | grep -q 'Watchdog timeout' && [ \$($(prop NRestarts)) -ge 2 ] && systemctl is-active edge-agent" 60
wait_inside "running again after the watchdog restart" "$(prop StatusText) | grep -q 'broker online'"
inside "systemctl stop edge-agent"
check "stop: a clean exit within the stop timeout" \
  "[ \$($(prop Result)) = success ] && [ \$($(prop ExecMainStatus)) = 0 ] && $journal | grep -q 'stopped cleanly'"
inside "systemctl start edge-agent"
wait_inside "starts again from its buffer" "$(prop StatusText) | grep -q 'broker online'"
inside "sed -i '/^  commit_interval_ms:/a\\  sync: normal' /etc/edge-agent/edge-agent.yaml && systemctl restart edge-agent"
wait_inside "with sync: normal it notes the boot it runs in (/proc/sys/kernel/random/boot_id not hidden)" \
  "python3 -c 'import json; assert json.load(open(\"/var/lib/edge-agent/buffer.db.seq\"))[\"volatile_boot\"] > 0'"
if [ $failures -eq 0 ]; then echo "== all checks passed"; else echo "== $failures checks failed"; fi
exit $((failures > 0))
