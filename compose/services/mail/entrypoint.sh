#!/bin/sh
# knockgate/mail entry: write the tables for MAIL_DOMAIN and the maildir's owner, then exec
# OpenSMTPD in the foreground (-d: no daemon, logs on stderr) as PID 1.
#   MAIL_DOMAIN  domain(s) to accept mail for, separated by spaces or commas
#                (default example.test); any local part is accepted
#   MAILDIR      the Maildir (default /var/mail/knockgate, the mount point)
set -eu

domains=$(printf '%s' "${MAIL_DOMAIN:-example.test}" | tr ',' ' ' | tr 'A-Z' 'a-z')
maildir=${MAILDIR:-/var/mail/knockgate}
tables=/run/knockgate-mail

[ -n "$(printf '%s' "$domains" | tr -d ' ')" ] || { echo "knockgate-mail: MAIL_DOMAIN is empty" >&2; exit 64; }

# The maildir: created when missing; new/, cur/ and tmp/ made now, owned like the maildir.
mkdir -p "$maildir"
owner=$(stat -c %u "$maildir")
group=$(stat -c %g "$maildir")
if [ "$owner" = 0 ]; then
    # OpenSMTPD refuses to deliver as uid 0 ("not allowed to deliver"): a root-owned maildir
    # (a fresh bind mount, or a folder made just now) is handed to the image's knockgate user.
    owner=$(id -u knockgate)
    group=$(id -g knockgate)
    chown "$owner:$group" "$maildir"
    chmod 0700 "$maildir"
fi
for sub in new cur tmp; do
    if [ ! -d "$maildir/$sub" ]; then
        mkdir -p "$maildir/$sub"
        chown "$owner:$group" "$maildir/$sub"
        chmod 0700 "$maildir/$sub"
    fi
done

mkdir -p "$tables"
: >"$tables/accepted.new"
: >"$tables/recipients.new"
for domain in $domains; do
    echo "$domain" >>"$tables/accepted.new"
    echo "@$domain knockgate" >>"$tables/recipients.new"
done
echo "knockgate $owner:$group:$maildir" >"$tables/owner.new"
for table in accepted recipients owner; do
    chmod 0644 "$tables/$table.new"
    mv -f "$tables/$table.new" "$tables/$table"
done
echo "knockgate-mail: accepting mail for: $domains (into $maildir as uid $owner)" >&2

exec /usr/sbin/smtpd -d -f "${SMTPD_CONF:-/etc/smtpd.conf}" "$@"
