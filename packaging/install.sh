#!/usr/bin/env bash
# Installs kvtierd as a systemd service on this node.  Run as root from a kvtier checkout:
#
#     sudo packaging/install.sh              # install or upgrade
#     packaging/install.sh --dry-run         # print the steps, change nothing (no root needed)
#     packaging/install.sh --print-config    # print the config it writes when none exists
#
# Steps (each one is safe to repeat: running the script twice leaves the node as running it once):
#   1. the kvtier system group and user (no login, no home); sysusers.d entry for image-based systems
#   2. a venv under /opt/kvtier/venv with kvtier installed from this checkout (upgraded in place),
#      and the symlinks /usr/local/bin/kvtierd and /usr/local/bin/kvtier into it
#   3. the unit /etc/systemd/system/kvtierd.service (always refreshed: put local changes in a
#      drop-in, `systemctl edit kvtierd`, never in the unit) and /usr/share/doc/kvtier/operations.md
#   4. /etc/kvtier (root:kvtier 0750) and /etc/kvtier/kvtierd.toml (root:kvtier 0640) only if
#      absent: an existing config is never touched; the full reference goes next to it as
#      kvtierd.example.toml; the config is then checked with kvtierd --check-config
#   5. systemctl daemon-reload (skipped when systemd is not running)
# It does not enable or start the service; it prints how.
#
# Environment: PYTHON (default python3, must be >= 3.11), PREFIX (default /opt/kvtier).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
PREFIX=${PREFIX:-/opt/kvtier}
VENV=$PREFIX/venv
CONF_DIR=/etc/kvtier
UNIT_DIR=/etc/systemd/system
DOC_DIR=/usr/share/doc/kvtier
DRY_RUN=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# The config written on first install: the systemd layout (unit: StateDirectory, RuntimeDirectory).
# docs/operations.md shows the same file; every other key keeps its default (kvtierd.example.toml).
default_config() {
    cat <<'TOML'
# kvtierd under systemd: see /usr/share/doc/kvtier/operations.md.  Reload with
# `systemctl reload kvtierd` (log_level applies live; other keys need `systemctl restart kvtierd`).
data_dir = "/var/lib/kvtier"      # StateDirectory=kvtier
log_level = "info"

[server]
socket = "/run/kvtier/kvtierd.sock"   # RuntimeDirectory=kvtier, dir mode 0750
socket_mode = "0660"                  # kvtier group: the engines' users may connect
max_message_bytes = "4MiB"
# Connecting is not enough: kvtierd knows each local client by its uid (SO_PEERCRED) and serves
# only the users named here or in a [[tenant]] (docs/security.md). A single-tenant node names the
# engines' users as administrators, e.g. admin_uids = [1001]; a shared node gives each tenant a
# [[tenant]] table instead.
admin_uids = []                       # empty: kvtierd's own user and root only

[cpu]
capacity = "1GiB"                 # the administrators' arena (memory, resident): size it to the node
slot_bytes = "2MiB"               # must hold one engine block

[disk]
enabled = true
capacity = "8GiB"                 # on the file system of /var/lib/kvtier: size it to the node

[metrics]
listen = "127.0.0.1:9477"         # Prometheus /metrics (loopback only)
TOML
}

say() { printf '%s\n' "$*"; }
step() { say ""; say "== $*"; }
quoted() { printf '+'; printf ' %q' "$@"; }

# run CMD...: runs it, or prints it under --dry-run.
run() {
    if (( DRY_RUN )); then
        say "$(quoted "$@")"
    else
        "$@"
    fi
}

# unless CHECK -- CMD...: runs CMD only when the shell test CHECK fails (prints both under --dry-run).
unless() {
    local check=$1
    shift 2
    if (( DRY_RUN )); then
        say "$(quoted "$@")    # unless: $check"
    elif ! eval "$check" >/dev/null 2>&1; then
        "$@"
    fi
}

