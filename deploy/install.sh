#!/usr/bin/env bash
# Install, upgrade or uninstall edge-agent on Raspberry Pi OS / Debian (arm64, armhf, amd64).
#
#   sudo deploy/install.sh                 # install or upgrade from this checkout
#   sudo deploy/install.sh --uninstall     # remove program and unit; keep config and buffer
#   deploy/install.sh --root /tmp/img      # stage everything under /tmp/img (tests, image builds)
#
# What it does (every step is idempotent; run it again to upgrade):
#   - system user and group `edge-agent` (member of `dialout` for the serial ports)
#   - venv /opt/edge-agent/venv with the package from --source (pip install)
#   - /etc/edge-agent/ (root:edge-agent 0750); edge-agent.yaml from config/example.yaml and an
#     empty mqtt.pass (root:edge-agent 0640), each only if absent: an edited config is never touched
#   - /var/lib/edge-agent/ (the buffer; also created by systemd's StateDirectory=)
#   - /etc/systemd/system/edge-agent.service, daemon-reload, enable (not start: edit the config
#     first); an upgrade restarts the service if it was running
#
# With --root DIR nothing outside DIR is written and no system command runs (useradd, chown,
# systemctl, apt-get): they are printed as "skip: ..." instead. The venv made under --root has DIR
# in its paths: run it there (tests) or rebuild it on the target.
set -euo pipefail

readonly UNIT_NAME=edge-agent.service
readonly SVC_USER=edge-agent
readonly SVC_GROUP=edge-agent
readonly MIN_PY_MINOR=11

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=""
SOURCE=$(cd -- "$SCRIPT_DIR/.." && pwd)
PYTHON=""
WHEELHOUSE=""
UNINSTALL=0
SKIP_VENV=0
NO_SYSTEMCTL=0
SYSTEM_ACTIONS=1   # useradd, chown, apt-get: off under --root
CHANGED=0          # the venv or the unit changed: a running service is restarted
CONFIG_VALID=1     # 0: the installed program refuses the config, so a running service is not restarted
BUILD_TMP=""

