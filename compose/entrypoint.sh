#!/bin/sh
# The container's PID 1.
#
# With arguments (`docker compose run --rm knockgate teardown --config ...`), it runs that
# knockgate subcommand instead of the appliance: `exec knockgate "$@"`.
#
# Without: first start writes a configuration with a fresh random knock (never a shipped
# one) and prints how to knock; then it runs supervisord (which runs compose/knockgate-serve,
# then `knockgate run`) as a child, and stays to translate Docker's signals:
#
#   SIGHUP           `supervisorctl signal HUP launcher` (it reads its catalogue again), then
#                    `supervisorctl signal HUP knockgate`: knockgate re-reads its config in
#                    place (same pid, services and grants untouched), once supervisord calls
#                    it RUNNING. supervisord itself must not get it: on SIGHUP it reloads and
#                    restarts every program.
#   SIGTERM, SIGINT  supervisord's graceful stop (knockgate gets SIGTERM, stopwaitsecs).
#
# The exit status is supervisord's. Orphans re-parented to PID 1 are reaped by the shell
# while it waits (dash's `wait` collects any child). No Debian package does this mapping:
# tini and dumb-init forward or renumber a signal to their one child, never run a command.
set -eu

say() { echo "knockgate-entrypoint: $*"; }

# /run holds the sockets and supervisord's config: nobody but root may create anything in it.
# Compose mounts it 0755; a Kubernetes emptyDir is world-writable (and so may another
# deployment's tmpfs be): make it 0755 here, before anything is put there.
chmod 0755 /run 2>/dev/null || say "warning: could not make /run 0755 ($(stat -c %a /run))"

# Only the launcher (supervisord program `launcher`, user knockgate-launcher) reaches Docker:
# compose mounts the socket in a directory of its own, made 0700 and the launcher's below, so
# the monitor (user knockgate once it started the packet process) cannot even look into it. An older compose file mounts it at /var/run/docker.sock: that still works,
# with a warning (the socket is root's there: the monitor could reach Docker).
DOCKER_DIR=/run/knockgate-docker
LAUNCHER_DIR=/run/knockgate-launcher
if [ -z "${DOCKER_HOST:-}" ]; then
    if [ ! -S "$DOCKER_DIR/docker.sock" ] && [ -S /var/run/docker.sock ]; then
        DOCKER_HOST=unix:///var/run/docker.sock
        legacy_socket=yes
    else
        DOCKER_HOST=unix://$DOCKER_DIR/docker.sock
    fi
fi
export DOCKER_HOST

if [ "$#" -gt 0 ]; then
    # `docker compose run --rm knockgate uninstall|teardown|...`: root, full container
    # capabilities, Docker at DOCKER_HOST.
    exec knockgate "$@"
fi

