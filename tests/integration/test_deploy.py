"""Field deployment: the systemd unit (systemd-analyze verify and security) and deploy/install.sh run
into a temporary root (files, permissions, idempotence, upgrade, uninstall; once with a real venv).

`systemd-analyze verify` insists that ExecStart= names an existing executable, and the unit's
/opt/edge-agent/venv/bin/edge-agent exists only on an installed gateway: the tests verify a copy of
the unit whose ExecStart points at an executable under the test's temporary folder (a stub, or the
real venv install.sh made), the rest of the file byte for byte the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from harness import REPO, run_cli

UNIT = REPO / "deploy" / "systemd" / "edge-agent.service"
INSTALL = REPO / "deploy" / "install.sh"
ENTRY = "/opt/edge-agent/venv/bin/edge-agent"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze not installed (CI installs systemd)")


# ---------------------------------------------------------------------------------------- the unit

def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Key -> values (in order) of a unit file, all sections merged; comments and blanks skipped."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verifiable_copy(unit: Path, tmp: Path, entry: Path | None = None) -> Path:
    """A copy of `unit` whose ExecStart binary exists (see the module docstring)."""
    if entry is None:
        entry = tmp / "stub" / "edge-agent"
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text("#!/bin/sh\nexit 0\n")
        entry.chmod(0o755)
    text = unit.read_text()
    assert text.count(f"ExecStart={ENTRY} ") == 1
    copy = tmp / "verify" / "edge-agent.service"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(text.replace(f"ExecStart={ENTRY} ", f"ExecStart={entry} "))
    return copy


def analyze_verify(unit: Path) -> list[str]:
    """Problems `systemd-analyze verify` reports about this unit (it also loads the units it depends on;
    their complaints, if any on this host, are not ours)."""
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    ours = [line for line in lines if "edge-agent" in line]
    if proc.returncode != 0 and not ours:
        ours = lines or [f"exit status {proc.returncode}"]
    return ours


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    assert analyze_verify(verifiable_copy(UNIT, tmp_path)) == []


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path):
    # The check above is not vacuous: a misspelt key and a missing binary are reported.
    broken = tmp_path / "broken"
    broken.mkdir()
    unit = verifiable_copy(UNIT, tmp_path)
    (broken / "edge-agent.service").write_text(unit.read_text().replace("UMask=", "UMaks="))
    assert any("UMaks" in p for p in analyze_verify(broken / "edge-agent.service"))
    assert any("not executable" in p for p in analyze_verify(UNIT))


@needs_systemd_analyze
def test_unit_exposure_level_is_at_most_2():
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(UNIT)], capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert match, f"no exposure level in:\n{out}"
    score = float(match.group(1))
    print(f"systemd-analyze security --offline=true: exposure {score}")
    assert score <= 2.0, out


@needs_systemd_analyze
def test_unit_lets_the_agent_read_the_clock_sync_state_but_not_set_the_clock():
    """The agent asks the kernel (adjtimex, read-only) whether NTP has synchronised the clock: the
    syscall filter must let that call through (~@privileged holds @clock), and setting the clock
    stays impossible (no CAP_SYS_TIME)."""
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(UNIT)], capture_output=True,
                          text=True, timeout=60)
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line[:1] in ("✓", "✗")}
    assert "adjtimex is allowed" in lines["SystemCallFilter=~@clock"], lines["SystemCallFilter=~@clock"]
    assert lines["CapabilityBoundingSet=~CAP_SYS_TIME"].startswith("✓")

def test_unit_runs_the_agent_under_systemd_supervision():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) >= 10
    assert s["Restart"] == ["always"] and int(s["RestartSec"][0]) >= 1
    assert s["RestartPreventExitStatus"] == ["3"], "a downgrade's refusal (exit 3) must not loop"
    # a tight failure loop (a broken config exits at once) gives up; a crash after a while does not
    burst, interval = int(s["StartLimitBurst"][0]), int(s["StartLimitIntervalSec"][0])
    assert interval / burst < int(s["RestartSec"][0]) + 10, "a crash loop of long runs would hit the start limit"
    assert s["ExecStart"] == [f"{ENTRY} run -c /etc/edge-agent/edge-agent.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["User"] == ["edge-agent"] and s["Group"] == ["edge-agent"]
    assert s["StateDirectory"] == ["edge-agent"] and s["ConfigurationDirectory"] == ["edge-agent"]
    assert s["WantedBy"] == ["multi-user.target"]
    # SIGTERM: publish the backlog for shutdown_grace (default 5 s) and stop pollers: well inside the timeout
    assert int(s["TimeoutStopSec"][0]) >= 5 + 15


def test_unit_leaves_the_proc_files_the_agent_reads_visible():
    """The agent reads the kernel's boot id (with `storage.sync: normal`, whether a start follows a reboot:
    agent.seqmark.BOOT_ID) and /proc/uptime (the console). `ProcSubset=pid` hides every /proc file that is
    not a process's: the unit had it, so under the service the boot was never known and a power cut's
    lost seqs were issued again."""
    from agent.seqmark import BOOT_ID

    assert str(BOOT_ID).startswith("/proc/sys/")
    assert unit_settings().get("ProcSubset", ["all"]) == ["all"], f"{BOOT_ID} and /proc/uptime must stay readable"


def test_unit_hardening_leaves_serial_ports_and_the_network_open():
    s = unit_settings()
    assert "dialout" in s["SupplementaryGroups"]
    assert s.get("PrivateDevices", ["no"]) == ["no"], "a private /dev has no serial ports"
    allowed = {v.split()[0] for v in s.get("DeviceAllow", [])}
    assert {"char-ttyUSB", "char-ttyAMA", "char-ttyS", "char-ttyACM"} <= allowed
    assert all(v.split()[1] == "rw" for v in s["DeviceAllow"])
    families = " ".join(s["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families), "broker over IPv4/IPv6, sd_notify over AF_UNIX"
    assert "PrivateNetwork" not in s and "IPAddressDeny" not in s
    # the buffer is written under the StateDirectory even with a read-only OS
    assert s["ProtectSystem"] == ["strict"]


# ------------------------------------------------------------------------------------- install.sh

def source_copy(dest: Path) -> Path:
    """The parts of the checkout install.sh installs, copied so that a test can change them (upgrade)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("agent", "drivers", "config", "deploy"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def install(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"install.sh {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: kind, mode, and for files content hash and mtime (a rewrite shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(p.relative_to(root))] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[str(p.relative_to(root))] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def src(tmp_path):
    return source_copy(tmp_path / "src")


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_install_into_a_root_lays_out_files_with_safe_permissions(src, root):
    proc = install("--root", root, "--source", src, "--skip-venv")
    conf_dir = root / "etc/edge-agent"
    conf, pw = conf_dir / "edge-agent.yaml", conf_dir / "mqtt.pass"
    unit = root / "etc/systemd/system/edge-agent.service"
    state = root / "var/lib/edge-agent"

    assert unit.read_bytes() == (src / "deploy/systemd/edge-agent.service").read_bytes() and mode(unit) == 0o644
    assert mode(conf_dir) == 0o750
    assert mode(conf) == 0o640 and mode(pw) == 0o640, "config and password must not be world-readable"
    assert pw.read_bytes() == b""
    assert state.is_dir() and mode(state) == 0o750
    assert (root / "opt/edge-agent/README.md").is_file()
    assert (root / "opt/edge-agent/examples/example.yaml").is_file()

    # the example, with the buffer moved to the StateDirectory; it validates
    installed = yaml.safe_load(conf.read_text())
    example = yaml.safe_load((src / "config/example.yaml").read_text())
    assert installed["storage"]["path"] == "/var/lib/edge-agent/buffer.db"
    installed["storage"]["path"] = example["storage"]["path"]
    assert installed == example
    check = run_cli("check-config", str(conf))
    assert check.returncode == 0, check.stdout + check.stderr

    # under --root no system command runs: what would have run is printed
    out = proc.stdout
    assert "skip: useradd --system --user-group --groups dialout edge-agent" in out
    assert f"skip: chown root:edge-agent {conf} {pw}" in out
    assert f"skip: chown edge-agent:edge-agent {state}" in out
    assert "skip: systemctl daemon-reload" in out and "skip: systemctl enable edge-agent.service" in out
    # only the system's own directories, under the root
    written = {p.relative_to(root).parts[0] for p in root.iterdir()}
    assert written <= {"etc", "opt", "var", "usr"}


def test_the_next_step_it_prints_checks_the_config_as_the_service_reads_it(src, root):
    """The closing hint is the README's checklist step 4: check as the service's user (root reads every
    file, so a key or password the service may not read passed), and with /etc/edge-agent/env when there
    is one (without it, every `${NAME}` of the config was said to be unset). It printed a plain
    `edge-agent check-config …`, run as root by a technician who had just used sudo."""
    conf = "/etc/edge-agent/edge-agent.yaml"
    out = install("--root", root, "--source", src, "--skip-venv").stdout
    assert f"sudo -u edge-agent edge-agent check-config {conf} && sudo systemctl start edge-agent.service" in out, out
    (root / "etc/edge-agent/env").write_text("HJ212_PW=abc123\n")
    out = install("--root", root, "--source", src, "--skip-venv").stdout
    assert ("sudo sh -c 'set -a; . /etc/edge-agent/env; exec runuser -u edge-agent -- edge-agent check-config "
            f"{conf}' && sudo systemctl start edge-agent.service") in out, out


def test_second_run_changes_nothing_and_keeps_the_technicians_edits(src, root):
    install("--root", root, "--source", src, "--skip-venv")
    conf = root / "etc/edge-agent/edge-agent.yaml"
    pw = root / "etc/edge-agent/mqtt.pass"
    conf.write_text(conf.read_text().replace('id: "DEMO0000000001"', 'id: "14010500000017"') + "# edited on site\n")
    pw.write_text("s3cret-on-site\n")
    (root / "var/lib/edge-agent/buffer.db").write_bytes(b"not really sqlite, but precious")
    before = snapshot(root)

    proc = install("--root", root, "--source", src, "--skip-venv")
    assert snapshot(root) == before
    assert "kept" in proc.stdout and "unchanged" in proc.stdout
    assert "daemon-reload" not in proc.stdout, "an unchanged unit needs no daemon-reload"
    assert "14010500000017" in conf.read_text() and pw.read_text() == "s3cret-on-site\n"


def test_rerun_takes_world_read_access_away_from_config_and_password(src, root):
    install("--root", root, "--source", src, "--skip-venv")
    conf = root / "etc/edge-agent/edge-agent.yaml"
    pw = root / "etc/edge-agent/mqtt.pass"
    text = conf.read_text()
    conf.chmod(0o644)
    pw.chmod(0o666)
    (root / "etc/edge-agent").chmod(0o755)
    install("--root", root, "--source", src, "--skip-venv")
    assert mode(conf) == 0o640 and mode(pw) == 0o640 and mode(root / "etc/edge-agent") == 0o750
    assert conf.read_text() == text


def test_upgrade_installs_the_new_unit_and_keeps_config_and_buffer(src, root):
    install("--root", root, "--source", src, "--skip-venv")
    conf = root / "etc/edge-agent/edge-agent.yaml"
    buffer = root / "var/lib/edge-agent/buffer.db"
    conf.write_text(conf.read_text() + "# edited on site\n")
    buffer.write_bytes(b"unsent readings")
    kept = {p: p.read_bytes() for p in (conf, buffer, root / "etc/edge-agent/mqtt.pass")}

    # a newer release: the unit and the example config changed
    unit_src = src / "deploy/systemd/edge-agent.service"
    unit_src.write_text(unit_src.read_text().replace("[Install]", "# release 2\n[Install]"))
    example = src / "config/example.yaml"
    example.write_text(example.read_text() + "# release 2\n")

    proc = install("--root", root, "--source", src, "--skip-venv")
    assert "# release 2" in (root / "etc/systemd/system/edge-agent.service").read_text()
    assert "skip: systemctl daemon-reload" in proc.stdout
    assert all(p.read_bytes() == content for p, content in kept.items())
    assert (root / "opt/edge-agent/examples/example.yaml").read_text().endswith("# release 2\n")


def test_uninstall_removes_program_and_unit_but_keeps_config_and_buffer(src, root):
    install("--root", root, "--source", src, "--skip-venv")
    conf = root / "etc/edge-agent/edge-agent.yaml"
    buffer = root / "var/lib/edge-agent/buffer.db"
    conf.write_text(conf.read_text() + "# edited on site\n")
    buffer.write_bytes(b"unsent readings")
    kept = snapshot(root / "etc/edge-agent") | {"buffer": buffer.read_bytes()}

    proc = install("--root", root, "--uninstall")
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "opt/edge-agent").exists()
    assert "skip: systemctl disable --now edge-agent.service" in proc.stdout
    assert snapshot(root / "etc/edge-agent") | {"buffer": buffer.read_bytes()} == kept

    # installing again later finds the station as it was
    install("--root", root, "--source", src, "--skip-venv")
    assert conf.read_text().endswith("# edited on site\n") and buffer.read_bytes() == b"unsent readings"
    # and uninstalling twice is harmless
    install("--root", root, "--uninstall")
    install("--root", root, "--uninstall")


def test_install_rejects_unknown_options_and_a_source_without_project(tmp_path):
    bad = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown option" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path / "r"), "--source", str(empty),
                           "--python", sys.executable], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "pyproject.toml" in proc.stderr


