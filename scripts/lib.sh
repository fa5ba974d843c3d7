# shellcheck shell=bash
# Shared helpers for scripts/*. Sourced, not executed: callers already run
# with `set -euo pipefail`, so nothing here changes shell options.

# Repo root, derived from this file's location so scripts work from any cwd.
MSGBUF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MSGBUF_ROOT

# Diagnostics go to stderr: several scripts print a machine-readable result
# as the last line of stdout.
log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Section header for long multi-step runs (scripts/test, compose-smoke).
section() { printf '\n==== %s ====\n' "$*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }
is_linux() { [ "$(uname -s)" = Linux ]; }

# apt_install PKG...: installs only the packages that are not installed yet,
# running `apt-get update` at most once per top-level invocation (the marker
# is exported so child scripts skip it too). Fails clearly without root/apt.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "need packages (${missing[*]}) but apt-get is not available"
    is_root || die "need packages (${missing[*]}); re-run as root or install them yourself"
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${MSGBUF_APT_UPDATED:-}" ]; then
        log "apt-get update"
        apt-get update -qq >&2
        export MSGBUF_APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# wait_for DESCRIPTION TIMEOUT_SECONDS COMMAND...: polls COMMAND (output
# discarded) every 0.5 s until it succeeds or the deadline passes. This is the
# only sanctioned way to wait on something in these scripts.
wait_for() {
    local what=$1 timeout=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timed out after ${timeout}s waiting for: $what"
            return 1
        fi
        sleep 0.5
    done
    log "ready: $what"
}