# The launcher (user knockgate-launcher) gets the Docker socket's gid (whatever the host
# gave it) and knockgate-config as its groups through supervisord's command (setpriv
# --groups=@LAUNCHER_GROUPS@): nothing in /etc changes at run time (the image is read-only).
launcher_groups=knockgate-config
prepare_launcher() {
    socket=${DOCKER_HOST#unix://}
    if [ -S "$socket" ]; then
        gid=$(stat -c %g "$socket")
        # The packet process (untrusted bytes) must not share a group with Docker's socket.
        if id -G knockgate-packet 2>/dev/null | tr ' ' '\n' | grep -qx "$gid"; then
            say "error: the Docker socket's group (gid $gid) is a group of the packet process's user knockgate-packet ($(id knockgate-packet)): refusing to start; give the socket another group on the host"
            exit 1
        fi
        launcher_groups="$gid,knockgate-config"
    else
        say "no Docker socket at $socket: service containers cannot be started (mount it at $DOCKER_DIR/docker.sock)"
    fi
    if [ -d "$DOCKER_DIR" ]; then
        chown knockgate-launcher:knockgate-launcher "$DOCKER_DIR"
        chmod 0700 "$DOCKER_DIR"
    fi
    if [ "${legacy_socket:-}" = yes ]; then
        say "warning: the Docker socket is mounted at /var/run/docker.sock (an older compose file): the monitor can reach Docker too; mount it at $DOCKER_DIR/docker.sock (README: Operating the appliance)"
    fi
    # The launcher's, searchable by the monitor's group (knockgate) only: the monitor
    # connects (the launcher lets root and knockgate in), nobody else.
    mkdir -p "$LAUNCHER_DIR"
    chown knockgate-launcher:knockgate "$LAUNCHER_DIR"
    chmod 0750 "$LAUNCHER_DIR"
}

# The monitor (knockgate run --user knockgate) and the launcher read the configuration
# through the group knockgate-config: every file of /etc/knockgate gets it with group read,
# and nobody but root may write them (ssh-keys, the ssh service's own volume, is left as it
# is). New files (init, config apply, user add) take the group from the directory.
CONFIG_DIR=$(dirname "$KNOCKGATE_CONFIG")
share_config() {
    { chgrp knockgate-config "$CONFIG_DIR" && chmod g+rx,g-w,o-w "$CONFIG_DIR"; } 2>/dev/null || true
    find "$CONFIG_DIR" -mindepth 1 -path "$CONFIG_DIR/ssh-keys" -prune -o \
        \( -type f -o -type d \) -exec sh -c 'chgrp knockgate-config "$1" && chmod g+rX,g-w,o-w "$1"' _ {} \; \
        2>/dev/null || true
    as_monitor test -r "$KNOCKGATE_CONFIG" 2>/dev/null \
        || say "warning: the monitor (user knockgate) cannot read $KNOCKGATE_CONFIG: it will not reload (make it readable by group knockgate-config)"
}
as_monitor() { setpriv --reuid=knockgate --regid=knockgate --init-groups "$@"; }

# supervisord's control socket takes a password, new at every start (supervisord logs a
# CRIT line for a socket without one): the config with it is readable by root only.
CONF=/run/supervisor/knockgate.conf
umask 077
mkdir -p /run/supervisor
password=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
sed "s/@PASSWORD@/$password/" /etc/supervisor/knockgate.conf.in > "$CONF"
umask 022

supervisord_pid=
stop() {
    if [ -n "$supervisord_pid" ]; then
        kill -TERM "$supervisord_pid" 2>/dev/null || true
    else
        exit 143 # before supervisord runs (during init): nothing to stop
    fi
}
state() {
    timeout 10 supervisorctl -c "$CONF" status knockgate 2>/dev/null | awk '$1 == "knockgate" { print $2 }'
}
reload() {
    # Only a RUNNING knockgate (up for supervisord's startsecs) has its SIGHUP handler: one
    # that is STARTING would die of the signal. Wait for it a little; every call is bounded
    # (timeout), so a wedged supervisord cannot hold up a later SIGTERM for long.
    now=$(state)
    tries=0
    while [ "$now" = STARTING ] && [ "$tries" -lt 20 ]; do
        sleep 0.25
        tries=$((tries + 1))
        now=$(state)
    done
    # The launcher first: it reads its catalogue again before knockgate asks for a service
    # the new configuration defines.
    timeout 10 supervisorctl -c "$CONF" signal HUP launcher >/dev/null 2>&1 \
        || say "SIGHUP: could not signal the launcher: its catalogue is the previous one"
    if [ "$now" != RUNNING ]; then
        say "SIGHUP: knockgate is not running (${now:-supervisord does not answer}): nothing reloaded"
    elif ! timeout 10 supervisorctl -c "$CONF" signal HUP knockgate; then
        say "SIGHUP: could not signal knockgate: nothing reloaded"
    fi
}
trap stop TERM INT
trap 'say "SIGHUP before knockgate runs: ignored"' HUP

mkdir -p /etc/knockgate/ssh-keys
{ chgrp knockgate-config "$CONFIG_DIR" && chmod g+rx,g-w,o-w "$CONFIG_DIR"; } 2>/dev/null || true
# An existing config that is broken is reported here and waited for (knockgate-serve): the
# container starts anyway, so that it does not restart in a loop.
knockgate init --config "$KNOCKGATE_CONFIG" || say "$KNOCKGATE_CONFIG is not valid (above)"
share_config
prepare_launcher
sed -i "s/@LAUNCHER_GROUPS@/$launcher_groups/" "$CONF"

supervisord -n -c "$CONF" &
supervisord_pid=$!
trap reload HUP

# `wait` returns early (128 + signal) whenever a trap ran; wait again until supervisord is
# gone, then once more for its status (dash keeps it for a child that ended in a trap).
set +e
while kill -0 "$supervisord_pid" 2>/dev/null; do
    wait "$supervisord_pid"
done
wait "$supervisord_pid"
status=$?
say "supervisord exited with status $status"
exit "$status"