usage() {
    cat <<'EOF'
Usage: install.sh [options]

  --source DIR      project checkout to install (default: the repository holding this script)
  --root DIR        install under DIR instead of / (no useradd/chown/systemctl/apt-get; they are
                    printed as "skip: ...")
  --python PY       Python (>= 3.11) for the venv (default: /usr/bin/python3, else python3 on the PATH)
  --wheelhouse DIR  install offline from wheels in DIR (pip --no-index --find-links DIR)
  --skip-venv       do not create or update the venv (files, user and unit only)
  --no-systemctl    do not call systemctl (e.g. in a chroot or container image build)
  --uninstall       remove the unit and /opt/edge-agent; keep /etc/edge-agent and /var/lib/edge-agent
  -h, --help        this help
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) [[ $# -ge 2 ]] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --source) [[ $# -ge 2 ]] || die "--source needs a directory"; SOURCE=$2; shift 2 ;;
        --source=*) SOURCE=${1#*=}; shift ;;
        --python) [[ $# -ge 2 ]] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --wheelhouse) [[ $# -ge 2 ]] || die "--wheelhouse needs a directory"; WHEELHOUSE=$2; shift 2 ;;
        --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        --no-systemctl) NO_SYSTEMCTL=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

if [[ -n "$ROOT" ]]; then
    mkdir -p -- "$ROOT"
    ROOT=$(cd -- "$ROOT" && pwd)
    [[ "$ROOT" == "/" ]] && ROOT=""
fi
if [[ -n "$ROOT" ]]; then
    SYSTEM_ACTIONS=0
    NO_SYSTEMCTL=1
fi

readonly OPT_DIR="$ROOT/opt/edge-agent"
readonly VENV="$OPT_DIR/venv"
readonly CONF_DIR="$ROOT/etc/edge-agent"
readonly CONF_FILE="$CONF_DIR/edge-agent.yaml"
readonly PASS_FILE="$CONF_DIR/mqtt.pass"
readonly STATE_DIR="$ROOT/var/lib/edge-agent"
readonly UNIT_DIR="$ROOT/etc/systemd/system"
readonly UNIT_FILE="$UNIT_DIR/$UNIT_NAME"
readonly LINK="$ROOT/usr/local/bin/edge-agent"
# Paths as the running system sees them (written into files), whatever ROOT is.
readonly TARGET_BUFFER=/var/lib/edge-agent/buffer.db
readonly TARGET_ENTRY=/opt/edge-agent/venv/bin/edge-agent
readonly TARGET_CONF=/etc/edge-agent/edge-agent.yaml

# A system action: run it, or under --root print what would have been run.
system() {
    if [[ $SYSTEM_ACTIONS -eq 1 ]]; then
        "$@"
    else
        echo "skip: $*"
    fi
}

sysctl_() {
    if [[ $NO_SYSTEMCTL -eq 1 ]]; then
        echo "skip: systemctl $*"
    else
        systemctl "$@"
    fi
}

unit_active() {
    [[ $NO_SYSTEMCTL -eq 0 ]] && systemctl is-active --quiet "$UNIT_NAME"
}

# install_if_changed SRC DEST MODE: copy only when the content differs; prints what happened.
install_if_changed() {
    local src=$1 dest=$2 mode=$3
    if [[ -f "$dest" ]] && cmp -s -- "$src" "$dest"; then
        chmod "$mode" -- "$dest"
        say "unchanged $dest"
        return 1
    fi
    install -m "$mode" -- "$src" "$dest"
    say "installed $dest"
    return 0
}

copy_quiet() {
    cmp -s -- "$1" "$2" 2>/dev/null || install -m 0644 -- "$1" "$2"
}

# ---------------------------------------------------------------------------------------------
uninstall() {
    if [[ $SYSTEM_ACTIONS -eq 1 && $EUID -ne 0 ]]; then
        die "run as root (sudo), or use --root DIR"
    fi
    if [[ -f "$UNIT_FILE" ]]; then
        sysctl_ disable --now "$UNIT_NAME" || true
        rm -f -- "$UNIT_FILE"
        sysctl_ daemon-reload
        say "removed $UNIT_FILE"
    else
        say "no unit at $UNIT_FILE"
    fi
    if [[ -L "$LINK" && "$(readlink -- "$LINK")" == "$TARGET_ENTRY" ]]; then
        rm -f -- "$LINK"
        say "removed $LINK"
    fi
    if [[ -d "$OPT_DIR" ]]; then
        rm -rf -- "$OPT_DIR"
        say "removed $OPT_DIR"
    fi
    say "kept $CONF_DIR (configuration) and $STATE_DIR (buffer) and the user $SVC_USER;"
    say "delete them by hand if this station is decommissioned: rm -r /etc/edge-agent /var/lib/edge-agent; userdel $SVC_USER"
}

# ---------------------------------------------------------------------------------------------
check_platform() {
    local arch
    arch=$(uname -m)
    case "$arch" in
        x86_64|aarch64|armv7l|armv6l|armv8l) ;;
        *) say "warning: untested architecture $arch (supported: arm64, armhf, amd64)" ;;
    esac
    if [[ $SYSTEM_ACTIONS -eq 1 ]]; then
        [[ $EUID -eq 0 ]] || die "run as root (sudo), or use --root DIR to stage into a folder"
        command -v useradd >/dev/null || die "useradd not found (package passwd)"
        if [[ $NO_SYSTEMCTL -eq 0 ]]; then
            command -v systemctl >/dev/null || die "systemctl not found: this needs systemd (or use --no-systemctl)"
            # systemctl is there but systemd is not PID 1 (a container, a chroot): every systemctl call
            # fails ("System has not been booted with systemd"), which stopped the install half way.
            if [[ ! -d /run/systemd/system ]]; then
                say "warning: systemd is not running here (a container or chroot?): the unit is installed but not"
                say "  enabled; where systemd runs: systemctl daemon-reload && systemctl enable --now $UNIT_NAME"
                NO_SYSTEMCTL=1
            fi
        fi
    fi
}