check_prerequisites() {
    step "prerequisites"
    if (( ! DRY_RUN )) && (( EUID != 0 )); then
        say "install.sh must run as root (or use --dry-run)" >&2
        exit 1
    fi
    run "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "kvtier needs Python >= 3.11"'
    [[ -f "$SRC/pyproject.toml" && -f "$SRC/packaging/kvtierd.service" ]] || {
        say "$SRC does not look like a kvtier checkout" >&2
        exit 1
    }
}

create_user() {
    step "kvtier system group and user"
    unless "getent group kvtier" -- groupadd --system kvtier
    unless "getent passwd kvtier" -- useradd --system --gid kvtier --home-dir /var/lib/kvtier \
        --no-create-home --shell /usr/sbin/nologin --comment "kvtier block store" kvtier
    run install -D -m 0644 "$SRC/packaging/kvtierd.sysusers.conf" /usr/lib/sysusers.d/kvtier.conf
}

install_venv() {
    step "venv $VENV with kvtier from $SRC"
    run install -d -m 0755 "$PREFIX"
    unless "test -x $VENV/bin/python" -- "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/python" -m pip install --quiet --upgrade pip
    run "$VENV/bin/python" -m pip install --quiet --upgrade "$SRC"
    run ln -sfn "$VENV/bin/kvtierd" /usr/local/bin/kvtierd
    run ln -sfn "$VENV/bin/kvtier" /usr/local/bin/kvtier
}

install_unit() {
    step "unit $UNIT_DIR/kvtierd.service and docs"
    run install -D -m 0644 "$SRC/packaging/kvtierd.service" "$UNIT_DIR/kvtierd.service"
    run install -D -m 0644 "$SRC/docs/operations.md" "$DOC_DIR/operations.md"
}

install_config() {
    step "config $CONF_DIR/kvtierd.toml (kept if present)"
    run install -d -m 0750 -o root -g kvtier "$CONF_DIR"
    run install -m 0640 -o root -g kvtier "$SRC/packaging/kvtierd.example.toml" "$CONF_DIR/kvtierd.example.toml"
    if (( DRY_RUN )); then
        say "+ write $CONF_DIR/kvtierd.toml (root:kvtier 0640; see --print-config)    # unless: test -e $CONF_DIR/kvtierd.toml"
    elif [[ ! -e "$CONF_DIR/kvtierd.toml" ]]; then
        (umask 0027 && default_config > "$CONF_DIR/kvtierd.toml.new")
        chown root:kvtier "$CONF_DIR/kvtierd.toml.new"
        mv "$CONF_DIR/kvtierd.toml.new" "$CONF_DIR/kvtierd.toml"
    fi
    run /usr/local/bin/kvtierd -c "$CONF_DIR/kvtierd.toml" --check-config
}

reload_systemd() {
    step "systemd"
    if (( DRY_RUN )) || [[ -d /run/systemd/system ]]; then
        run systemctl daemon-reload
    else
        say "systemd is not running here: skipped systemctl daemon-reload"
    fi
}

next_steps() {
    step "done; next:"
    say "  edit $CONF_DIR/kvtierd.toml (cpu.capacity, disk.capacity), then:"
    say "  systemctl enable --now kvtierd"
    say "  usermod -aG kvtier ENGINE_USER     # each user whose engines use the socket and the arena"
    say "  journalctl -u kvtierd -f           # logs; systemctl status kvtierd shows blocks and backlog"
}

main() {
    while (( $# )); do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --print-config) default_config; return 0 ;;
            -h|--help) usage; return 0 ;;
            *) say "unknown argument: $1" >&2; usage >&2; return 2 ;;
        esac
        shift
    done
    (( DRY_RUN )) && say "dry run: nothing is changed; the commands are printed"
    check_prerequisites
    create_user
    install_venv
    install_unit
    install_config
    reload_systemd
    next_steps
}

main "$@"