def _venv_python() -> str:
    """The interpreter behind the test venv (a venv made from a venv's python would nest oddly)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def test_real_venv_install_runs_and_upgrades(src, root, tmp_path):
    """The slow path, once: python -m venv + pip install of the package and its dependencies
    (about 10 s with a warm pip cache; it needs the package index or a wheelhouse)."""
    python = _venv_python()
    probe = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot create venvs (python3-venv missing)")
    t0 = time.monotonic()
    proc = install("--root", root, "--source", src, "--python", python)
    first = time.monotonic() - t0
    entry = root / "opt/edge-agent/venv/bin/edge-agent"
    assert subprocess.run([str(entry), "--version"], capture_output=True, text=True).stdout.startswith("edge-agent ")
    assert "with the installed program: valid" in proc.stdout, proc.stdout + proc.stderr
    assert os.readlink(root / "usr/local/bin/edge-agent") == ENTRY
    # the installed unit verifies with the installed program in place of /opt/...
    if SYSTEMD_ANALYZE:
        installed_unit = root / "etc/systemd/system/edge-agent.service"
        assert analyze_verify(verifiable_copy(installed_unit, tmp_path, entry)) == []

    # same source again: nothing to rebuild
    t0 = time.monotonic()
    proc = install("--root", root, "--source", src, "--python", python)
    second = time.monotonic() - t0
    assert "unchanged" in proc.stdout and "installed edge-agent" not in proc.stdout

    # a newer source (same version number): the new code is installed, config and buffer kept
    # The station's config takes a value from /etc/edge-agent/env, as the unit's EnvironmentFile= gives it
    # (the examples' HJ212_PW, MQTT_USER, MQTT_PASS): the check after the upgrade runs with it too.
    buffer = root / "var/lib/edge-agent/buffer.db"
    buffer.write_bytes(b"unsent readings")
    conf = root / "etc/edge-agent/edge-agent.yaml"
    conf.write_text(re.sub(r'(?m)^  name: .*$', '  name: "${EDGE_AGENT_TEST_NAME}"', conf.read_text(), count=1))
    (root / "etc/edge-agent/env").write_text("# for ${NAME} in the config\nEDGE_AGENT_TEST_NAME='Fenhe outfall 17'\n")
    assert "EDGE_AGENT_TEST_NAME" not in os.environ
    conf_before = conf.read_bytes()
    init = src / "agent/__init__.py"
    init.write_text(re.sub(r'__version__ = "([^"]+)"', r'__version__ = "\1+upgradetest"', init.read_text()))
    proc = install("--root", root, "--source", src, "--python", python)
    assert "with the installed program: valid" in proc.stdout, proc.stdout + proc.stderr
    version = subprocess.run([str(entry), "--version"], capture_output=True, text=True).stdout
    assert "+upgradetest" in version
    assert buffer.read_bytes() == b"unsent readings"
    assert (root / "etc/edge-agent/edge-agent.yaml").read_bytes() == conf_before
    print(f"install.sh with a real venv: first run {first:.1f}s, unchanged re-run {second:.1f}s")


# In a private mount namespace: /etc, /opt, /var and /usr are overlays on the test's folder ($1).
OVERLAID_HOST = r"""
set -euo pipefail
up=$1; shift
for d in etc opt var usr; do
    mkdir -p "$up/$d.up" "$up/$d.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$up/$d.up,workdir=$up/$d.work" "/$d" || exit 97
    [[ $(findmnt -n -o FSTYPE "/$d") == overlay ]] || { echo "no overlay on /$d" >&2; exit 97; }
