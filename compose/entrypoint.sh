#!/bin/sh
# First start: write a configuration with a fresh random knock (never a shipped one)
# and print how to knock; then hand over to supervisord, which runs `knockgate run`.
set -e
mkdir -p /etc/knockgate/ssh-keys
knockgate init --config "$KNOCKGATE_CONFIG"
exec supervisord -n -c /etc/supervisor/knockgate.conf