apt_install() {
    say "installing $* (needed to create the venv)"
    # A fresh image may have no package lists yet: read them once.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pick_python() {
    if [[ -z "$PYTHON" ]]; then
        # The distribution's interpreter first: the service user must be able to run the venv's
        # python, and one found first on root's PATH (a pyenv under /root, say) is not readable by it.
        local candidate
        for candidate in /usr/bin/python3 "$(command -v python3 || true)"; do
            if [[ -x "$candidate" ]] && "$candidate" -c \
                "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_PY_MINOR) else 1)" 2>/dev/null; then
                PYTHON=$candidate
                break
            fi
        done
        [[ -n "$PYTHON" ]] || PYTHON=$(command -v python3 || true)
        if [[ -z "$PYTHON" ]] && [[ $SYSTEM_ACTIONS -eq 1 ]] && command -v apt-get >/dev/null; then
            apt_install python3 python3-venv  # a minimal Debian has no Python at all
            PYTHON=/usr/bin/python3
        fi
        [[ -n "$PYTHON" ]] || die "python3 not found (apt-get install python3 python3-venv)"
    fi
    "$PYTHON" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_PY_MINOR) else 1)" \
        || die "$PYTHON is older than 3.$MIN_PY_MINOR (Debian 12 / Raspberry Pi OS bookworm or newer needed)"
    if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
        if [[ $SYSTEM_ACTIONS -eq 1 ]] && command -v apt-get >/dev/null; then
            apt_install python3-venv
        else
            die "$PYTHON cannot create venvs (apt-get install python3-venv)"
        fi
    fi
}

ensure_user() {
    if [[ $SYSTEM_ACTIONS -eq 0 ]]; then
        echo "skip: useradd --system --user-group --groups dialout $SVC_USER"
        return
    fi
    if ! getent passwd "$SVC_USER" >/dev/null; then
        useradd --system --user-group --groups dialout --home-dir /var/lib/edge-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent station gateway" "$SVC_USER"
        say "created system user $SVC_USER (groups: $SVC_GROUP, dialout)"
    elif ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx dialout; then
        usermod -a -G dialout "$SVC_USER"
        say "added $SVC_USER to dialout"
    else
        say "user $SVC_USER exists"
    fi
}

# A fingerprint of what pip would install: the same source twice means nothing to do.
source_fingerprint() {
    (
        cd -- "$SOURCE"
        {
            find agent drivers -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 2>/dev/null
            printf '%s\0' pyproject.toml
            [[ -f README.md ]] && printf '%s\0' README.md
        } | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
    )
}

