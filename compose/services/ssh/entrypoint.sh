#!/bin/sh
# knockgate/ssh entry: prepare host keys and authorized_keys, then exec sshd as PID 1.
# Runs in a few milliseconds when the host keys exist (every launch after the first).
set -eu

HOSTKEYS=/etc/ssh/hostkeys
KEYS_SRC=${AUTHORIZED_KEYS:-/keys/authorized_keys}
KEYS_DIR=/run/knockgate/authorized_keys

mkdir -p /run/sshd "$KEYS_DIR"
chmod 0755 /run/sshd /run/knockgate
chmod 0711 "$KEYS_DIR"

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

# authorized_keys: root may read the volume's file whatever its owner and mode; the copy is
# root-owned 0600 in a root-owned 0711 directory, which StrictModes accepts. A directory
# mounted at /keys without the file means no one can log in (sshd still starts).
if [ -r "$KEYS_SRC" ]; then
    install -m 0600 -o root -g root "$KEYS_SRC" "$KEYS_DIR/root"
else
    : >"$KEYS_DIR/root"
    chmod 0600 "$KEYS_DIR/root"
    echo "knockgate-ssh: warning: $KEYS_SRC missing or unreadable: no key can log in" >&2
fi

# -D: foreground, -e: log to stderr (docker logs). Extra arguments go to sshd.
exec /usr/sbin/sshd -D -e "$@"
