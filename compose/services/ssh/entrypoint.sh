#!/bin/sh
# knockgate/ssh entry: prepare host keys, then exec sshd as PID 1.
# Runs in a few milliseconds when the host keys exist (every launch after the first).
set -eu

HOSTKEYS=/etc/ssh/hostkeys
KEYS_SRC=${AUTHORIZED_KEYS:-/keys/authorized_keys}

mkdir -p /run/sshd
chmod 0755 /run/sshd

# Host keys: generated only when missing (first start on a fresh volume).
mkdir -p "$HOSTKEYS"
for type in ed25519 ecdsa rsa; do
    key=$HOSTKEYS/ssh_host_${type}_key
    if [ ! -s "$key" ]; then
        rm -f "$key" "$key.pub"
        ssh-keygen -q -t "$type" -N '' -C "knockgate-ssh" -f "$key"
        echo "knockgate-ssh: generated $key" >&2
    fi
    chmod 0600 "$key"
done

# authorized_keys: read at every login by /usr/local/libexec/knockgate-authorized-keys (the
# AuthorizedKeysCommand, as root: any owner and mode of the mounted file), so a key added
# while sshd runs counts at the next login. A missing file means no one can log in (sshd
# still starts); said here, once.
if [ ! -r "$KEYS_SRC" ]; then
    echo "knockgate-ssh: warning: $KEYS_SRC missing or unreadable: no key can log in" >&2
fi
if [ "$KEYS_SRC" != /keys/authorized_keys ]; then
    case $KEYS_SRC in
        /*) ;;
        *) echo "knockgate-ssh: AUTHORIZED_KEYS must be an absolute path, not $KEYS_SRC" >&2; exit 2 ;;
    esac
    case $KEYS_SRC in
        *[!A-Za-z0-9._/-]*)
            echo "knockgate-ssh: AUTHORIZED_KEYS may hold only letters, digits and . _ - /: $KEYS_SRC" >&2
            exit 2 ;;
    esac
    set -- -o "AuthorizedKeysCommand /usr/local/libexec/knockgate-authorized-keys %u $KEYS_SRC" "$@"
fi

# -D: foreground, -e: log to stderr (docker logs). Extra arguments go to sshd.
exec /usr/sbin/sshd -D -e "$@"
