#!/usr/bin/env bash
# Make a Docker engine, the base image and Compose v2 available for the Docker tests.
#
#   testbed/setup-docker.sh            as root; idempotent, well under a second when all is there
#   eval "$(testbed/setup-docker.sh)"  also exports KG_DOCKER (the client the tests must use)
#
# stdout carries only `export VAR=value` lines; progress and the summary go to stderr.
#
# 1. Engine: Debian's docker.io (20.10, API 1.41), installed with apt when missing. Use
#    /usr/bin/docker, Debian's client: a newer client without plugins (/usr/local/bin/docker)
#    comes earlier on PATH on these machines.
# 2. Daemon: when no engine answers, dockerd is started in the background (log:
#    /var/log/knockgate-dockerd.log) with docker0 and every network Docker picks itself inside
#    198.19.0.0/16 (part of 198.18.0.0/15): docker0 198.19.255.1/24, address pool
#    198.19.128.0/18 in /24s. Test networks with an explicit subnet use 198.18.x.
#    A running dockerd changes the root network namespace, and stopping it undoes none of it:
#    net.ipv4.ip_forward=1 (all interfaces forward, accept_redirects drops to 0; network
#    namespaces created afterwards inherit IPv4 forwarding=1), the iptables FORWARD policy becomes DROP
#    (Docker's way to keep forwarding it just enabled in check), DOCKER*/DOCKER-USER chains and
#    a MASQUERADE rule for docker0's subnet appear in the filter/nat tables (nf_tables backend).
#    net.bridge.bridge-nf-call-iptables is 1 (this kernel's default, and Docker wants it): bridged
#    frames traverse iptables FORWARD, so a bridge in the root namespace drops traffic. This script
#    deliberately undoes none of it (Docker's networking relies on it); tests that bridge or route
#    must keep their bridge inside a network namespace of their own.
# 3. Base image debian:bookworm-slim: no registry is reachable, so when the image is missing
#    (and `docker pull` fails fast) it is built with debootstrap from the Debian mirror named in
#    /etc/apt/sources.list.d/debian.sources and imported under that tag, with the same apt
#    sources, so the same Dockerfile builds here and where a registry is reachable.
# 4. Compose v2: Debian trixie's docker-compose 2.x package, fetched with a private, throwaway apt
#    configuration (nothing in /etc/apt changes, so nothing else from trixie can be installed)
#    and installed as the CLI plugin /usr/libexec/docker/cli-plugins/docker-compose.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
DOCKERD_LOG=/var/log/knockgate-dockerd.log
DOCKER_BIP=198.19.255.1/24
DOCKER_POOL=198.19.128.0/18
BASE_IMAGE=debian:bookworm-slim
SUITE=bookworm
PLUGIN_DIR=/usr/libexec/docker/cli-plugins
DEBIAN_SOURCES=/etc/apt/sources.list.d/debian.sources
DAEMON_WAIT=${KG_DOCKERD_WAIT:-60}
APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=300)