done
"""

NAMESPACE_SCRIPT = OVERLAID_HOST + r"""
bash "$@" --no-systemctl --skip-venv
bash "$@" --no-systemctl --skip-venv
echo "GROUPS $(id -nG edge-agent)"
for p in /etc/edge-agent /etc/edge-agent/edge-agent.yaml /etc/edge-agent/mqtt.pass /var/lib/edge-agent; do
    echo "STAT $(stat -c '%n %U:%G %a' "$p")"
done
setpriv --reuid=edge-agent --regid=edge-agent --init-groups cat /etc/edge-agent/mqtt.pass >/dev/null \
    && echo "SERVICE_READS_PASSWORD yes"
setpriv --reuid=nobody --regid=nogroup --clear-groups cat /etc/edge-agent/edge-agent.yaml >/dev/null 2>&1 \
    || echo "OTHERS_READ_CONFIG no"
bash "$@" --no-systemctl --uninstall
echo "AFTER_UNINSTALL $(ls /etc/edge-agent | tr '\n' ' ')| $(test -d /var/lib/edge-agent && echo state-kept)"
"""


def in_overlaid_host(script: str, tmp_path: Path, *install_args: str | Path) -> subprocess.CompletedProcess:
    """`script` (OVERLAID_HOST first) run as root in a private mount namespace, with install.sh and
    `install_args` as its "$@": the real thing, not --root, yet the host untouched (needs root and
    overlayfs; skipped elsewhere)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare and setpriv (util-linux)")
    if any(str(tmp_path).startswith(d) for d in ("/etc", "/opt", "/var", "/usr")):
        pytest.skip("the temporary folder lies under an overlaid directory")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no mount namespaces here")
    proc = subprocess.run(["unshare", "-m", "bash", "-c", script, "ns", str(tmp_path / "overlay"), str(INSTALL),
                           *map(str, install_args)], capture_output=True, text=True, timeout=120)
    if proc.returncode == 97:
        pytest.skip(f"overlayfs not available: {proc.stderr.strip()[:200]}")
    return proc