ensure_venv() {
    if [[ $SKIP_VENV -eq 1 ]]; then
        say "skipping the venv (--skip-venv)"
        return
    fi
    pick_python
    [[ -f "$SOURCE/pyproject.toml" ]] || die "no pyproject.toml in $SOURCE (use --source DIR)"
    local want have stamp="$OPT_DIR/.source-sha256" fingerprint
    want=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    if [[ -n "$have" && "$have" != "$want" ]]; then
        say "venv has Python $have, $PYTHON is $want: rebuilding the venv"
        rm -rf -- "$VENV" "$stamp"
    elif [[ -n "$have" && "$(readlink -f -- "$VENV/bin/python")" != "$(readlink -f -- "$PYTHON")" ]]; then
        say "venv was made from $(readlink -f -- "$VENV/bin/python"), not $PYTHON: rebuilding the venv"
        rm -rf -- "$VENV" "$stamp"
    elif [[ -z "$have" && -e "$VENV" ]]; then
        say "venv $VENV is broken: rebuilding it"
        rm -rf -- "$VENV" "$stamp"
    fi
    fingerprint=$(source_fingerprint)
    if [[ -x "$VENV/bin/edge-agent" && -f "$stamp" && "$(cat -- "$stamp")" == "$fingerprint" ]]; then
        say "unchanged $VENV ($("$VENV/bin/edge-agent" --version), same source)"
        return
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        mkdir -p -- "$OPT_DIR"
        if ! "$PYTHON" -m venv -- "$VENV"; then
            rm -rf -- "$VENV"
            die "$PYTHON could not create $VENV (on Debian: apt-get install python3-venv)"
        fi
        say "created venv $VENV"
    fi
    local -a pip_args=(--disable-pip-version-check --quiet)
    if [[ -n "$WHEELHOUSE" ]]; then
        pip_args+=(--no-index --find-links "$WHEELHOUSE")
    fi
    # Build from a scratch copy: pip writes build/ and *.egg-info into the tree it builds, and the
    # checkout may belong to someone else (or be read-only).
    BUILD_TMP=$(mktemp -d)
    trap 'rm -rf -- "$BUILD_TMP"' EXIT
    tar -C "$SOURCE" --exclude='./.*' --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=./tests --exclude=./bench -cf - . | tar -C "$BUILD_TMP" -xf -
    # --upgrade: a local source is always rebuilt, so an upgrade with the same version number
    # still installs the new code; dependencies are upgraded only when the new code needs it.
    "$VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade --upgrade-strategy only-if-needed -- "$BUILD_TMP"
    rm -rf -- "$BUILD_TMP"
    printf '%s\n' "$fingerprint" >"$stamp"
    CHANGED=1
    say "installed $("$VENV/bin/edge-agent" --version) into $VENV"
}