T0=$EPOCHREALTIME
log() { echo "setup-docker: $*" >&2; }
die() {
    echo "setup-docker: FAILED: $*" >&2
    exit 1
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

# One run at a time: concurrent test runs on one machine must not start two daemons or
# debootstrap twice.
exec 9>/run/lock/knockgate-setup-docker.lock
flock -w 900 9 || die "another setup-docker.sh still holds /run/lock/knockgate-setup-docker.lock"

# The mirror of the deb822 stanza whose Suites include $1 (first URI), from debian.sources,
# or from a one-line sources.list entry. Comment lines (e.g. a snapshot URL) are ignored.
mirror_for_suite() {
    local suite=$1 uri=""
    if [ -r "$DEBIAN_SOURCES" ]; then
        uri=$(awk -v want="$suite" '
            function flush() { if (ok && uri != "" && !done) { print uri; done = 1 } ok = 0; uri = "" }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == want) ok = 1 }
            END { flush() }' "$DEBIAN_SOURCES")
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri=$(awk -v want="$suite" '{ sub(/\[[^]]*\]/, ""); sub(/#.*/, "") }
                  $1 == "deb" && $3 == want { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "no apt source for suite '$suite' in $DEBIAN_SOURCES or /etc/apt/sources.list"
    echo "${uri%/}"
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

APT_UPDATED=0
apt_install() {
    # Refresh the lists once per run, only when something is to be installed: a fresh machine's
    # lists may be missing or stale.
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get "${APT_LOCK_WAIT[@]}" update -qq || die "apt-get update"
        APT_UPDATED=1
    fi
    # Installing docker.io must not start the daemon through its init script (with Docker's
    # defaults: docker0 on 172.17.0.0/16): deny service starts while apt runs, unless the
    # machine already denies them.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# knockgate setup-docker.sh: no service starts during apt-get install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    local rc=0
    apt-get "${APT_LOCK_WAIT[@]}" install -y -qq --no-install-recommends "$@" >/dev/null || rc=$?
    if [ "$ours" -eq 1 ]; then rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || die "apt-get install $* (exit $rc)"
}

engine_answers() { timeout 10 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# ---------------------------------------------------------------- 1. engine (client + dockerd)
t=$EPOCHREALTIME
if [ -x "$DOCKER" ] && [ -x "$DOCKERD" ] && pkg_installed docker.io; then
    STEP1="present"
else
    log "[1/4] installing docker.io (and debootstrap)"
    apt_install docker.io debootstrap
    STEP1="installed in $(elapsed "$t")s"
fi
if [ ! -x "$DOCKER" ] || [ ! -x "$DOCKERD" ]; then
    die "docker.io installed but $DOCKER or $DOCKERD missing"
fi

# ---------------------------------------------------------------- 2. daemon
t=$EPOCHREALTIME
if engine_answers; then
    STEP2="running"
else
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q dockerd "/proc/$pid/comm" 2>/dev/null; then
        log "[2/4] dockerd (pid $pid) runs but does not answer yet; waiting"
    else
        log "[2/4] starting dockerd (log: $DOCKERD_LOG)"
        echo "=== $(date -Is) knockgate setup-docker.sh starts dockerd" >>"$DOCKERD_LOG"
        # setsid: the daemon outlives this script and the test run, and no terminal signal
        # reaches it. Flags instead of /etc/docker/daemon.json: nothing else on the machine
        # changes, and a daemon.json naming the same options would make dockerd refuse to start.
        setsid "$DOCKERD" \
            --bip "$DOCKER_BIP" \
            --default-address-pool "base=$DOCKER_POOL,size=24" \
            </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
        pid=$!
    fi
    deadline=$((SECONDS + DAEMON_WAIT))
    until engine_answers; do
        if [ ! -d "/proc/$pid" ]; then
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            die "dockerd (pid $pid) exited; see $DOCKERD_LOG"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            die "dockerd (pid $pid) did not answer within ${DAEMON_WAIT}s; see $DOCKERD_LOG"
        fi
        sleep 0.2
    done
    STEP2="started pid $(cat /var/run/docker.pid 2>/dev/null || echo "$pid") in $(elapsed "$t")s"
fi
# docker0 must be inside 198.18.0.0/15 (a daemon someone started with Docker's defaults takes
# 172.17.0.0/16, and every network it picks itself would be outside the benchmarking range).
if ip link show docker0 >/dev/null 2>&1; then
    bridge_addr=$(ip -4 -o addr show dev docker0 | awk '{ print $4; exit }')
    case "$bridge_addr" in
    198.18.* | 198.19.*) ;;
    *) die "docker0 has address '${bridge_addr:-none}', outside 198.18.0.0/15: a dockerd with \
Docker's default networks runs; stop it (kill \$(cat /var/run/docker.pid)) and rerun this script" ;;
    esac
fi

# ---------------------------------------------------------------- 3. base image
t=$EPOCHREALTIME
if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    STEP3="present"
elif [ "${KG_DOCKER_PULL:-1}" = 1 ] && timeout 30 "$DOCKER" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    STEP3="pulled in $(elapsed "$t")s"
else
    log "[3/4] no registry: building $BASE_IMAGE with debootstrap"
    pkg_installed debootstrap || apt_install debootstrap
    mirror=$(mirror_for_suite "$SUITE")
    rootfs=$(mktemp -d /var/tmp/kg-rootfs.XXXXXX)
    cleanup_rootfs() {
        # debootstrap mounts proc/sys inside the target; never let rm walk into them.
        awk -v r="$rootfs" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" || true; done
        rm -rf --one-file-system "$rootfs"
    }
    trap cleanup_rootfs EXIT
    tb=$EPOCHREALTIME
    if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
        tail -n 30 "$rootfs.log" >&2
        die "debootstrap $SUITE from $mirror (full log: $rootfs.log)"
    fi
    rm -f "$rootfs.log"
    t_debootstrap=$(elapsed "$tb")
    # apt sources as in the official image: the host's deb822 stanzas for this release
    # (bookworm, -updates, -security), comments (snapshot URLs) dropped.
    awk -v want="$SUITE" '
        function flush() { if (ok && buf != "") printf "%s%s", (n++ ? "\n" : ""), buf; ok = 0; buf = "" }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i ~ ("^" want "(-|$)")) ok = 1 }
        { buf = buf $0 "\n" }
        END { flush() }' "$DEBIAN_SOURCES" >"$rootfs/etc/apt/sources.list.d/debian.sources" 2>/dev/null || true
    if [ -s "$rootfs/etc/apt/sources.list.d/debian.sources" ]; then
        rm -f "$rootfs/etc/apt/sources.list"
    else
        rm -f "$rootfs/etc/apt/sources.list.d/debian.sources"
        echo "deb $mirror $SUITE main" >"$rootfs/etc/apt/sources.list"
    fi
    # The official image's apt and dpkg settings: no caches or translations kept in layers,
    # no documentation unpacked.
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/usr/share/lintian/* \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.bash_history
    mkdir -p "$rootfs/var/lib/apt/lists/partial"
    : >"$rootfs/etc/resolv.conf"
    : >"$rootfs/etc/hostname"
    ti=$EPOCHREALTIME
    tar -C "$rootfs" --numeric-owner --xattrs -c . |
        "$DOCKER" import -c 'CMD ["bash"]' \
            -m "knockgate testbed: debootstrap --variant=minbase $SUITE $mirror" - "$BASE_IMAGE" >/dev/null
    t_import=$(elapsed "$ti")
    cleanup_rootfs
    trap - EXIT
    STEP3="built in $(elapsed "$t")s (debootstrap ${t_debootstrap}s, import ${t_import}s)"
fi

# ---------------------------------------------------------------- 4. Compose v2
t=$EPOCHREALTIME
compose_version() { "$DOCKER" compose version --short 2>/dev/null || true; }
cv=$(compose_version)
if [[ "$cv" == v2.* || "$cv" == 2.* ]]; then
    STEP4="present"
else
    log "[4/4] fetching Compose v2 (Debian trixie's docker-compose) as $PLUGIN_DIR/docker-compose"
    mirror=$(mirror_for_suite "$SUITE")
    work=$(mktemp -d /var/tmp/kg-compose.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/etc/sources.list.d" "$work/etc/preferences.d" "$work/lists/partial" \
        "$work/cache/archives/partial" "$work/deb"
    : >"$work/etc/sources.list"
    cat >"$work/etc/sources.list.d/kg-trixie.sources" <<EOF
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Only docker-compose may come from trixie (the apt configuration is private to this step
    # anyway: the machine's apt never sees trixie).
    cat >"$work/etc/preferences.d/kg-trixie" <<'EOF'
Package: docker-compose
Pin: release n=trixie
Pin-Priority: 500

Package: *
Pin: release n=trixie
Pin-Priority: -1
EOF
    apt_private=(
        -o "Dir::Etc::SourceList=$work/etc/sources.list"
        -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$work/etc/preferences"
        -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
        -o "Dir::State::Lists=$work/lists"
        -o "Dir::Cache=$work/cache"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
    )
    apt-get "${apt_private[@]}" update -qq >/dev/null || die "apt-get update of trixie (private lists)"
    (cd "$work/deb" && apt-get "${apt_private[@]}" download -qq docker-compose >/dev/null) ||
        die "apt-get download docker-compose from trixie"
    deb=$(find "$work/deb" -name 'docker-compose_2.*.deb' | head -n 1)
    [ -n "$deb" ] || die "trixie's docker-compose is not 2.x: $(ls "$work/deb")"
    dpkg-deb -x "$deb" "$work/x"
    bin=""
    for candidate in usr/libexec/docker/cli-plugins/docker-compose usr/lib/docker/cli-plugins/docker-compose \
        usr/bin/docker-compose; do
        if [ -f "$work/x/$candidate" ] && [ ! -L "$work/x/$candidate" ]; then
            bin="$work/x/$candidate"
            break
        fi
    done
    [ -n "$bin" ] || die "no docker-compose binary in $(basename "$deb")"
    install -D -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
    rm -rf "$work"
    trap - EXIT
    cv=$(compose_version)
    [[ "$cv" == v2.* || "$cv" == 2.* ]] || die "$DOCKER compose version says '$cv' after installing $(basename "$deb")"
    STEP4="installed $(basename "$deb") in $(elapsed "$t")s"
fi

# ---------------------------------------------------------------- summary
engine=$("$DOCKER" version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')
image=$("$DOCKER" image inspect --format '{{.Id}} {{.Size}}' "$BASE_IMAGE")
image_id=${image%% *}
image_mb=$(awk -v b="${image##* }" 'BEGIN { printf "%.0f", b / 1e6 }')
log "engine: $STEP1, dockerd: $STEP2, image: $STEP3, compose: $STEP4"
log "ok: engine $engine, $BASE_IMAGE ${image_id:7:12} ${image_mb}MB, compose $cv, $(elapsed "$T0")s"
echo "export KG_DOCKER=$DOCKER"