def test_install_as_root_creates_the_user_and_sets_owners(src, tmp_path):
    """useradd, chown and modes as on a gateway (`in_overlaid_host`)."""
    proc = in_overlaid_host(NAMESPACE_SCRIPT, tmp_path, "--source", src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "created system user edge-agent" in out and "user edge-agent exists" in out
    groups = next(line for line in out.splitlines() if line.startswith("GROUPS ")).split()[1:]
    assert "dialout" in groups and "edge-agent" in groups
    stats = {}
    for line in out.splitlines():
        if line.startswith("STAT "):
            _, path, owner_mode = line.split(" ", 2)
            stats[path] = owner_mode
    assert stats == {"/etc/edge-agent": "root:edge-agent 750",
                     "/etc/edge-agent/edge-agent.yaml": "root:edge-agent 640",
                     "/etc/edge-agent/mqtt.pass": "root:edge-agent 640",
                     "/var/lib/edge-agent": "edge-agent:edge-agent 750"}
    assert "SERVICE_READS_PASSWORD yes" in out and "OTHERS_READ_CONFIG no" in out
    assert "AFTER_UNINSTALL edge-agent.yaml mqtt.pass | state-kept" in out


def test_install_where_systemd_is_not_running_installs_the_unit_and_says_what_is_left(src, tmp_path):
    """A container or chroot has systemctl but no systemd as PID 1: every systemctl call fails there. The
    install stopped at the unit's daemon-reload (exit 1, "System has not been booted with systemd"),
    before the config check; it now installs everything, skips systemctl and says what to run."""
    script = OVERLAID_HOST + r"""
mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd   # no /run/systemd/system: not booted with systemd
bash "$@" --skip-venv
echo "UNIT $(test -f /etc/systemd/system/edge-agent.service && echo installed)"
"""
    proc = in_overlaid_host(script, tmp_path, "--source", src)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "systemd is not running here" in out and "systemctl enable --now edge-agent.service" in out
    assert "skip: systemctl daemon-reload" in out and "UNIT installed" in out


def test_an_upgrade_whose_program_refuses_the_config_leaves_the_running_service_alone(src, tmp_path):
    """The service runs; the upgrade's program refuses the station's config (a key it no longer takes,
    say). install.sh warned, then restarted the service anyway: the new version exited at once, again
    and again until the unit gave up, and the station recorded nothing until someone came. It now says
    so and leaves the running service alone. systemd is a stand-in here: a `systemctl` that notes its
    calls and reports the unit active; the installed program refuses every config."""
    script = OVERLAID_HOST + r"""
mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system
calls=$(mktemp)
printf '#!/bin/sh\necho "$*" >> %s\nexit 0\n' "$calls" > /usr/local/bin/systemctl
chmod 755 /usr/local/bin/systemctl
mkdir -p /opt/edge-agent/venv/bin
printf '#!/bin/sh\nexit 0\n' > /opt/edge-agent/venv/bin/python
printf '#!/bin/sh\necho "$2:20:3: mqtt.old_key: unknown key" >&2\nexit 2\n' > /opt/edge-agent/venv/bin/edge-agent
chmod 755 /opt/edge-agent/venv/bin/python /opt/edge-agent/venv/bin/edge-agent
bash "$@" --skip-venv
echo "SYSTEMCTL $(tr '\n' ';' < "$calls")"
"""
    proc = in_overlaid_host(script, tmp_path, "--source", src)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    calls = next(line for line in out.splitlines() if line.startswith("SYSTEMCTL ")).split(" ", 1)[1]
    assert "is-active" in calls and "daemon-reload" in calls, "the stand-in saw the install (the unit is new)"
    assert "restart" not in calls, out
    assert "has problems" in out and "NOT restarted" in out, out
