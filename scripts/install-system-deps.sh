#!/usr/bin/env bash
# Install the system packages that the integration tests and the local demo
# run as real processes: redis-server, and prometheus (which brings promtool).
#
# Idempotent: it installs only the packages that are missing and calls
# `apt-get update` at most once. It keeps the packages' maintainer scripts
# from starting their services, and it never stops a running service. The
# tests start their own servers on free loopback ports, so a Redis that
# already runs on port 6379 is left alone and never used.
#
# Needs root (or sudo) and apt-get, so it works on Debian and Ubuntu only.
set -euo pipefail

readonly PACKAGES=(redis-server prometheus)
readonly POLICY_RC=/usr/sbin/policy-rc.d
# invoke-rc.d treats exit status 101 from policy-rc.d as "action forbidden".
readonly POLICY_FORBIDDEN=101

log() {
    echo "install-system-deps: $*" >&2
}

fail() {
    log "error: $*"
    exit 1
}

package_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [[ "$status" == "install ok installed" ]]
}

# The binaries each package provides; a package counts as present only when
# its binaries are on PATH too.
binaries_present() {
    case "$1" in
        redis-server) command -v redis-server >/dev/null ;;
        prometheus) command -v prometheus >/dev/null && command -v promtool >/dev/null ;;
        *) return 1 ;;
    esac
}

missing=()
for package in "${PACKAGES[@]}"; do
    if package_installed "$package" && binaries_present "$package"; then
        log "$package is already installed"
    else
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "nothing to install"
    exit 0
fi

command -v apt-get >/dev/null \
    || fail "apt-get not found; install these packages with your system's package manager: ${missing[*]}"

if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null \
        || fail "must run as root, or with sudo available, to install: ${missing[*]}"
fi

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Debian's redis-server and prometheus packages start their daemons from the
# maintainer scripts, and the redis one would listen on port 6379. While a
# policy-rc.d that exits 101 is in place, invoke-rc.d and deb-systemd-invoke
# skip every start. An existing policy that already forbids starts is kept.
# Any other is moved aside for the install and put back on exit.
policy_backup=""
policy_created=false

restore_policy() {
    if [[ "$policy_created" == true ]]; then
        as_root rm -f "$POLICY_RC"
    fi
    if [[ -n "$policy_backup" ]]; then
        as_root mv -f "$policy_backup" "$POLICY_RC"
    fi
}

existing_policy_forbids_starts() {
    [[ -x "$POLICY_RC" ]] || return 1
    local status=0
    "$POLICY_RC" redis-server start >/dev/null 2>&1 || status=$?
    [[ $status -eq $POLICY_FORBIDDEN ]]
}

if existing_policy_forbids_starts; then
    log "$POLICY_RC already forbids service starts; keeping it"
else
    trap restore_policy EXIT
    if [[ -e "$POLICY_RC" ]]; then
        policy_backup="$POLICY_RC.install-system-deps.bak"
        as_root mv -f "$POLICY_RC" "$policy_backup"
    fi
    policy_created=true
    printf '#!/bin/sh\nexit %d\n' "$POLICY_FORBIDDEN" | as_root tee "$POLICY_RC" >/dev/null
    as_root chmod 755 "$POLICY_RC"
    log "installed a temporary $POLICY_RC so that no service starts"
fi

log "running apt-get update"
as_root apt-get update \
    || fail "apt-get update failed; check the network and the apt sources, then run this script again"

log "installing: ${missing[*]}"
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
    || fail "apt-get install failed for: ${missing[*]}; read the apt output above, fix it, then run this script again"

for package in "${missing[@]}"; do
    binaries_present "$package" \
        || fail "$package was installed but its binaries are not on PATH (PATH=$PATH)"
done

log "installed: ${missing[*]}"
