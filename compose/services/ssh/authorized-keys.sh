#!/bin/sh
# knockgate/ssh AuthorizedKeysCommand: print root's authorized keys, read from the mounted
# file at each login, so a key added (or removed) while sshd runs counts at the next login.
#   $1  the user logging in (%u); only root has keys here
#   $2  the keys file (the entry script passes AUTHORIZED_KEYS, default /keys/authorized_keys)
# Runs as root (AuthorizedKeysCommandUser root): the mounted file may belong to any uid with
# any mode. sshd runs it only when it and its directories are root-owned and writable by no
# one else. Only a regular file is read, and at most 1 MiB of it; anything else prints
# nothing (no key, no login; the entry script warns about a missing file at start).
set -u

user=${1:-}
file=${2:-/keys/authorized_keys}
[ "$user" = root ] || exit 0
[ -f "$file" ] && [ -r "$file" ] || exit 0
exec head -c 1048576 -- "$file"