install_config() {
    mkdir -p -- "$CONF_DIR"
    chmod 0750 -- "$CONF_DIR"
    system chown "root:$SVC_GROUP" "$CONF_DIR"
    if [[ -e "$CONF_FILE" ]]; then
        say "kept $CONF_FILE (never overwritten)"
    else
        local example="$SOURCE/config/example.yaml" tmp
        [[ -f "$example" ]] || die "no $example"
        tmp=$(mktemp "$CONF_DIR/.edge-agent.yaml.XXXXXX")
        # The example keeps its buffer next to itself; a service keeps it in its StateDirectory.
        awk -v buffer="$TARGET_BUFFER" '
            /^[^[:space:]#]/ { section = $1 }
            section == "storage:" && /^[[:space:]]+path:/ && !done {
                match($0, /^[[:space:]]+/)
                print substr($0, 1, RLENGTH) "path: " buffer "   # the SQLite buffer (systemd StateDirectory)"
                done = 1
                next
            }
            { print }' "$example" >"$tmp"
        chmod 0640 -- "$tmp"
        mv -- "$tmp" "$CONF_FILE"
        say "installed $CONF_FILE from config/example.yaml (a demo station: edit it)"
    fi
    if [[ -e "$PASS_FILE" ]]; then
        say "kept $PASS_FILE"
    else
        (umask 077 && : >"$PASS_FILE")
        say "created empty $PASS_FILE (put the MQTT password there, one line)"
    fi
    # Secrets and station settings are for root and the service only, never world-readable.
    chmod 0640 -- "$CONF_FILE" "$PASS_FILE"
    system chown "root:$SVC_GROUP" "$CONF_FILE" "$PASS_FILE"
}

install_state_dir() {
    mkdir -p -- "$STATE_DIR"
    chmod 0750 -- "$STATE_DIR"
    system chown "$SVC_USER:$SVC_GROUP" "$STATE_DIR"
}

install_docs() {
    mkdir -p -- "$OPT_DIR/examples"
    local f
    copy_quiet "$SOURCE/deploy/README.md" "$OPT_DIR/README.md"
    copy_quiet "$SOURCE/config/example.yaml" "$OPT_DIR/examples/example.yaml"
    for f in "$SOURCE"/config/examples/*.yaml; do
        [[ -e "$f" ]] && copy_quiet "$f" "$OPT_DIR/examples/$(basename -- "$f")"
    done
    # `edge-agent` on the PATH for technicians (status, tail, check-config).
    if [[ $SKIP_VENV -eq 0 ]]; then
        mkdir -p -- "$(dirname -- "$LINK")"
        if [[ -L "$LINK" && "$(readlink -- "$LINK")" == "$TARGET_ENTRY" ]]; then
            :
        elif [[ -L "$LINK" || ! -e "$LINK" ]]; then
            ln -sfn -- "$TARGET_ENTRY" "$LINK"
            say "linked $LINK -> $TARGET_ENTRY"
        else
            say "warning: $LINK exists and is not a link; left alone"
        fi
    fi
}

install_unit() {
    mkdir -p -- "$UNIT_DIR"
    if install_if_changed "$SOURCE/deploy/systemd/$UNIT_NAME" "$UNIT_FILE" 0644; then
        CHANGED=1
        sysctl_ daemon-reload
    fi
    sysctl_ enable "$UNIT_NAME"
}

check_installed_config() {
    local entry="$VENV/bin/edge-agent"
    [[ -x "$entry" ]] || return 0
    local -a as_service=()
    if [[ $SYSTEM_ACTIONS -eq 1 ]] && command -v runuser >/dev/null; then
        # The check runs as the service will: as $SVC_USER, with its permissions.
        as_service=(runuser -u "$SVC_USER" --)
        if ! "${as_service[@]}" "$VENV/bin/python" -c "import agent" 2>/dev/null; then
            die "$SVC_USER cannot run $VENV/bin/python (made from $(readlink -f -- "$VENV/bin/python")," \
                "in a directory only root can read?); reinstall with --python /usr/bin/python3"
        fi
    fi
    # The service gets the ${NAME} values of the config from $CONF_DIR/env (EnvironmentFile=, read by
    # root): so does the check, or every configured station using them was said to have problems.
    local -a with_env=()
    if [[ -f "$CONF_DIR/env" ]]; then
        with_env=(sh -c 'set -a; . "$1"; shift; exec "$@"' sh "$CONF_DIR/env")
    fi
    if "${with_env[@]}" "${as_service[@]}" "$entry" check-config "$CONF_FILE" >/dev/null; then
        say "checked $CONF_FILE with the installed program: valid"
    else
        say "warning: $CONF_FILE has problems (above); fix them before starting the service"
        CONFIG_VALID=0
    fi
}

# The command a technician runs to check the config as the service reads it (README, checklist step 4):
# as its user (root reads every file), with the ${NAME} values of /etc/edge-agent/env when there is one.
check_hint() {
    if [[ -f "$CONF_DIR/env" ]]; then
        echo "sudo sh -c 'set -a; . /etc/edge-agent/env; exec runuser -u $SVC_USER -- edge-agent check-config $TARGET_CONF'"
    else
        echo "sudo -u $SVC_USER edge-agent check-config $TARGET_CONF"
    fi
}

main() {
    if [[ $UNINSTALL -eq 1 ]]; then
        uninstall
        return
    fi
    check_platform
    SOURCE=$(cd -- "$SOURCE" && pwd) || die "no source directory $SOURCE"
    local was_active=0
    unit_active && was_active=1
    ensure_user
    ensure_venv
    install_config
    install_state_dir
    install_docs
    install_unit
    check_installed_config
    if [[ $was_active -eq 1 && $CHANGED -eq 1 && $CONFIG_VALID -eq 0 ]]; then
        # Restarted, the new version would exit at once on this config, again and again until the unit
        # gives up: the station would record nothing until someone fixed it.
        say "NOT restarted: $UNIT_NAME goes on with the version it started with until the config is fixed;"
        say "  then: $(check_hint) && sudo systemctl restart $UNIT_NAME"
    elif [[ $was_active -eq 1 && $CHANGED -eq 1 ]]; then
        sysctl_ restart "$UNIT_NAME"
        say "restarted $UNIT_NAME with the new version (config and buffer kept)"
    elif [[ $was_active -eq 1 ]]; then
        say "nothing changed; $UNIT_NAME left running"
    else
        say "done. Next: edit /etc/edge-agent/edge-agent.yaml (and mqtt.pass), then"
        say "  $(check_hint) && sudo systemctl start $UNIT_NAME"
    fi
}

main
