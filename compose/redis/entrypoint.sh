#!/bin/sh
# knockgate-redis: redis-server for a knockgate fleet, configured from the environment.
#
#   KNOCKGATE_FLEET                the fleet's name: the ACL user reaches kg:{NAME}:* only
#   KNOCKGATE_REDIS_BIND           addresses to listen on (default 127.0.0.1; space-separated):
#                                  loopback only (127.x, ::1), else it exits 2: this Redis
#                                  serves plain TCP (password, grants) and is for one host;
#                                  several hosts need a Redis with TLS (README: Running a fleet)
#   KNOCKGATE_REDIS_PORT           default 6379
#   KNOCKGATE_REDIS_PASSWORD_FILE  the knockgate user's password (a secret): one line of at
#                                  least 16 characters, no surrounding spaces, a final newline
#                                  optional (as knockgate reads fleet.password_file); anything
#                                  else and the container exits 2 without serving
#
# The configuration goes to /run/knockgate-redis (memory, 0700, the redis user's) with the
# password as its SHA-256 only (`#HASH`): the plain password is never on a command line or
# on disk here. The default user is off; knockgate's user may run only the commands a fleet
# uses (README: Fleet). Data: append-only file in /data (used one-time lines and SPA packets
# stay used across a restart of Redis).
#
# `knockgate-redis-entrypoint ping`: the health check (PING as the knockgate user).
set -eu

say() { echo "knockgate-redis: $*" >&2; }

FLEET=${KNOCKGATE_FLEET:-trial}
BIND=${KNOCKGATE_REDIS_BIND:-127.0.0.1}
PORT=${KNOCKGATE_REDIS_PORT:-6379}
PASSWORD_FILE=${KNOCKGATE_REDIS_PASSWORD_FILE:-/run/secrets/knockgate-redis-password}
ACL_COMMANDS="resetchannels -@all +ping +xadd +xread +xrevrange +hset +hdel +hgetall +zadd +zrem +zrangebyscore +set +multi +exec"

# The password, by the rule knockgate applies to fleet.password_file (redis_store.py
# read_password): one line, a final LF or CRLF not part of it, nothing after it, no spaces
# around it. Called as `value=$(password)` on a line of its own: its `exit 2` ends only the
# command substitution, and set -e sees that status only on a plain assignment.
password() {
    if [ ! -r "$PASSWORD_FILE" ]; then
        say "error: no readable password file at $PASSWORD_FILE (KNOCKGATE_REDIS_PASSWORD_FILE)"
        exit 2
    fi
    if [ "$(tail -n +2 "$PASSWORD_FILE" | wc -c)" -ne 0 ]; then
        say "error: $PASSWORD_FILE has more than one line (expected the password alone)"
        exit 2
    fi
    cr=$(printf '\r')
    value=$(head -n 1 "$PASSWORD_FILE")
    value=${value%"$cr"}
    case "$value" in
        *"$cr"* | [[:space:]]* | *[[:space:]])
            say "error: the password in $PASSWORD_FILE has spaces or a carriage return around or in it"
            exit 2 ;;
    esac
    if [ "${#value}" -lt 16 ]; then
        say "error: the password in $PASSWORD_FILE is shorter than 16 characters"
        exit 2
    fi
    printf '%s' "$value"
}

if [ "${1:-}" = ping ]; then
    secret=$(password)
    REDISCLI_AUTH=$secret exec redis-cli -h "${BIND%% *}" -p "$PORT" --user knockgate ping
fi
if [ "$#" -gt 0 ]; then
    exec "$@"
fi

case "$FLEET" in
    *[!A-Za-z0-9_.-]* | "" | [!A-Za-z0-9]*)
        say "error: KNOCKGATE_FLEET=$FLEET is not a fleet name (letters, digits, '_', '.', '-')"
        exit 2 ;;
esac
case "$PORT" in
    *[!0-9]* | "") say "error: KNOCKGATE_REDIS_PORT=$PORT is not a port"; exit 2 ;;
esac
case "$BIND" in
    *[![:space:]]*) ;;
    *) say "error: KNOCKGATE_REDIS_BIND is empty"; exit 2 ;;
esac
for address in $BIND; do
    case "${address#-}" in
        ::1) continue ;;
        127.*[!0-9.]*) ;;
        127.*) continue ;;
    esac
    say "error: KNOCKGATE_REDIS_BIND=$BIND: $address is not a loopback address; this Redis serves plain TCP (the password and every grant in clear), so it is for one host only: for several hosts use a Redis with TLS (README: Running a fleet)"
    exit 2
done

secret=$(password)
hash=$(printf '%s' "$secret" | sha256sum | cut -d' ' -f1)
unset secret
umask 077
CONF_DIR=/run/knockgate-redis
mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/redis.conf" <<CONF
bind $BIND
port $PORT
protected-mode yes
dir /data
save ""
appendonly yes
appendfsync everysec
user default off
user knockgate on #$hash ~kg:{$FLEET}:* $ACL_COMMANDS
CONF
chown -R redis:redis "$CONF_DIR" /data
say "fleet $FLEET: listening on $BIND port $PORT (user knockgate, default user off)"
exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$CONF_DIR/redis.conf"
