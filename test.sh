#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs
# ruff, mypy (on appliance/) and pytest. Exits non-zero when anything fails.
#
#   ./test.sh                 everything
#   ./test.sh tests/unit -k engine    extra arguments go to pytest
#
# As root it installs the real peers and firewalls the integration tests use (apt). Under CI=true an integration test whose prerequisite
# is missing fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")"

# Real peers and real firewalls: knockd (its knock client and, for the benchmark, the
# daemon), tcpdump and libpcap, nftables, iptables and ipset, nmap, hping3, iproute2,
# curl, conntrack, OpenSSH's client and server (connect's tests run a real sshd in a namespace),
# tmux (`knockgate top` in a real terminal) and redis-server (the fleet's tests).
APT_PACKAGES=(knockd fwknop-client tcpdump libpcap0.8 nftables iptables ipset nmap hping3 iproute2 iputils-ping curl conntrack openssh-client openssh-server tmux redis-server)

install_peers() {
    local missing=()
    for package in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "test.sh: not root or no apt-get: not installing ${missing[*]} (those tests skip)" >&2
        return 0
    fi
    echo "test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # knockd's package would start nothing (START_KNOCKD=0), but openssh-server's would start
    # and enable sshd on the host (the tests run their own sshd in a namespace): a
    # policy-rc.d that refuses every start keeps services off while apt runs.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
        [ -n "$made_policy" ] && rm -f "$policy"
        return 1
    }
    [ -n "$made_policy" ] && rm -f "$policy"
    # ...nor started at the next boot (the tests start their own sshd and redis-server).
    if [[ " ${missing[*]} " == *" openssh-server "* ]]; then
        systemctl disable ssh.service >/dev/null 2>&1 || true
    fi
    if [[ " ${missing[*]} " == *" redis-server "* ]]; then
        systemctl disable redis-server.service >/dev/null 2>&1 || true
    fi
    return 0
}

setup_venv() {
    local venv=.venv stamp
    stamp=$(sha256sum pyproject.toml | cut -c1-16)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "test.sh: preparing $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip >/dev/null
        "$venv/bin/pip" install -q -e '.[test]'
        echo "$stamp" > "$venv/.stamp"
    fi
}

setup_docker() {
    # The Docker tests (tests/testbed) need an engine, the debian:bookworm-slim base
    # image and Compose v2; testbed/setup-docker.sh provides them (as root).
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        eval "$(testbed/setup-docker.sh)"
        export KG_DOCKER
    else
        echo "test.sh: not root: not setting up Docker (the Docker tests skip)" >&2
    fi
}

install_peers
setup_docker
setup_venv
PY=.venv/bin

echo "== ruff" >&2
"$PY/ruff" check appliance tests testbed
"$PY/ruff" format --check appliance tests testbed
echo "== mypy" >&2
"$PY/mypy" appliance
echo "== pytest" >&2
"$PY/python" -m pytest "$@"
